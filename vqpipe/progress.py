"""What the driver tells people while a run goes: `Progress` counts, and a live bar on an interactive terminal (tqdm).

Anywhere else (Ray job logs, CI, a pipe, a terminal that reports no width) `Progress` writes plain log lines
instead: a bar's carriage returns would make a log file unreadable, and a bar zero columns wide shows nothing. While the bar is shown, vqpipe's log lines are printed above it
(tqdm's logging redirect) instead of through it; lines that Ray's log monitor prints for the actors
are not log records and can still cross it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

from .records import DoneRecord

logger = logging.getLogger(__name__)

_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} shards [{elapsed}<{remaining}{postfix}]"
_LOGGERS = ("vqpipe", "ray")  # whose console lines are printed above the bar instead of through it


@dataclass(frozen=True)
class Tick:
    """What the dispatcher reports on each turn of its loop (progress, driver metrics, the lease's record)."""

    replicas_live: int
    replicas_pending: int  # asked for, not live: not placed yet, loading, or restarting
    shards_queued: int  # waiting for a replica, retries in backoff included
    shards_running: int  # copies running on replicas
    retries: int  # failed attempts retried so far


class TerminalBar:
    """Shards done/total with ETA, then images, images/s, sample errors, failed shards and replicas."""

    def __init__(self, total: int, stream: IO[str]):
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._stack = contextlib.ExitStack()
        self._bar = tqdm(total=total, file=stream, bar_format=_FORMAT, dynamic_ncols=True, smoothing=0.1)
        self._stack.callback(self._bar.close)
        self._stack.enter_context(
            logging_redirect_tqdm([logging.getLogger(n) for n in _LOGGERS], tqdm_class=tqdm)
        )

    def update(self, progress: Any, tick: Tick | None = None) -> None:
        """Redraw from a `Progress` (tqdm limits redraws to ten a second)."""
        elapsed = max(time.monotonic() - progress.started, 1e-9)
        parts = [f"{progress.images} images ({progress.images / elapsed:.1f}/s)", f"{progress.errors} errors"]
        if progress.failed:
            parts.append(f"{progress.failed} shards failed")
        if tick is not None:
            parts.append(replicas(tick))
        self._bar.set_postfix_str(", ".join(parts), refresh=False)
        self._bar.update(progress.done + progress.failed - self._bar.n)  # redraws (throttled)

    def close(self) -> None:
        self._stack.close()


def replicas(tick: Tick) -> str:
    pending = f" ({tick.replicas_pending} pending)" if tick.replicas_pending else ""
    return f"{tick.replicas_live} replicas{pending}"


def progress_bar(total: int, stream: IO[str] | None = None) -> TerminalBar | None:
    """A bar on an interactive terminal that reports its width; None (log lines) otherwise, or when
    VQPIPE_PROGRESS=lines."""
    stream = stream or sys.stderr
    interactive = hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"
    if not interactive or os.environ.get("VQPIPE_PROGRESS") == "lines" or not _columns(stream):
        return None
    try:
        return TerminalBar(total, stream)
    except ImportError:  # the bar is a nicety: without tqdm, the log lines still say everything
        logger.info("no progress bar: tqdm is not installed")
        return None


def _columns(stream: IO[str]) -> int:
    """The terminal's width; 0 when it reports none (a fresh pseudo-terminal, some CI runners): tqdm then draws
    an empty line, and the bar replaces the log lines, so nothing at all would be shown."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):  # no fileno, or not a terminal after all
        return 0


@dataclass
class Progress:
    """Driver-side progress lines: shards done/total, images/s, errors, ETA, live and pending replicas."""

    total: int
    interval_s: float
    done: int = 0
    failed: int = 0
    images: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    _last: float = 0.0
    renderer: Any = None  # a live bar on an interactive terminal (vqpipe.progress); None: log lines

    def record(self, rec: DoneRecord) -> None:
        self.done += 1
        self.images += rec.images if rec.images is not None else rec.rows  # markers before views: rows
        self.errors += rec.errors

    @property
    def rate(self) -> float:
        """Images per second since the run started."""
        return self.images / max(time.monotonic() - self.started, 1e-9)

    def line(self, tick: Tick | None = None) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.images / elapsed
        finished = self.done + self.failed
        eta = elapsed / finished * (self.total - finished) if finished else float("nan")
        parts = [
            f"shards {self.done}/{self.total} done",
            f"{self.failed} failed" if self.failed else None,
            f"{self.images} images ({rate:.1f}/s)",
            f"{self.errors} sample errors",
            f"ETA {_duration(eta)}" if finished < self.total else None,
            replicas(tick) if tick is not None else None,
        ]
        return ", ".join(p for p in parts if p)

    def tick(self, tick: Tick) -> None:
        if self.renderer is not None:
            self.renderer.update(self, tick)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            logger.info("progress: %s", self.line(tick))


def _duration(s: float) -> str:
    if s != s:  # NaN: nothing finished yet
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
