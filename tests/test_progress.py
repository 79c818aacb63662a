"""The driver's progress: a live bar on an interactive terminal (a real pseudo-terminal here), log lines elsewhere."""

import fcntl
import io
import logging
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import pytest
from shards import good_image_bytes, write_shard

from vqpipe.progress import Progress, Tick, progress_bar
from vqpipe.records import DoneRecord

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def terminal(rows=24, columns=160):
    """A pseudo-terminal of `rows` × `columns` (a fresh one reports 0 × 0): (master fd, slave fd)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return master, slave


def replicas(live, pending=0):
    return Tick(replicas_live=live, replicas_pending=pending, shards_queued=0, shards_running=0, retries=0)


def read_all(fd, timeout=0.5):
    out = b""
    while select.select([fd], [], [], timeout)[0]:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:  # the other side closed (Linux reports EIO)
            break
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def test_a_terminal_gets_a_live_bar_with_shards_rate_errors_and_eta():
    master, slave = terminal()
    with os.fdopen(slave, "w") as tty:
        bar = progress_bar(4, tty)
        assert bar is not None
        progress = Progress(total=4, interval_s=10.0, renderer=bar)
        progress.record(DoneRecord(rows=30, images=30, errors=2))
        progress.tick(replicas(2))
        progress.record(DoneRecord(rows=10, errors=0))
        progress.failed += 1
        progress.tick(replicas(1, pending=1))
        bar.close()
        shown = read_all(master)
    os.close(master)
    last = shown.replace("\r\n", "\n").split("\r")[-1]  # the bar redraws in place
    assert "3/4 shards [" in last and "<" in last  # done + failed of total, elapsed<ETA
    assert "40 images (" in last and "/s)" in last and "2 errors" in last
    assert "1 shards failed" in last and "1 replicas (1 pending)" in last
    assert "\r" in shown


def test_no_bar_off_a_terminal_or_when_asked_and_progress_is_logged(caplog, monkeypatch):
    assert progress_bar(4, io.StringIO()) is None
    master, slave = terminal()
    with os.fdopen(slave, "w") as tty:
        monkeypatch.setenv("VQPIPE_PROGRESS", "lines")
        assert progress_bar(4, tty) is None
    os.close(master)
    progress = Progress(total=2, interval_s=0.0)
    progress.record(DoneRecord(rows=5, images=5, errors=1))
    with caplog.at_level(logging.INFO, logger="vqpipe"):
        progress.tick(replicas(1, pending=2))
    assert "progress: shards 1/2 done, 5 images" in caplog.text and "1 sample errors" in caplog.text
    assert caplog.text.rstrip().endswith("1 replicas (2 pending)")  # a replica not placed yet is not live


def test_a_terminal_that_reports_no_width_gets_log_lines(caplog):
    """A bar 0 columns wide shows nothing (tqdm draws an empty line), and it replaced the log lines: such a
    terminal (a fresh pty, some CI runners and container consoles) saw no progress at all."""
    for rows, columns in ((0, 0), (24, 0)):
        master, slave = terminal(rows, columns)
        with os.fdopen(slave, "w") as tty:
            assert progress_bar(4, tty) is None
        os.close(master)
    progress = Progress(total=4, interval_s=0.0, renderer=None)
    progress.record(DoneRecord(rows=3, images=3))
    with caplog.at_level(logging.INFO, logger="vqpipe"):
        progress.tick(replicas(1))
    assert "progress: shards 1/4 done" in caplog.text


@pytest.mark.slow
def test_tokenize_on_a_terminal_draws_the_bar(tmp_path):
    """The real command, with its stderr on a pseudo-terminal: the bar, then the summary line."""
    for i in range(2):
        samples = [{"__key__": f"k{i}_{j}", "jpg": good_image_bytes(j, "jpg", (40, 40))} for j in range(3)]
        write_shard(tmp_path / f"part-{i:06d}.tar", samples)
    master, slave = terminal()
    env = {**os.environ, "PYTHONPATH": REPO, "TERM": "xterm"}
    env.pop("VQPIPE_PROGRESS", None)
    cmd = [sys.executable, "-m", "vqpipe.cli", "tokenize", str(tmp_path), "--output", str(tmp_path / "out")]
    cmd += ["--model", "tiny", "--random-weights", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env, cwd=tmp_path)
    os.close(slave)
    shown = ""
    while True:
        chunk = read_all(master, 0.2)
        shown += chunk
        if not chunk and proc.poll() is not None:
            break
    os.close(master)
    assert proc.returncode == 0, shown[-3000:]
    assert "2/2 shards" in shown and "images (" in shown and "\r" in shown
    assert "summary: 2/2 shards done, 6 rows" in shown
