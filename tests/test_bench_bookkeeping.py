"""benchmarks/bench_bookkeeping.py still runs and reports what docs/scale.md quotes: a smoke run on tiny
shard sets (the real sizes take minutes), locally and on moto."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # starts a moto server and a dozen Python processes


def test_bookkeeping_benchmark_reports_times_and_request_counts(tmp_path):
    out = tmp_path / "bookkeeping.json"
    cmd = [sys.executable, "benchmarks/bench_bookkeeping.py", "--sizes", "20", "--s3-shards", "6"]
    cmd += ["--s3-committed", "2", "--out", str(out), "--work", str(tmp_path / "not" / "yet")]  # made here
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    (row,) = results["local"]
    for key in ("rerun_after_first", "rerun_after", "status_after", "dataset_after_first", "dataset_after"):
        assert row[key]["seconds"] > 0 and 20 < row[key]["rss_mib"] < 2000, row
    s3 = results["s3"]
    beyond_input = {k: v for k, v in s3["per_shard_after"].items() if not k.endswith(" input")}
    assert sum(beyond_input.values()) <= 5, s3["per_shard_after"]
    assert s3["per_shard_after"]["HEAD input"] <= 2  # the open's, and the check after reading
    assert "GET done/" in s3["noop_after_first"] and "GET done/" not in s3["noop_after_second"], s3
    assert "| 20 | no-op rerun |" in run.stdout and "| 20 | `TokenDataset(OUT)` |" in run.stdout
