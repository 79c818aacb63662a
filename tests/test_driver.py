"""The driver's stops and faults: SIGTERM/SIGINT mid-run, a full disk under OUT, and bad input or checkpoints
caught before OUT is touched or Ray starts."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from shards import defect_samples, write_not_a_tar, write_shard
from test_cluster import check_exactly_once, write_good_shard

from vqpipe.cli import main
from vqpipe.model import build_model
from vqpipe.plan import shard_id

TINY = ["--model", "tiny", "--batch-size", "2"]


# -- checked before OUT is touched or Ray starts (no Ray: fast) ---------------------------------------------------


@pytest.fixture
def run_without_ray(monkeypatch, driver_log):
    """main(argv) in-process with a tripwire on starting Ray: (exit code, log lines)."""
    from vqpipe import cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cluster, "connect", no_ray)

    def run(argv: list[str]) -> tuple[int, str]:
        rc = main(argv)
        assert all(r.exc_info is None for r in driver_log)  # no traceback logged
        return rc, "\n".join(r.getMessage() for r in driver_log)

    return run


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("one-shard")
    write_good_shard(d / "s-0000.tar", 2)
    return d


def test_a_mistyped_input_fails_before_out_exists(one_shard, tmp_path, run_without_ray):
    out = tmp_path / "out"
    rc, log = run_without_ray(
        ["tokenize", str(one_shard / "s-00*.tra"), "--output", str(out), *TINY, "--random-weights"]
    )
    assert rc == 2 and "s-00*.tra" in log, log
    assert not out.exists()


def test_a_checkpoint_that_does_not_fit_fails_on_the_driver_before_out_and_ray(
    one_shard, tmp_path, run_without_ray
):
    wrong = {k: v for k, v in build_model("tiny").state_dict().items() if not k.startswith("decoder.")}
    ckpt = tmp_path / "vae.pth"
    torch.save(wrong, ckpt)
    out = tmp_path / "out"
    rc, log = run_without_ray(
        ["tokenize", str(one_shard), "--output", str(out), *TINY, "--checkpoint", str(ckpt)]
    )
    assert rc == 2 and not out.exists()
    assert f"checkpoint {ckpt} does not fit the model" in log and "missing key(s): decoder." in log, log


def test_an_unreadable_checkpoint_fails_on_the_driver(one_shard, tmp_path, run_without_ray):
    ckpt = tmp_path / "vae.pth"
    ckpt.write_bytes(b"<html>not found</html>")
    out = tmp_path / "out"
    rc, log = run_without_ray(
        ["tokenize", str(one_shard), "--output", str(out), *TINY, "--checkpoint", str(ckpt)]
    )
    assert rc == 2 and not out.exists() and "not a PyTorch file" in log, log


def test_a_good_checkpoint_passes_the_driver_check_with_its_sha256(tmp_path):
    import hashlib

    from vqpipe.model.checkpoint import verify_checkpoint

    ckpt = tmp_path / "vae.pth"
    torch.save(build_model("tiny", seed=3).state_dict(), ckpt)
    assert verify_checkpoint(str(ckpt), "tiny") == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_a_full_disk_at_the_start_is_one_clear_error(one_shard, tiny_disk, driver_log):
    (tiny_disk / "filler").write_bytes(b"f" * 256 * 1024)
    out = tiny_disk / "out"
    rc = main(["tokenize", str(one_shard), "--output", str(out), *TINY, "--random-weights"])
    assert rc == 2
    errors = [r.getMessage() for r in driver_log if r.levelno >= logging.ERROR]
    # The run's lease is the first thing it writes into OUT.
    assert errors == [f"{out}/_vqpipe/lease.json: cannot write (OSError: [Errno 28] No space left on device)"]
    assert all(r.exc_info is None for r in driver_log)


# -- on a real Ray ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_mid_run_ends_with_the_error_and_the_summary(ray_session, tmp_path, driver_log):
    """The driver records a failed shard in OUT/_vqpipe/failed/, which is a full filesystem of its own."""
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    write_good_shard(shard_dir / "good-0000.tar", 3)
    write_not_a_tar(shard_dir / "bad-0000.tar")
    out = tmp_path / "out"
    (out / "_vqpipe" / "failed").mkdir(parents=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(out / "_vqpipe" / "failed")],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        (out / "_vqpipe" / "failed" / "filler").write_bytes(b"f" * 16 * 1024)
        rc = main(
            [
                "tokenize",
                str(shard_dir),
                "--output",
                str(out),
                *TINY,
                "--random-weights",
                "--max-attempts",
                "1",
            ]
        )
    finally:
        subprocess.run(["umount", "-l", str(out / "_vqpipe" / "failed")], check=False)
    assert rc == 1
    log = [r.getMessage() for r in driver_log]
    assert any(m.startswith("summary: ") and "/2 shards done" in m for m in log), log
    want = (
        f"the driver cannot write the output: {out}/_vqpipe/failed/{shard_id(str(shard_dir / 'bad-0000.tar'))}.json: "
        "cannot write "
        "(OSError: [Errno 28] No space left on device); rerun to resume"
    )
    assert want in log, log
    assert all(r.exc_info is None for r in driver_log)


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("stop-shards")
    for i in range(8):
        samples, _ = defect_samples(seed=40 + i)
        write_shard(d / f"s-{i:04d}.tar", samples)
    return d


def stop_mid_run(cmd: list[str], out, signum: int) -> str:
    """Run `cmd`, send `signum` once a shard more than before is committed; returns the log (stderr)."""
    before = len(list((out / "_vqpipe" / "done").glob("*.json")))
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "_vqpipe" / "done").glob("*.json"))) <= before:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # Ctrl-C in a terminal: the whole foreground process group
        else:
            os.kill(proc.pid, signum)  # `ray job stop`, a pod's shutdown: the driver
        _, log = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, log[-3000:]  # 143, 130
    assert f"{name}: stopping; no new shards" in log
    assert f"{name}: interrupted; rerun to resume" in log
    assert "vqpipe.cli -- summary: " in log and "Traceback" not in log, log[-3000:]
    assert len(list((out / "_vqpipe" / "done").glob("*.json"))) < 8, "the stop should land mid-run"
    return log


@pytest.mark.slow
def test_stopped_runs_say_so_and_a_rerun_completes_them(ray_session, eight_shards, tmp_path):
    """SIGTERM with the default grace: the running shards commit. SIGINT with no grace: they are left behind
    and the rerun redoes them. Every key ends up exactly once."""
    out = tmp_path / "out"
    config = tmp_path / "job.toml"
    args = [str(eight_shards), "--output", str(out), *TINY, "--random-weights", "--config", str(config)]
    # The drivers join this process's local Ray (a cluster start less for each); the actors are theirs.
    address = ["--address", ray_session.get_runtime_context().gcs_address]
    config.write_text("[run]\nmax_error_rate = 0.6\nreplicas = 1\n")
    stop_mid_run([sys.executable, "-m", "vqpipe.cli", "tokenize", *args, *address], out, signal.SIGTERM)
    config.write_text("[run]\nmax_error_rate = 0.6\nreplicas = 1\nstop_grace_s = 0\n")
    log = stop_mid_run([sys.executable, "-m", "vqpipe.cli", "tokenize", *args, *address], out, signal.SIGINT)
    assert "waiting up to 0s" in log

    assert main(["tokenize", *args]) == 0  # on this process's Ray: one cluster start less
    check_exactly_once(out, eight_shards)


def test_stop_request_takes_the_first_signal_and_a_second_one_hurries():
    from vqpipe.stop import StopRequest

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    assert stop.install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled between two bytecodes
        time.sleep(0.01)
        assert stop.requested and not stop.hurry and (stop.name, stop.exit_code) == ("SIGTERM", 143)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.hurry and stop.exit_code == 143  # the first signal decides the exit code
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
