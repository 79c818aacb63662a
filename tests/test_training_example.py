"""examples/train_ddp.py under torchrun: 2 CPU processes, gloo on loopback, stopped and resumed mid-epoch."""

import os
import socket
import subprocess
import sys
from collections import Counter

import pytest
from conftest import REPO
from tokens import write_out

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out, ckpt, steps):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    cmd += [str(REPO / "examples" / "train_ddp.py"), str(out), "--steps", str(steps), "--batch-size", "4"]
    cmd += ["--ckpt", str(ckpt), "--log-keys"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_ddp_example_trains_resumes_and_sees_every_row_once_per_epoch(tmp_path):
    expected = write_out(
        tmp_path / "out", {"a": 13, "b": 0, "c": 10}, labeled=True
    )  # 23 rows, some unlabeled
    ckpt = tmp_path / "ckpt"
    first = torchrun(tmp_path / "out", ckpt, steps=2)
    assert "step 2 loss" in first and "step 3" not in first
    second = torchrun(tmp_path / "out", ckpt, steps=5)  # resumes at step 2: 1 step ends epoch 0, 2 of epoch 1
    assert "resumed at step 2" in second and "epoch 0 step 3" in second and "epoch 1 step 5" in second
    per_rank = [(ckpt / f"keys-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert [len(k) for k in per_rank] == [20, 20]  # 5 steps of 4 rows on each rank
    epoch0 = Counter(k for keys in per_rank for k in keys[:12])  # 12 = ceil(23 / 2) rows per rank
    assert set(epoch0) == set(expected) and sum(epoch0.values()) == 24  # every row; one fill row repeats
