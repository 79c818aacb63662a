"""TokenDataset(view=...) over OUTs of a `--views` run: one seeded view per image per epoch, planned over images.

OUTs are written by vqpipe's own writer and ledger (tests/tokens.py: one row per image and view, crop batches of
4 rows and row groups of 8 rows, so row groups cut images); no Ray."""

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokens import assert_split_like_distributed_sampler, write_out
from torch.utils.data import DataLoader

from vqpipe.compact import CompactOptions, compact
from vqpipe.data import TokenDataset
from vqpipe.errors import StorageError
from vqpipe.views import parse_views

VIEWS = parse_views("center,tl,hflip")  # canonical order: center, tl, center+hflip
IMAGES = {"a": 7, "b": 0, "c": 12, "d": 5, "e": 9}  # images per shard, an empty shard
N_IMAGES = sum(IMAGES.values())


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("views")
    expected = write_out(d, IMAGES, views=VIEWS, uncommitted={"f": 3})
    return d, expected


def picks(ds, num_workers=0, batch_size=5):
    """(key, view) of every item an epoch yields, in order."""
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    return [kv for b in loader for kv in zip(b["key"], b["view"])]


def test_an_epoch_is_one_row_per_image_and_the_rows_are_the_views(out):
    d, expected = out
    ds = TokenDataset(str(d), columns=("codes", "label", "var_input", "view"), seed=3, shuffle_buffer=7)
    assert ds.views == VIEWS and ds.total_rows == 3 * N_IMAGES and ds.total_images == len(ds) == N_IMAGES
    items = list(ds)
    assert Counter(it["key"] for it in items) == Counter({k: 1 for k, _ in expected})
    for it in items:
        want = expected[(it["key"], it["view"])]
        assert np.array_equal(it["codes"].numpy(), want["codes"])
        assert np.array_equal(it["var_input"].numpy(), want["var_input"])
        assert it["label"] == (-1 if want["label"] is None else want["label"])
    assert set(Counter(it["view"] for it in items)) == set(VIEWS)  # 33 images: every view gets picked
    assert "view" not in next(iter(TokenDataset(str(d))))  # read to check the picks, yielded when asked


@pytest.mark.parametrize("world,num_workers", [(1, 2), (2, 0), (3, 2), (4, 0)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_and_workers_share_the_images_and_agree_on_the_views(out, world, num_workers, drop_last):
    d, _ = out
    alone = dict(picks(TokenDataset(str(d), seed=3, columns=("view",))))
    per_rank = []
    for rank in range(world):
        ds = TokenDataset(
            str(d),
            rank=rank,
            world_size=world,
            drop_last=drop_last,
            seed=3,
            shuffle_buffer=4,
            columns=("view",),
        )
        got = picks(ds, num_workers)
        assert len(got) == len(ds) == (N_IMAGES // world if drop_last else -(-N_IMAGES // world))
        per_rank += got
    assert all(alone[k] == v for k, v in per_rank)  # the pick depends on (seed, epoch, image) alone
    assert len(alone) == N_IMAGES
    assert_split_like_distributed_sampler(Counter(k for k, _ in per_rank), alone, world, drop_last)


def test_picks_are_seeded_by_seed_and_epoch(out):
    d, _ = out

    def chosen(epoch, seed=0, **kw):
        ds = TokenDataset(str(d), seed=seed, columns=("view",), **kw)
        ds.set_epoch(epoch)
        return dict(picks(ds))

    first = chosen(0)
    assert chosen(0) == first and chosen(0, shuffle=False) == first  # the order does not change the pick
    for other in (chosen(1), chosen(0, seed=1)):
        assert set(other) == set(first) and sum(first[k] != other[k] for k in first) > N_IMAGES // 3
    views_of_a = Counter(v for e in range(8) for k, v in chosen(e).items() if k == "a/00000")
    assert len(views_of_a) > 1  # one image sees several views over the epochs


def test_each_row_group_is_decoded_once_per_epoch(out, monkeypatch):
    """Images are planned by the row group that holds their picked row: reading a tenth of the rows does not
    decode a row group twice, even where groups cut images and windows cut groups."""
    d, _ = out
    decoded = []
    read = pq.ParquetFile.read_row_groups

    def counting(self, row_groups, *args, **kwargs):
        decoded.extend((self, g) for g in row_groups)  # keeps the file objects: their ids stay distinct
        return read(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counting)
    for shuffle in (True, False):
        decoded.clear()
        assert len(list(TokenDataset(str(d), shuffle=shuffle, shuffle_buffer=4))) == N_IMAGES
        groups = sum(pq.ParquetFile(d / "data" / f"{s}.parquet").num_row_groups for s in IMAGES if IMAGES[s])
        assert len(decoded) == len({(id(f), g) for f, g in decoded}) == groups


@pytest.mark.parametrize("stop_after", [1, 4])
def test_resume_continues_exactly_with_and_without_workers(out, stop_after):
    from torchdata.stateful_dataloader import StatefulDataLoader

    d, _ = out

    def dataset():
        ds = TokenDataset(str(d), world_size=2, rank=1, seed=7, shuffle_buffer=5, columns=("view",))
        ds.set_epoch(2)
        return ds

    full = picks(dataset(), batch_size=2)
    ds = dataset()
    batches = iter(DataLoader(ds, batch_size=2))
    seen = [kv for _ in range(stop_after) for kv in zip(*(lambda b: (b["key"], b["view"]))(next(batches)))]
    resumed = dataset()
    resumed.load_state_dict(json.loads(json.dumps(ds.state_dict())))
    assert seen + picks(resumed, batch_size=2) == full

    def loader():
        return StatefulDataLoader(dataset(), batch_size=2, num_workers=2)

    full = [kv for b in loader() for kv in zip(b["key"], b["view"])]
    first, seen = loader(), []
    for i, b in enumerate(first):
        seen += zip(b["key"], b["view"])
        if i + 1 == stop_after:
            break
    again = loader()
    again.load_state_dict(first.state_dict())
    assert seen + [kv for b in again for kv in zip(b["key"], b["view"])] == full


def test_a_named_view_every_row_and_refused_states(out):
    d, expected = out
    tl = TokenDataset(str(d), view="tl", columns=("codes", "view"), batch_size=4)
    batches = list(tl)
    assert [v for b in batches for v in b["view"]] == ["tl"] * N_IMAGES == ["tl"] * len(tl)
    for b in batches:
        for k, codes in zip(b["key"], b["codes"]):
            assert np.array_equal(codes.numpy(), expected[(k, "tl")]["codes"])
    every = TokenDataset(str(d), view="all", columns=("view",), shuffle_buffer=6)
    assert sorted(picks(every)) == sorted(expected) and len(every) == len(expected)
    with pytest.raises(
        ValueError, match=r"view='tr': use 'all', 'random' or one of .*center, tl, center\+hflip"
    ):
        TokenDataset(str(d), view="tr")
    state = TokenDataset(str(d), view="all").state_dict()
    with pytest.raises(ValueError, match="saved with view='all', this dataset has 'random'"):
        TokenDataset(str(d)).load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "view"}  # saved before view= existed: every row
    TokenDataset(str(d), view="all").load_state_dict(old)


def test_an_out_without_views_reads_as_before(tmp_path):
    expected = write_out(tmp_path / "o", {"a": 9, "b": 14})
    kw = {"world_size": 2, "rank": 1, "seed": 5, "shuffle_buffer": 4}
    rows = [
        k
        for b in DataLoader(TokenDataset(str(tmp_path / "o"), view="all", **kw), batch_size=3)
        for k in b["key"]
    ]
    ds = TokenDataset(str(tmp_path / "o"), columns=("view",), **kw)  # view="random" by default
    assert ds.views == ("center",) and len(ds) == len(rows) == 12
    assert picks(ds, batch_size=3) == [(k, "center") for k in rows]  # the same rows in the same order
    assert len(TokenDataset(str(tmp_path / "o"), view="center")) == 23
    state = TokenDataset(str(tmp_path / "o"), view="all", **kw).state_dict()
    TokenDataset(str(tmp_path / "o"), **kw).load_state_dict(state)  # one view: "random" is every row
    assert set(rows) <= set(expected)


def test_compacted_and_partly_compacted_outs_pick_the_same(out, tmp_path):
    d0, _ = out
    d = tmp_path / "o"
    shutil.copytree(d0, d)
    before = {e: dict(picks(_epoch(d, e))) for e in (0, 1)}
    compact(
        CompactOptions(str(d), target_rows=60, row_group_rows=5)
    )  # [a, b, c], [d, e]; row groups cut images
    assert sorted(p.name for p in (d / "data").iterdir()) == [
        "compacted-000000.parquet",
        "compacted-000001.parquet",
    ]
    assert {e: dict(picks(_epoch(d, e))) for e in (0, 1)} == before
    # c committed again (the same rows, a new commit): read from data/, its rows in the compacted file skipped
    shutil.copy(d0 / "data" / "c.parquet", d / "data" / "c.parquet")
    marker = d / "_vqpipe" / "done" / "c.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "started": 1.0}))
    ds = _epoch(d, 0)
    assert any(s.ranges for s in ds.sources) and dict(picks(ds)) == before[0] and len(ds) == N_IMAGES


def _epoch(d, epoch):
    ds = TokenDataset(str(d), seed=2, shuffle_buffer=6, columns=("view",))
    ds.set_epoch(epoch)
    return ds


def test_inconsistent_views_get_errors_that_name_the_file(out, tmp_path):
    d0, _ = out
    d = tmp_path / "o"
    shutil.copytree(d0, d)

    def edit_marker(shard, **fields):
        p = d / "_vqpipe" / "done" / f"{shard}.json"
        saved = p.read_text()
        p.write_text(json.dumps({**json.loads(saved), **fields}))
        return lambda: p.write_text(saved)

    undo = edit_marker("c", views=["center", "tl"])
    with pytest.raises(
        StorageError, match=r"done/c\.json: views center,tl, but .*done/a\.json has center,tl,c"
    ):
        TokenDataset(str(d))
    TokenDataset(str(d), view="all")  # the pick needs one view list; reading every row does not
    undo()
    undo = edit_marker("d", images=4)
    with pytest.raises(StorageError, match=r"done/d\.json: 15 rows for 4 images is not 3 views per image"):
        TokenDataset(str(d))
    undo()
    for s in IMAGES:
        edit_marker(s, views=["center", "tr", "center+hflip"])
    with pytest.raises(
        StorageError, match=r"data/a\.parquet: its metadata lists views center,tl,center\+hflip"
    ):
        TokenDataset(str(d), view="tr")
    for s in IMAGES:
        edit_marker(s, views=list(VIEWS))
    path = d / "data" / "e.parquet"  # rows not grouped by image in the views' order: refused, not misread
    f = pq.ParquetFile(path)
    t = f.read()
    swapped = t["view"].to_pylist()
    swapped[0], swapped[1] = swapped[1], swapped[0]
    t = t.set_column(t.schema.get_field_index("view"), "view", pa.array(swapped, pa.string()))
    pq.write_table(t.replace_schema_metadata(f.schema_arrow.metadata), path, row_group_size=8)
    with pytest.raises(
        StorageError, match=r"e\.parquet: key 'e/00000': the row read as its view 'center' is view 'tl'"
    ):
        list(TokenDataset(str(d), view="center", shards=["e"]))
