"""Stop requests on the driver: SIGTERM or SIGINT ends dispatching, in-flight shards get a grace period, and the
job still writes its summary and exits 128 + the signal number (143, 130) instead of dying mid-loop.

Only entry points install the handlers (a library changes no global state by itself); the driver installs them
again after `ray.init`, which replaces the SIGTERM handler with one that exits at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set by the first SIGTERM/SIGINT; a second one also ends the grace period at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def hurry(self) -> bool:
        """A second signal: do not wait for in-flight shards any longer."""
        return self.count > 1

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "-"

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + (self.signum or 0)

    def install(self) -> bool:
        """Handle SIGTERM and SIGINT from now on (main thread only; returns whether it could)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for s in SIGNALS:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)
        return True

    def restore(self) -> None:
        """Put back the handlers that were there before the first install."""
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def request(self, signum: int) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: only set flags; the dispatch loop acts on them.
        self.request(signum)
