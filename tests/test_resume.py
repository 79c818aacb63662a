"""Kill -9 the whole job (driver, its local Ray and the actors) mid-run, rerun, and compare with a clean run."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest
from shards import defect_samples, write_shard
from test_job import job_config

from vqpipe.job import tokenize

pytestmark = pytest.mark.slow

SHARDS = 6


def output_keys(out):
    keys = Counter()
    for path in (out / "data").glob("[!.]*.parquet"):
        keys.update(pq.read_table(path, columns=["key"]).column("key").to_pylist())
    return keys


def cli(inputs, out):
    return [
        sys.executable,
        "-m",
        "vqpipe.cli",
        "tokenize",
        str(inputs),
        "--output",
        str(out),
        "--model",
        "tiny",
        "--random-weights",
        "--batch-size",
        "2",
        "--max-error-rate",
        "0.6",
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume-shards")
    for i in range(SHARDS):
        samples, _ = defect_samples(seed=100 + i)
        if i % 2:  # uneven shard sizes
            samples += defect_samples(seed=200 + i)[0] + defect_samples(seed=300 + i)[0]
        write_shard(d / f"s-{i:04d}.tar", samples)
    return d


def test_sigkill_mid_run_then_rerun_gives_exactly_the_clean_output(ray_session, shards, tmp_path):
    reference = tmp_path / "reference"
    assert tokenize(job_config([shards], reference, run={"max_error_rate": 0.6})).ok
    expected = output_keys(reference)
    assert max(expected.values()) == 1

    out = tmp_path / "killed"
    env = {**os.environ, "VQPIPE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        cli(shards, out), env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "_vqpipe" / "done").glob("*.json"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray processes and the actors, at once
    proc.wait()
    committed = {p.stem: p.stat().st_mtime_ns for p in (out / "_vqpipe" / "done").glob("*.json")}
    assert 2 <= len(committed) < SHARDS, "the kill should land mid-run"
    # Whatever the kill left, a data file is either complete (readable) or absent under its final name.
    for path in (out / "data").glob("[!.]*.parquet"):
        pq.read_metadata(path)

    res = subprocess.run(cli(shards, out), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert output_keys(out) == expected
    assert {p.stem for p in (out / "_vqpipe" / "done").glob("*.json")} == {
        p.stem for p in (out / "data").glob("*.parquet")
    }
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    for shard_id, mtime in committed.items():  # committed shards were not redone
        assert (out / "_vqpipe" / "done" / f"{shard_id}.json").stat().st_mtime_ns == mtime
