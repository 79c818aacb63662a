"""vqpipe.raydata: `Tokenize` in Ray Data pipelines (codes bit-identical to the job's, bad samples as the job's
reasons, Ray's decoded batches refused), `read_tokens` (every committed row once, also from compacted files, as
Ray Train takes it) and examples/train_ray.py with 2 CPU workers.

The unit tests call Tokenize on batches built from real shard samples in each of Ray's batch formats; the slow
tests share one Ray instance (4 logical CPUs: Ray Train's 2 workers leave Ray Data its read tasks) and run the real
job, Ray Data and Ray Train on it."""

from __future__ import annotations

import glob
import importlib.util
import io
import math
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO
from PIL import Image
from shards import defect_samples, good_image_bytes, write_shard
from tokens import write_out

from vqpipe.compact import CompactOptions, compact, read_sources
from vqpipe.config import build_config
from vqpipe.data import fixed_list_to_numpy, var_batch
from vqpipe.errors import ConfigError, StorageError
from vqpipe.ledger import Ledger
from vqpipe.preprocess import preprocess_views
from vqpipe.raydata import TokenCollate, Tokenize, read_tokens

TINY = {"model": "tiny", "random_weights": True}


def ray_batch(samples: list[dict]) -> dict[str, list]:
    """Samples as read_webdataset(decoder=None) hands them over: a column per member suffix, NaN where absent."""
    names = list(dict.fromkeys(k for s in samples for k in s if k != "__key__"))
    columns = {"__key__": [s["__key__"] for s in samples], "__url__": ["x.tar"] * len(samples)}
    columns.update({n: [s.get(n, math.nan) for s in samples] for n in names})
    return columns


def formats(columns: dict[str, list]) -> dict[str, object]:
    def arrow(values):
        return pa.array([None if isinstance(v, float) else v for v in values])

    return {
        "numpy": {k: np.array(v, dtype=object) for k, v in columns.items()},
        "pandas": pd.DataFrame(columns),
        "pyarrow": pa.table({k: arrow(v) for k, v in columns.items()}),
    }


@pytest.fixture(scope="module")
def tokenize(one_torch_thread):
    return Tokenize(**TINY)


# -- unit: the UDF on its own (no Ray started) ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["numpy", "pandas", "pyarrow"])
def test_one_row_per_sample_with_the_jobs_reasons_in_every_batch_format(tokenize, fmt):
    samples, expected = defect_samples(seed=3)
    table = tokenize(formats(ray_batch(samples))[fmt])
    assert table.schema.field("codes").type == pa.list_(pa.field("element", pa.uint16(), False), 30)
    assert table["key"].to_pylist() == [s["__key__"] for s in samples]  # input order, one row each
    assert table["error"].to_pylist() == [expected[s["__key__"]] for s in samples]
    good = [i for i, s in enumerate(samples) if expected[s["__key__"]] is None]
    assert table["codes"].null_count == len(samples) - len(good)
    assert all(table["error_detail"][i].as_py() for i in range(len(samples)) if i not in good)
    codes = fixed_list_to_numpy(table["codes"].take(good))
    var_input = fixed_list_to_numpy(table["var_input"].take(good))
    # the same images through the encoder in reverse order: each row is its own image's codes and var_input
    crops = [preprocess_views(samples[i][_image_suffix(samples[i])], tokenize.resolution) for i in good[::-1]]
    c, v = tokenize.encoder(np.concatenate(crops))
    assert np.array_equal(codes, c[::-1]) and np.array_equal(var_input, v[::-1])
    assert table["label"].take(good).to_pylist() == good  # `.cls` is the sample's index
    assert all('"case"' in m for m in table["meta"].take(good).to_pylist())


def _image_suffix(sample: dict) -> str:
    return next(k for k in ("jpg", "png", "webp", "gif") if k in sample)


def test_views_give_a_row_per_view_and_one_error_row_per_bad_sample(one_torch_thread):
    tok = Tokenize(**TINY, views=["crops5"], var_input=False, decode_threads=3)  # a pool, as the job's
    samples = [{"__key__": "a", "jpg": good_image_bytes(1)}, {"__key__": "b", "png": b"not a png"}]
    table = tok(formats(ray_batch(samples))["pandas"])
    assert table["key"].to_pylist() == ["a"] * 5 + ["b"]
    assert table["view"].to_pylist() == ["center", "tl", "tr", "bl", "br", None]
    assert table["error"].to_pylist() == [None] * 5 + ["not_an_image"]
    assert "var_input" not in table.column_names
    codes, _ = tok.encoder(preprocess_views(samples[0]["jpg"], tok.resolution, tok.views))
    assert np.array_equal(fixed_list_to_numpy(table["codes"].slice(0, 5)), codes)


def test_an_upper_case_suffix_is_the_image_and_two_spellings_are_a_duplicate(tokenize):
    img = good_image_bytes(2)
    batch = ray_batch([{"__key__": "a", "JPG": img}, {"__key__": "b", "jpg": img, "JPG": img}])
    assert tokenize(formats(batch)["numpy"])["error"].to_pylist() == [None, "duplicate_member"]


def test_an_empty_batch_gives_an_empty_table_of_the_schema(tokenize):
    assert tokenize({"__key__": np.array([], dtype=object)}).schema == tokenize.schema


def test_decoded_batches_are_refused_naming_decoder_none(tokenize):
    jpg = np.empty(1, dtype=object)
    jpg[0] = np.asarray(
        Image.open(io.BytesIO(good_image_bytes(1)))
    )  # what Ray's decoder=True/False make of it
    batch = {"__key__": np.array(["a"], dtype=object), "jpg": jpg}
    with pytest.raises(TypeError, match=r"read_webdataset\(urls, decoder=None\).*'a': .jpg is a ndarray"):
        tokenize(batch)
    with pytest.raises(TypeError, match="decoder=None"):  # .cls decoded to an int by Ray
        tokenize({"__key__": np.array(["a"], dtype=object), "cls": np.array([3], dtype=object)})
    with pytest.raises(ValueError, match="no __key__ column"):
        tokenize({"jpg": np.array([b"x"], dtype=object)})


def test_settings_are_checked_like_the_jobs():
    with pytest.raises(ConfigError, match="model.checkpoint: preset 'tiny' needs weights"):
        Tokenize(model="tiny")
    with pytest.raises(ConfigError, match="model.precision: must be one of"):
        Tokenize(**TINY, precision="fp8")


# -- slow: Ray Data, the job and Ray Train on one Ray --------------------------------------------------------------


@pytest.fixture(scope="module")
def ray4(_ray_shutdown_at_end):
    """This module's own Ray: 4 logical CPUs (2 Ray Train workers + Ray Data's tasks), gloo pinned to loopback."""
    import ray
    import ray.data

    if ray.is_initialized():
        ray.shutdown()
    env = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()  # the next module's ray_session starts its usual one


@pytest.fixture(scope="module")
def job_out(ray4, tmp_path_factory):
    """Two shards of real JPEG/PNG/WebP/GIF bytes and one of each bad kind (truncated, not an image, no image...),
    tokenized by the job: (shard paths, OUT, key -> expected reason or None)."""
    from vqpipe.job import tokenize

    d = tmp_path_factory.mktemp("shards")
    expected = {}
    for i in range(2):
        samples, reasons = defect_samples(seed=10 + i)
        write_shard(d / f"part-{i}.tar", samples)
        expected.update(reasons)
    out = tmp_path_factory.mktemp("job") / "tokens"
    cfg = {"inputs": [str(d)], "output": str(out), "model": {"preset": "tiny", "random_weights": True}}
    summary = tokenize(build_config({**cfg, "encode": {"batch_size": 4}, "run": {"max_error_rate": 0.9}}))
    assert summary.ok
    return sorted(glob.glob(f"{d}/*.tar")), out, expected


def job_rows(out):
    ledger = Ledger(str(out))
    rows, errors = {}, {}
    for sid in ledger.done_ids():
        table = pq.read_table(ledger.data_url(sid))
        codes, vi = fixed_list_to_numpy(table["codes"]), fixed_list_to_numpy(table["var_input"])
        rows.update({k: (codes[i], vi[i], table.schema) for i, k in enumerate(table["key"].to_pylist())})
        errors.update({r["key"]: r["reason"] for r in pq.read_table(ledger.errors_url(sid)).to_pylist()})
    return rows, errors


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["numpy", "pandas"])
def test_map_batches_tokenize_equals_the_job_bit_for_bit(job_out, fmt):
    import ray.data

    paths, out, expected = job_out
    rows, errors = job_rows(out)
    ds = ray.data.read_webdataset(paths, decoder=None).map_batches(
        Tokenize,
        fn_constructor_kwargs=TINY,
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=5,  # not the job's 4: codes do not depend on the batch
        batch_format=fmt,
    )
    got = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    assert Counter(got["key"].to_pylist()) == Counter({k: 1 for k in expected})
    schema = next(iter(rows.values()))[2]
    for name in ("codes", "var_input", "label", "meta"):
        assert got.schema.field(name).type == schema.field(name).type
    good = got.filter(pc.is_null(got["error"]))
    assert sorted(good["key"].to_pylist()) == sorted(rows)
    codes, vi = fixed_list_to_numpy(good["codes"]), fixed_list_to_numpy(good["var_input"])
    for i, key in enumerate(good["key"].to_pylist()):
        assert np.array_equal(codes[i], rows[key][0]) and np.array_equal(vi[i], rows[key][1]), key
    bad = got.filter(pc.invert(pc.is_null(got["error"])))
    assert dict(zip(bad["key"].to_pylist(), bad["error"].to_pylist())) == errors
    assert set(errors.values()) >= {"truncated", "not_an_image", "missing_image", "decode_error", "too_large"}


@pytest.fixture(scope="module")
def tokens_out(tmp_path_factory):
    """An OUT whose committed rows lie in a compacted file (by row ranges: one shard was committed again since),
    in data files, and not in an uncommitted data file: key -> the row."""
    d = tmp_path_factory.mktemp("tokens") / "out"
    expected = write_out(d, {"a": 11, "b": 0, "c": 6, "d": 20}, rows_per_group=4, uncommitted={"g": 5})
    compact(CompactOptions(str(d), target_rows=100))
    expected.update(write_out(d, {"c": 6}))  # c again: its compacted rows no longer count
    ledger = Ledger(str(d))
    ledger.mark_done("c", {**ledger.read_done("c").to_json(), "started": 1234.5})
    assert any(s.ranges for s in read_sources(str(d)))
    return d, expected


@pytest.mark.slow
def test_read_tokens_gives_every_committed_row_once_as_torch_batches(ray4, tokens_out, tmp_path):
    d, expected = tokens_out
    ds = read_tokens(str(d), columns=("key", "label", "codes", "var_input", "meta"))
    seen = Counter()
    for batch in ds.iter_torch_batches(batch_size=8, collate_fn=TokenCollate()):
        b = var_batch(batch)  # VAR's names, as the trainer takes them
        assert b["gt_BL"].dtype == batch["codes"].dtype == torch.int64
        assert (
            tuple(batch["var_input"].shape[1:]) == (29, 8) and b["x_BLCv_wo_first_l"].dtype.is_floating_point
        )
        for i, key in enumerate(batch["key"]):
            seen[key] += 1
            want = expected[key]
            assert np.array_equal(batch["codes"][i].numpy(), want["codes"].astype(np.int64))
            assert np.array_equal(batch["var_input"][i].numpy(), want["var_input"])
            assert batch["label"][i].item() == (-1 if want["label"] is None else want["label"])
            assert batch["meta"][i] == want["meta"]
    assert seen == Counter({k: 1 for k in expected})
    numeric = read_tokens(str(d), columns=("label", "codes"))  # no strings: Ray's default collate takes it
    assert sum(len(b["codes"]) for b in numeric.iter_torch_batches(batch_size=16)) == len(expected)
    views = write_out(
        tmp_path / "views", {"v": 3}, views=("center", "tl")
    )  # a row per view, `view` read as str
    rows = read_tokens(str(tmp_path / "views"), columns=("key", "view", "codes")).take_all()
    assert sorted((r["key"], r["view"]) for r in rows) == sorted(views)
    with pytest.raises(StorageError, match="no column.*nope"):
        read_tokens(str(d), columns=("codes", "nope"))
    with pytest.raises(StorageError, match="not a vqpipe output"):
        read_tokens(str(d.parent / "nothing"))


@pytest.mark.slow
def test_train_ray_example_sees_each_committed_row_at_most_once_per_epoch(ray4, tokens_out, tmp_path):
    d, expected = tokens_out  # 37 rows: an equal split over 2 workers leaves one out
    spec = importlib.util.spec_from_file_location("train_ray", REPO / "examples" / "train_ray.py")
    example = importlib.util.module_from_spec(spec)
    sys.modules["train_ray"] = example
    spec.loader.exec_module(example)
    keys = tmp_path / "keys"
    keys.mkdir()
    args = [str(d), "--workers", "2", "--epochs", "2", "--batch-size", "4", "--log-keys", str(keys)]
    metrics = example.main([*args, "--storage", str(tmp_path / "runs"), "--name", "toy"])
    assert metrics["epoch"] == 1 and metrics["rows"] == len(expected) // 2
    saved = (tmp_path / "runs" / "toy").glob("checkpoint_*/state.pt")  # Ray Train's, one per epoch
    assert sorted(torch.load(p, weights_only=True)["epoch"] for p in saved) == [0, 1]
    for epoch in (0, 1):
        per_worker = [(keys / f"keys-epoch{epoch}-rank{r}.txt").read_text().split() for r in (0, 1)]
        assert len(per_worker[0]) == len(per_worker[1])  # an equal split: DDP steps in lockstep
        seen = Counter(k for ks in per_worker for k in ks)
        assert set(seen) <= set(expected) and max(seen.values()) == 1
        assert len(expected) - len(seen) < 2  # fewer rows left out than workers
