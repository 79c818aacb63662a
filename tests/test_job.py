"""End to end on a real local Ray: generated shards with bad samples and damaged shards, accounting, exactness,
plain readers, rerun idempotence, and the CLI's error paths."""

import json
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from shards import defect_samples, write_not_a_tar, write_shard, write_truncated_tar

from vqpipe.cli import main
from vqpipe.config import CPU_ALLOCATOR_ENV, build_config
from vqpipe.data import fixed_list_to_numpy
from vqpipe.job import tokenize
from vqpipe.model import build_model, exact_mode
from vqpipe.plan import shard_id as url_shard_id
from vqpipe.preprocess import IMAGE_EXTENSIONS, preprocess

pytestmark = pytest.mark.slow


def job_config(inputs, output, **sections):
    data = {
        "inputs": [str(i) for i in inputs],
        "output": str(output),
        "model": {"preset": "tiny", "random_weights": True},
        "encode": {"batch_size": 4},
        "run": {"max_error_rate": 0.6, "max_attempts": 2, "retry_backoff_s": 0.1, "progress_interval_s": 1},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return build_config(data)


def sid(d, name):
    """The shard id of input `d/<name>.tar`."""
    return url_shard_id(str(d / f"{name}.tar"))


def tar_keys(path):
    with tarfile.open(path) as tf:
        return sorted({m.name.split(".", 1)[0] for m in tf.getmembers()})


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Three good-but-defective shards, one that is not a tar, one cut off in the middle."""
    d = tmp_path_factory.mktemp("shards")
    expected = {}
    for i in range(3):
        samples, reasons = defect_samples(seed=i)
        write_shard(d / f"part-{i:06d}.tar", samples)
        expected[f"part-{i:06d}"] = reasons
    write_not_a_tar(d / "part-000003.tar")
    samples, _ = defect_samples(seed=9)
    write_truncated_tar(d / "part-000004.tar", samples)
    return d, expected


@pytest.fixture(scope="module")
def first_run(ray_session, shard_dir, tmp_path_factory):
    d, expected = shard_dir
    out = tmp_path_factory.mktemp("out") / "tokens"
    summary = tokenize(job_config([d], out))
    return summary, out, expected


def test_good_shards_land_and_damaged_shards_fail_with_reason(first_run, shard_dir):
    summary, out, _ = first_run
    d, _ = shard_dir
    assert not summary.ok
    bad, cut = sid(d, "part-000003"), sid(d, "part-000004")
    assert sorted(summary.failed) == [bad, cut]
    assert summary.failed[bad]["reason"] == "not_a_tar"
    assert summary.failed[cut]["reason"] == "truncated_tar"
    assert summary.failed[bad]["attempts"] == 1  # a permanent reason: not retried
    assert summary.failed[cut]["attempts"] == 2
    assert sorted(p.stem for p in (out / "data").iterdir()) == [sid(d, f"part-00000{i}") for i in range(3)]
    assert sorted(p.stem for p in (out / "_vqpipe" / "failed").iterdir()) == [bad, cut]
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    # The OUT a real run leaves is a dataset: rows under data/, everything else hidden from readers of OUT
    assert sorted(p.name for p in out.iterdir()) == [".huggingface.yaml", "_vqpipe", "data"]
    assert pq.read_table(out).num_rows == summary.status.rows


def test_every_sample_is_a_row_or_an_error_with_its_reason(first_run, shard_dir):
    _, out, expected = first_run
    d, _ = shard_dir
    for name, reasons in expected.items():
        shard_id = sid(d, name)
        rows = pq.read_table(out / "data" / f"{shard_id}.parquet", columns=["key"]).column("key").to_pylist()
        errors = pq.read_table(out / "_vqpipe" / "errors" / f"{shard_id}.pq").to_pylist()
        assert len(rows) == len(set(rows))
        assert sorted(rows + [e["key"] for e in errors]) == tar_keys(d / f"{name}.tar")
        assert {e["key"]: e["reason"] for e in errors} == {k: r for k, r in reasons.items() if r is not None}
        assert all(e["detail"] for e in errors)
        done = json.loads((out / "_vqpipe" / "done" / f"{shard_id}.json").read_text())
        assert done["samples"] == len(tar_keys(d / f"{name}.tar"))
        assert done["rows"] + done["errors"] == done["samples"]
        assert set(done["seconds"]) >= {"read", "decode", "encode", "write"}
        assert done["allocator_env"] == CPU_ALLOCATOR_ENV  # CPU replicas keep freed memory by default
        assert done["decode_threads"] == 2  # the local cluster's 2 CPUs, given to its one replica


def test_codes_and_var_input_equal_the_model_computed_directly(first_run, shard_dir):
    _, out, _ = first_run
    d, _ = shard_dir
    model = build_model("tiny", seed=0)
    table = pq.read_table(out / "data" / f"{sid(d, 'part-000001')}.parquet")
    members = {}
    with tarfile.open(d / "part-000001.tar") as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            if ext in IMAGE_EXTENSIONS and key not in members:
                members[key] = tf.extractfile(m).read()
    meta = json.loads(table.schema.metadata[b"vqpipe"])
    offsets, batch = meta["scale_offsets"], meta["batch_size"]
    rows = table.to_pylist()
    var_inputs = fixed_list_to_numpy(table.column("var_input"))
    pixels = np.stack([preprocess(members[r["key"]], 64) for r in rows])
    # Same batches as the job (SPEC §4: bitwise results are defined per device, dtype and batch composition).
    for start in range(0, len(rows), batch):
        x = torch.from_numpy(pixels[start : start + batch]).float() / 255 * 2 - 1
        with exact_mode(), torch.inference_mode():
            idx = model.img_to_idxBl(x)
            expected_vi = model.idxBl_to_var_input(idx).to(torch.float16).numpy()
        for i, row in enumerate(rows[start : start + batch]):
            codes = np.asarray(row["codes"])
            for k, scale in enumerate(idx):
                assert codes[offsets[k] : offsets[k + 1]].tolist() == scale[i].tolist()
        assert np.array_equal(var_inputs[start : start + batch], expected_vi)


def test_file_metadata_describes_the_tokens(first_run, shard_dir):
    _, out, _ = first_run
    meta = json.loads(
        pq.read_schema(out / "data" / f"{sid(shard_dir[0], 'part-000000')}.parquet").metadata[b"vqpipe"]
    )
    assert meta["patch_nums"] == [1, 2, 3, 4]
    assert meta["scale_offsets"] == [0, 1, 5, 14, 30]
    assert meta["vocab_size"] == 64 and meta["cvae"] == 8 and meta["resolution"] == 64
    assert meta["var_input"] == {"shape": [29, 8], "dtype": "float16"}
    assert meta["precision"]["mode"] == "exact"
    assert meta["model"]["sha256"]
    assert meta["format_version"] == "2.0"


def test_output_reads_without_vqpipe(first_run):
    """pyarrow (var_input 2-D per row), pandas and DuckDB read the files in a process that never imports vqpipe."""
    _, out, _ = first_run
    code = f"""
import sys, pyarrow.parquet as pq, pandas as pd, duckdb
path = {str(sorted((out / "data").glob("part-000000-*.parquet"))[0])!r}
t = pq.read_table(path)
vi = t.column("var_input").combine_chunks().flatten().flatten().to_numpy().reshape(t.num_rows, 29, 8)
assert vi.shape == (t.num_rows, 29, 8) and vi.dtype.name == "float16", vi.shape
df = pd.read_parquet(path)
assert len(df) == t.num_rows and len(df.codes[0]) == 30
(n, L, R, C), = duckdb.sql(
    f"select count(*), max(len(codes)), max(len(var_input)), max(len(var_input[1])) from '{{path}}'"
).fetchall()
assert (n, L, R, C) == (t.num_rows, 30, 29, 8)
assert not [m for m in sys.modules if m.startswith("vqpipe")]
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr


def test_rerun_skips_done_shards_and_retries_only_failed_ones(first_run, shard_dir):
    summary, out, _ = first_run
    d, _ = shard_dir
    bad = [sid(d, "part-000003"), sid(d, "part-000004")]  # not a tar; truncated: what the input holds
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    again = tokenize(job_config([d], out))  # their inputs are unchanged: they stay failed, not retried
    assert not again.plan.todo and sorted(s.shard_id for s in again.plan.kept_failed) == bad
    assert sorted(again.kept_failed) == bad and not again.failed and not again.ok
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == before
    retried = tokenize(job_config([d], out, run={"retry_failed": True}))
    assert sorted(s.shard_id for s in retried.plan.todo) == bad
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == before
    assert sorted(retried.failed) == bad


def test_cli_exit_codes_and_status(first_run, shard_dir, capsys):
    _, out, _ = first_run
    d, _ = shard_dir
    assert main(["status", str(out)]) == 1
    text = capsys.readouterr().out
    assert "3 done, 2 failed, 0 pending" in text and "not_a_tar" in text
    good = out.parent / "good"
    args = [
        "tokenize",
        str(d / "part-000000.tar"),
        str(d / "part-00000[12].tar"),
        "--output",
        str(good),
        "--model",
        "tiny",
        "--random-weights",
        "--max-error-rate",
        "0.6",
        "--batch-size",
        "4",
    ]
    assert main(args) == 0
    assert main(["status", str(good), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["shards"] == {"planned": 3, "done": 3, "failed": 0, "pending": 0}


# The usage errors (bad settings, unknown keys, missing inputs) are unit tests: tests/test_cli.py.


def test_rerun_with_different_output_settings_is_refused(first_run, shard_dir, caplog):
    _, out, _ = first_run
    d, _ = shard_dir
    args = ["tokenize", str(d), "--output", str(out), "--model", "tiny", "--random-weights", "--no-var-input"]
    assert main(args) == 2  # another token layout: refused even with --allow-config-change
    assert "another layout" in caplog.text and "var_input" in caplog.text
    assert main([*args, "--allow-config-change"]) == 2


def test_ray_data_recipe_and_token_dataset_read_the_output(first_run):
    """Ray Data with docs/training.md's collate recipe (int64 codes, 2-D var_input, strings left out), and
    vqpipe.data.TokenDataset, on a Ray-made OUT: the same rows as pyarrow reads."""
    import pyarrow as pa
    import ray.data
    from ray.data.collate_fn import ArrowBatchCollateFn
    from torch.utils.data import DataLoader

    from vqpipe.data import TokenDataset

    _, out, _ = first_run

    class VarCollate(ArrowBatchCollateFn):  # as in docs/training.md
        def __call__(self, t: pa.Table) -> dict:
            return {
                "label": torch.from_numpy(t["label"].fill_null(-1).to_numpy()),
                "codes": torch.from_numpy(fixed_list_to_numpy(t["codes"]).astype(np.int64)),
                "var_input": torch.from_numpy(fixed_list_to_numpy(t["var_input"])),
            }

    ds = ray.data.read_parquet(str(out / "data"), columns=["label", "codes", "var_input"])
    batch = next(iter(ds.iter_torch_batches(batch_size=8, collate_fn=VarCollate())))
    assert batch["codes"].dtype == torch.int64 and batch["codes"].shape == (8, 30)
    assert batch["var_input"].shape == (8, 29, 8) and batch["var_input"].dtype == torch.float16
    assert batch["label"].dtype == torch.int64

    table = pq.ParquetDataset(str(out / "data")).read()
    by_key = dict(zip(table["key"].to_pylist(), fixed_list_to_numpy(table["codes"])))
    loader = DataLoader(TokenDataset(str(out), columns=("codes", "label", "var_input")), batch_size=8)
    seen = 0
    for b in loader:
        for key, codes in zip(b["key"], b["codes"]):
            assert codes.tolist() == by_key[key].tolist()
            seen += 1
    assert seen == table.num_rows == len(by_key)


# A replica that cannot be placed: tests/test_cluster.py (TestElastic), on a cluster of several nodes.


def test_fast_modes_are_recorded_and_measured_against_exact(ray_session, shard_dir, tmp_path):
    d, _ = shard_dir
    out = tmp_path / "fast"
    cfg = job_config(
        [d / "part-000000.tar"],
        out,
        model={"precision": "bf16", "channels_last": True},
        run={"tune_cpu_allocator": False},
    )
    assert tokenize(cfg).ok
    done = json.loads((out / "_vqpipe" / "done" / f"{sid(d, 'part-000000')}.json").read_text())
    assert done["precision"] == "bf16+channels_last"
    agreement = done["agreement_with_exact"]
    assert agreement["mode"] == "bf16+channels_last" and len(agreement["per_scale"]) == 4
    assert 0.5 < agreement["overall"] <= 1.0
    assert done["allocator_env"] == {}  # opted out: the actor runs with the allocator's defaults
    meta = json.loads(pq.read_schema(next((out / "data").glob("*.parquet"))).metadata[b"vqpipe"])
    assert meta["precision"]["mode"] == "bf16+channels_last" and meta["precision"]["channels_last"] is True
    run = json.loads((out / "_vqpipe" / "run.json").read_text())
    assert run["output_settings"]["channels_last"] is True and "compile" not in run["output_settings"]
