"""Stop requests on the driver: SIGTERM or SIGINT ends dispatching, in-flight shards get a grace period, and the
job still writes its summary and exits 128 + the signal number (143, 130) instead of dying mid-loop.

Only entry points install the handlers (a library changes no global state by itself); the driver installs them
again after `ray.init`, which replaces the SIGTERM handler with one that exits at once.

Outside the dispatcher nothing checks the flag while it waits (a listing, a checkpoint read, the lease, a store
that never answers): inside `interrupting()` a signal also raises `Interrupted` in the main thread, ending
whatever wait it is in at once. The entry point catches it and exits 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal that ended a wait of the driver (see `StopRequest.interrupting`). A BaseException, as
    KeyboardInterrupt is: no `except Exception` on its way (a storage retry loop) mistakes it for a failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """Set by the first SIGTERM/SIGINT; a second one also ends the grace period at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}
        self._interrupting = False

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

    @contextlib.contextmanager
    def interrupting(self, on: bool = True) -> Iterator[None]:
        """Within: a signal also raises Interrupted in the main thread (`on=False`: it only sets the flags, for
        a loop that checks them itself, as the dispatcher does). A stop that came before is not raised here:
        its owner acts on it."""
        before, self._interrupting = self._interrupting, on
        try:
            yield
        finally:
            self._interrupting = before

    def _handle(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: sets flags, which the dispatch loop acts on; in an
        # `interrupting` block it also ends the wait the main thread is in.
        self.request(signum)
        if self._interrupting:
            raise Interrupted(signum)
