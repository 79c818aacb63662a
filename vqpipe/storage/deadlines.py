"""A deadline per storage operation: every public call of `vqpipe.storage` (a read, a listing, a write, one
read or write of an open file) ends within `vqpipe_deadline_s` seconds (default DEFAULT_DEADLINE_S), client
retries and vqpipe's own included, with an error naming the URL.

The deadline is set for the calling thread (a context variable) and is seen wherever the call goes: vqpipe's
retry loops stop at it, and on S3 every HTTP request the call makes, on fsspec's event-loop thread too (a task
copies the context of the thread that scheduled it), is cut off when it passes (`s3session`). That is what
bounds a store that never answers: aiohttp starts its read timeout only once a request's body is sent, and a
PUT sent with `Expect: 100-continue` to a store that never says "continue" waits for ever otherwise.

`vqpipe_deadline_s` is vqpipe's own key in `storage_options`: it is taken out before the rest goes to fsspec.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..errors import ConfigError

# Long enough for the slowest legitimate single call (a listing of 100k keys is ~100 pages; a 16 MiB part over
# a slow link), short enough that a silent store fails a shard attempt in minutes, not hours.
DEFAULT_DEADLINE_S = 120.0
OPTION = "vqpipe_deadline_s"

# (monotonic time the current operation must end by, its length in seconds) for this thread's calls
_CURRENT: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "vqpipe_storage_deadline", default=None
)

F = TypeVar("F", bound=Callable[..., Any])


class DeadlineExceeded(Exception):
    """Raised inside a client (on S3, by the HTTP session) when the operation's deadline of `seconds` has
    passed. Not a StorageError on purpose: the storage call that catches it names its URL."""

    def __init__(self, seconds: float):
        super().__init__(f"no answer within {seconds:g}s")
        self.seconds = seconds


def seconds_of(storage_options: dict[str, Any] | None) -> float:
    """The deadline `storage_options` asks for (`vqpipe_deadline_s`), or the default; a ConfigError naming
    the key for a value that is not a positive number."""
    value = (storage_options or {}).get(OPTION, DEFAULT_DEADLINE_S)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"storage_options.{OPTION}: expected a positive number of seconds, got {value!r}")
    return float(value)


def fsspec_options(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """`storage_options` without vqpipe's own keys: what fsspec gets."""
    return {k: v for k, v in (storage_options or {}).items() if k != OPTION}


@contextlib.contextmanager
def deadline(seconds: float, *, fresh: bool = False) -> Iterator[None]:
    """Calls in this block (this thread) end within `seconds`. Nested blocks keep the earlier end, so an
    operation made of operations is bounded as a whole; `fresh` starts a new one (the clean-up of an
    operation that ran out of time needs time of its own)."""
    ends = time.monotonic() + seconds
    current = _CURRENT.get()
    if current is not None and not fresh and current[0] <= ends:
        yield
        return
    token = _CURRENT.set((ends, seconds))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def remaining() -> float | None:
    """Seconds left to the current operation (negative once passed), or None outside any."""
    current = _CURRENT.get()
    return None if current is None else current[0] - time.monotonic()


def passed() -> bool:
    left = remaining()
    return left is not None and left <= 0


def length() -> float | None:
    """The current operation's deadline in seconds, for messages."""
    current = _CURRENT.get()
    return None if current is None else current[1]


def bounded(fn: F) -> F:
    """Run `fn` (a storage function taking `storage_options`) within the deadline those options ask for."""
    position = list(inspect.signature(fn).parameters).index("storage_options")  # found once, not per call

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        options = kwargs.get("storage_options", args[position] if len(args) > position else None)
        with deadline(seconds_of(options)):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
