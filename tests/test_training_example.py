"""examples/train_ddp.py as torchrun runs it (2 CPU processes, gloo), stopped and resumed mid-epoch.

The two processes are started here with the environment torchrun gives them (RANK, WORLD_SIZE, LOCAL_RANK) and a
file:// rendezvous: torchrun's and env://'s TCPStore listen on every interface, and tests listen on loopback only
(gloo itself is pinned to `lo`)."""

import os
import subprocess
import sys
from collections import Counter

import pytest
from conftest import REPO
from tokens import write_out


def run_ddp(out, ckpt, steps):
    init = f"file://{ckpt.parent / f'rendezvous-{steps}'}"
    cmd = [sys.executable, str(REPO / "examples" / "train_ddp.py"), str(out), "--steps", str(steps)]
    cmd += ["--batch-size", "4", "--ckpt", str(ckpt), "--log-keys", "--init-method", init]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    return results[0][0] + results[1][0]


@pytest.mark.slow
def test_ddp_example_trains_resumes_and_sees_every_row_once_per_epoch(tmp_path):
    expected = write_out(
        tmp_path / "out", {"a": 13, "b": 0, "c": 10}, labeled=True
    )  # 23 rows, some unlabeled
    ckpt = tmp_path / "ckpt"
    first = run_ddp(tmp_path / "out", ckpt, steps=2)
    assert "step 2 loss" in first and "step 3" not in first
    second = run_ddp(tmp_path / "out", ckpt, steps=5)  # resumes at step 2: 1 step ends epoch 0, 2 of epoch 1
    assert "resumed at step 2" in second and "epoch 0 step 3" in second and "epoch 1 step 5" in second
    per_rank = [(ckpt / f"keys-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert [len(k) for k in per_rank] == [20, 20]  # 5 steps of 4 rows on each rank
    epoch0 = Counter(k for keys in per_rank for k in keys[:12])  # 12 = ceil(23 / 2) rows per rank
    assert set(epoch0) == set(expected) and sum(epoch0.values()) == 24  # every row; one fill row repeats


def _example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_ddp", REPO / "examples" / "train_ddp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("damage", ["killed mid-save", "newest damaged"])
def test_a_kill_during_a_save_leaves_a_loadable_checkpoint(tmp_path, damage):
    """Issue 22: torch.save straight onto the path left an unloadable checkpoint when killed mid-save."""
    ex = _example()
    path = tmp_path / "rank0.pt"
    ex.save_atomically({"step": 1}, path)
    ex.save_atomically({"step": 2}, path)
    if damage == "killed mid-save":  # the temporary is what a kill leaves; the checkpoint is untouched
        (tmp_path / ".rank0.pt.tmp-999").write_bytes(b"PK\x03\x04 half a zip")
        assert ex.load_last_good(path) == {"step": 2}
    else:  # damaged by something else (a full disk at the storage layer, a bad copy): the previous one loads
        path.write_bytes(path.read_bytes()[:20])
        assert ex.load_last_good(path) == {"step": 1}
    assert ex.load_last_good(tmp_path / "none.pt") is None
