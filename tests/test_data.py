"""vqpipe.data with real DataLoaders over small OUTs written by vqpipe's own writer and ledger (no Ray)."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokens import TINY, assert_split_like_distributed_sampler, write_out
from torch.utils.data import DataLoader

from vqpipe.data import TokenDataset, VarInputBuilder, var_batch
from vqpipe.data.epoch import make_plan
from vqpipe.errors import CheckpointError, StorageError
from vqpipe.ledger import Ledger
from vqpipe.model import build_model

ROWS = {"p0": 23, "p1": 0, "p2": 9, "p3": 41, "p4": 16}  # different sizes and an empty shard
ALL = ("codes", "label", "var_input")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    expected = write_out(d, ROWS, rows_per_group=8, uncommitted={"p5": 6})
    return d, expected


def keys_of(ds, num_workers=0, batch_size=5):
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    return [k for batch in loader for k in batch["key"]]


def test_plan_partitions_like_distributed_sampler():
    rows = [23, 0, 9, 41, 16]
    n = sum(rows)
    for world in (1, 2, 3, 7, 200):
        for drop_last in (False, True):
            for workers in (1, 2, 5):
                plan = make_plan(rows, world_size=world, drop_last=drop_last, shuffle=True, seed=3, epoch=1)
                seen = Counter()
                for rank in range(world):
                    count = 0
                    for w in range(workers):
                        for s in plan.spans(*plan.worker_range(rank, w, workers)):
                            seen.update((s.shard, r) for r in range(s.start, s.stop))
                            count += s.stop - s.start
                    assert count == plan.per_rank == (n // world if drop_last else -(-n // world))
                distinct = {(k, r) for k, m in enumerate(rows) for r in range(m)}
                if drop_last:
                    assert set(seen) <= distinct and max(seen.values(), default=1) == 1
                    assert n - len(seen) < world
                else:
                    assert set(seen) == distinct
                    assert sum(seen.values()) - n == world * plan.per_rank - n  # only the fill repeats


@pytest.mark.parametrize("world,num_workers", [(1, 0), (1, 3), (2, 2), (3, 0), (4, 2)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_and_workers_cover_every_committed_row_once(out, world, num_workers, drop_last):
    d, expected = out
    per_rank = []
    for rank in range(world):
        ds = TokenDataset(str(d), rank=rank, world_size=world, drop_last=drop_last, seed=1, shuffle_buffer=7)
        keys = keys_of(ds, num_workers)
        assert len(keys) == len(ds)
        per_rank.append(keys)
    assert len({len(k) for k in per_rank}) == 1  # DDP needs the same count on every rank
    seen = Counter(k for keys in per_rank for k in keys)
    assert set(seen) <= set(expected)  # p5 has no done marker: never read
    assert_split_like_distributed_sampler(seen, expected, world, drop_last)


def test_rows_equal_what_pyarrow_reads(out):
    d, expected = out
    ds = TokenDataset(str(d), columns=(*ALL, "meta"), label_fill=1000, shuffle_buffer=16)
    plain = pq.ParquetDataset([str(d / "data" / f"{s}.parquet") for s in ROWS]).read()
    pa_rows = {r["key"]: r for r in plain.to_pylist()}
    items = list(ds)
    assert len(items) == len(pa_rows) == plain.num_rows
    for it in items:
        want = pa_rows[it["key"]]
        assert it["codes"].dtype == torch.int64 and it["codes"].tolist() == want["codes"]
        assert it["label"] == (1000 if want["label"] is None else want["label"])
        assert np.array_equal(it["var_input"].numpy(), np.array(want["var_input"], dtype=np.float16))
        assert it["var_input"].shape == (29, 8) and it["meta"] == want["meta"]
        assert np.array_equal(it["codes"].numpy(), expected[it["key"]]["codes"])
    assert any(expected[k]["label"] is None for k in pa_rows)  # the null-label path ran


def test_batches_equal_collated_items(out):
    d, _ = out
    items = DataLoader(TokenDataset(str(d), columns=ALL, world_size=2, rank=1), batch_size=6)
    batches = DataLoader(
        TokenDataset(str(d), columns=ALL, world_size=2, rank=1, batch_size=6), batch_size=None
    )
    for a, b in zip(items, batches, strict=True):
        assert a["key"] == b["key"]
        for name in ALL:
            assert torch.equal(a[name], b[name])


def test_epochs_are_deterministic_and_differ(out):
    d, _ = out

    def order(epoch, seed=0, **kw):
        ds = TokenDataset(str(d), seed=seed, world_size=2, rank=0, shuffle_buffer=10, **kw)
        ds.set_epoch(epoch)
        return keys_of(ds)

    assert order(0) == order(0) and order(3) == order(3)
    assert order(0) != order(1) and order(0) != order(0, seed=1)
    assert sorted(order(0)) != order(0)  # shuffled
    plain = order(5, shuffle=False)
    assert plain == order(0, shuffle=False) == sorted(plain)  # shard-id order, rows in file order


@pytest.mark.parametrize("stop_after", [0, 1, 4, 9])
def test_resume_with_no_workers_continues_exactly(out, stop_after):
    d, _ = out

    def dataset():
        ds = TokenDataset(str(d), world_size=2, rank=1, seed=7, shuffle_buffer=6)
        ds.set_epoch(2)
        return ds

    full = keys_of(dataset(), batch_size=4)
    ds = dataset()
    seen = []
    batches = iter(DataLoader(ds, batch_size=4))
    for _ in range(stop_after):
        seen += next(batches)["key"]
    state = json.loads(json.dumps(ds.state_dict()))  # what a checkpoint stores survives JSON
    resumed = dataset()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the usual loop calls set_epoch again: the state is kept for the same epoch
    assert seen + keys_of(resumed, batch_size=4) == full
    assert keys_of(resumed, batch_size=4) == full  # the next iteration is a whole epoch again


@pytest.mark.parametrize("stop_after", [1, 3, 8])
def test_resume_with_workers_through_stateful_dataloader(out, stop_after):
    from torchdata.stateful_dataloader import StatefulDataLoader

    d, _ = out

    def loader():
        ds = TokenDataset(str(d), world_size=2, rank=0, seed=7, shuffle_buffer=6)
        ds.set_epoch(1)
        return StatefulDataLoader(ds, batch_size=3, num_workers=2)

    full = [k for b in loader() for k in b["key"]]
    first = loader()
    seen = []
    for i, batch in enumerate(first):
        seen += batch["key"]
        if i + 1 == stop_after:
            break
    state = first.state_dict()
    again = loader()
    again.load_state_dict(state)
    rest = [k for b in again for k in b["key"]]
    assert seen + rest == full and len(full) == len(TokenDataset(str(d), world_size=2, rank=0))


def test_state_from_other_settings_is_refused(out):
    d, _ = out
    state = TokenDataset(str(d), world_size=2, rank=0).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        TokenDataset(str(d), world_size=3, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="committed shards changed"):
        TokenDataset(str(d), world_size=2, rank=0, shards=["p0", "p2"]).load_state_dict(state)


def test_format_1_0_and_unlabeled_outs_read(tmp_path):
    legacy = write_out(tmp_path / "v10", {"a": 13, "b": 5}, legacy=True, labeled=False)
    assert pq.read_schema(tmp_path / "v10" / "data" / "a.parquet").field("var_input").type.extension_name
    items = list(TokenDataset(str(tmp_path / "v10"), columns=ALL, shuffle=False))
    assert [it["key"] for it in items] == sorted(legacy)
    for it in items:
        assert it["label"] == -1
        assert np.array_equal(it["var_input"].numpy(), legacy[it["key"]]["var_input"])


def test_bad_outs_get_clear_errors(tmp_path, out):
    d, _ = out
    with pytest.raises(StorageError, match="no _vqpipe/run.json"):
        TokenDataset(str(tmp_path))
    write_out(tmp_path / "codes_only", {"a": 4}, var_input=False)
    with pytest.raises(StorageError, match=r"a\.parquet: no column\(s\) var_input"):
        TokenDataset(str(tmp_path / "codes_only"), columns=ALL)
    write_out(tmp_path / "lying", {"a": 4, "b": 6})
    marker = tmp_path / "lying" / "_vqpipe" / "done" / "b.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "rows": 7}))
    with pytest.raises(StorageError, match=r"b\.parquet: 6 rows, but its done marker says 7"):
        list(TokenDataset(str(tmp_path / "lying")))


def test_var_input_builder_equals_the_model(tmp_path, out):
    d, _ = out
    model = build_model("tiny", seed=0)
    ckpt = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), ckpt)
    builder = VarInputBuilder.from_checkpoint(str(ckpt), preset="tiny")
    assert sum(t.numel() for t in builder.state_dict().values()) < 0.05 * sum(
        t.numel() for t in model.state_dict().values()
    )
    codes = torch.randint(0, TINY.vocab_size, (16, TINY.seq_len), generator=torch.Generator().manual_seed(0))
    offs = TINY.scale_offsets
    with torch.no_grad():
        want = model.idxBl_to_var_input([codes[:, a:b] for a, b in zip(offs[:-1], offs[1:])])
    got = builder(codes)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # Against stored var_input: equal up to the stored dtype (float16) rounding, here exactly.
    batch = next(iter(DataLoader(TokenDataset(str(d), columns=ALL), batch_size=32)))
    assert torch.equal(builder(batch["codes"]).half(), batch["var_input"])
    names = var_batch({k: v for k, v in batch.items() if k != "var_input"}, builder)
    assert names["gt_BL"].dtype == names["label_B"].dtype == torch.int64
    assert torch.allclose(names["x_BLCv_wo_first_l"], var_batch(batch)["x_BLCv_wo_first_l"], atol=1e-2)
    legacy = tmp_path / "legacy.pth"  # torch's pre-zip format cannot be memory-mapped: read whole instead
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(VarInputBuilder.from_checkpoint(str(legacy), preset="tiny")(codes), want)
    with pytest.raises(CheckpointError, match="sha256"):
        VarInputBuilder.from_checkpoint(str(ckpt), preset="tiny", expected_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="does not fit preset var256"):
        VarInputBuilder.from_checkpoint(str(ckpt), preset="var256")


@pytest.mark.slow
def test_an_out_on_s3_streams_through_the_storage_layer(s3):
    url = s3.url("tokens-data/out")
    expected = write_out(url, {"a": 10, "b": 0, "c": 7}, storage_options=s3.storage_options)
    for workers in (0, 2):
        ds = TokenDataset(url, columns=ALL, world_size=2, rank=1, storage_options=s3.storage_options)
        items = [i for b in DataLoader(ds, batch_size=4, num_workers=workers) for i in range(len(b["key"]))]
        assert len(items) == len(ds) == 9
    rows = list(TokenDataset(url, columns=ALL, storage_options=s3.storage_options))
    assert sorted(r["key"] for r in rows) == sorted(expected)
    for r in rows:
        assert np.array_equal(r["var_input"].numpy(), expected[r["key"]]["var_input"])


def test_other_columns_pass_through(tmp_path):
    """A column this version does not know (as a later format's `view` would be) reads as plain values."""
    import pyarrow as pa

    write_out(tmp_path / "o", {"a": 5})
    path = tmp_path / "o" / "data" / "a.parquet"
    t = pq.read_table(path)
    views = [{"flip": i % 2 == 1, "crop": [0, 0, 64, 64]} for i in range(t.num_rows)]
    t = t.append_column("view", pa.array(views)).append_column(
        "box", pa.FixedSizeListArray.from_arrays(pa.array(np.arange(4 * t.num_rows, dtype=np.int32)), 4)
    )
    pq.write_table(t, path)
    items = list(TokenDataset(str(tmp_path / "o"), columns=("codes", "view", "box"), shuffle=False))
    assert [it["view"] for it in items] == views
    assert items[1]["box"].tolist() == [4, 5, 6, 7]
    batch = next(
        iter(TokenDataset(str(tmp_path / "o"), columns=("view", "box"), batch_size=5, shuffle=False))
    )
    assert batch["view"] == views and batch["box"].shape == (5, 4) and batch.keys()[-2:] == ["view", "box"]
    with pytest.raises(StorageError, match="no column"):
        TokenDataset(str(tmp_path / "o"), columns=("nothing",))


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "yielded",
            10**9,
            "yielded is 1000000000, but worker 0 of 1 yields 89 rows in epoch 0",
        ),  # yielded nothing
        ("yielded", -3, "yielded is -3, not an integer >= 0"),  # a numpy error mid-iteration
        ("yielded", "5", "yielded is '5', not an integer >= 0"),
        ("epoch", -1, "epoch is -1, not an integer >= 0"),
        ("worker", 2, "worker is 2, not one of num_workers=1"),
        ("num_workers", 0, "num_workers is 0, not an integer >= 1"),
        ("shuffle", "yes", "shuffle is 'yes', not true or false"),
    ],
)
def test_hand_edited_states_are_refused_naming_field_and_value(out, field, value, message):
    d, _ = out
    ds = TokenDataset(str(d), shuffle=False)
    state = {**ds.state_dict(), field: value}
    with pytest.raises(ValueError, match=re.escape(f"TokenDataset state: {message}")):
        TokenDataset(str(d), shuffle=False).load_state_dict(state)


def test_a_state_at_the_end_of_the_epoch_resumes_to_nothing(out):
    d, _ = out
    ds = TokenDataset(str(d), shuffle=False)
    ds.load_state_dict({**ds.state_dict(), "yielded": len(ds)})
    assert list(ds) == []


def test_a_marker_with_negative_rows_is_refused_naming_the_file(tmp_path):
    write_out(tmp_path, {"a": 4, "b": 6, "c": 5})
    marker = Path(Ledger(str(tmp_path)).done_url("b"))
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "rows": -4}))
    with pytest.raises(
        StorageError, match=re.escape(f"{marker}: not a done record (rows is -4, not a count")
    ):
        TokenDataset(str(tmp_path))
