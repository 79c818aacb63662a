"""benchmarks/bench_reader.py still runs and prints every row of its tables (small sizes: not a speed test)."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_reader_prints_its_tables():
    cmd = [sys.executable, "benchmarks/bench_reader.py", "--shards", "2", "--rows", "64", "--vi-rows", "16"]
    cmd += ["--repeats", "1", "--batch", "16", "--builder-rows", "8"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    for row in ("| codes only | 128 |", "| with var_input | 32 |", "| 1.1 nested fixed_size_list |"):
        assert row in run.stdout, run.stdout
    assert "VarInputBuilder (var256, CPU" in run.stdout
