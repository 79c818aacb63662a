"""Transient errors (a dropped connection, a timeout) that escape the filesystem's own retries: which errors
are worth another attempt, and a bounded retry loop with doubling backoff."""

from __future__ import annotations

import http.client
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

from ..errors import StorageError
from . import deadlines
from .failures import Failure, _chain, classify
from .redaction import _describe, _error, redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Retry policy for transient errors (connection reset, timeout) that escape the filesystem's own retries.
# botocore, s3fs and gcsfs already retry throttling, 5xx and connect errors per request, but a connection
# dropped while a body is being read surfaces as a plain ConnectionError and would kill a shard hours into a job.
# A few attempts with doubling backoff (0.5 + 1 + 2 s) ride out a network blip without multiplying the
# client's own retries against a dead endpoint; past that, the job's per-shard retry takes over.
RETRY_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.5

# Which errors vqpipe retries itself: failures that break a call after the client library has returned a
# response (a connection dropped or timed out while a body streams; an open file's read is retried by no
# client). Everything the client retries per request is left out on purpose, so that a store that stays down
# fails in the client's time, not a multiple of it: HTTP error answers (503 SlowDown, 500, 429: botocore makes
# 5 attempts and s3fs 5 more rounds for SlowDown; gcsfs makes 6 attempts with 1-16 s backoff) and failures to
# connect (botocore's EndpointConnectionError, aiohttp's ClientConnectorError from gcsfs). Permanent errors
# (403, 404, NoSuchBucket, bad arguments) are retried by nobody. Past these retries, the job's per-shard retry
# takes over. tests/test_storage_faults.py shows each case through a fault-injecting proxy.
_OPTIONAL_TRANSIENT = (
    ("aiohttp", ("ClientPayloadError", "ClientConnectionError", "ServerTimeoutError")),
    ("requests.exceptions", ("ConnectionError", "ChunkedEncodingError", "Timeout")),
)
# Subclasses of the above that mean "could not connect" (gcsfs has retried them) or an HTTP 502 answer (gcsfs
# raises requests' ProxyError for it, after its retries).
_OPTIONAL_NOT_TRANSIENT = (
    ("aiohttp", ("ClientConnectorError",)),
    ("requests.exceptions", ("ProxyError",)),
)


def _is_instance_of_any(e: BaseException, classes: tuple[tuple[str, tuple[str, ...]], ...]) -> bool:
    # Client libraries are only consulted when already imported: none is a dependency of this module.
    for module_name, names in classes:
        module = sys.modules.get(module_name)
        for name in names:
            cls = getattr(module, name, None) if module is not None else None
            if isinstance(cls, type) and isinstance(e, cls):
                return True
    return False


def _is_transient(e: BaseException) -> bool:
    """A dropped connection or timeout that vqpipe retries (see above), as opposed to an error answer the
    client already retried, or a missing, forbidden or malformed request. Judged on the error in `e`'s chain
    that says what happened (s3fs reports a timed-out body read as an IndexError raised while handling it)."""
    _, e = classify(e)
    if _is_instance_of_any(e, _OPTIONAL_NOT_TRANSIENT):
        return False
    if isinstance(e, (ConnectionError, TimeoutError, http.client.IncompleteRead)):
        return True
    return _is_instance_of_any(e, _OPTIONAL_TRANSIENT)


def _backoff(attempt: int, backoff_s: float) -> float:
    return backoff_s * 2 ** (attempt - 1)


def _retrying(
    url: str,
    action: str,
    fn: Callable[[], T],
    attempts: int | None = None,
    backoff_s: float | None = None,
    *,
    deadline_s: float | None = None,
) -> T:
    """fn() with transient errors retried, within the current operation's deadline (`deadlines`), or within
    `deadline_s` of its own (a step of a long operation, such as one listing of many); FileNotFoundError passes
    through, other failures -> StorageError."""
    if deadline_s is not None:
        with deadlines.deadline(deadline_s):
            return _retrying(url, action, fn, attempts, backoff_s)
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    backoff_s = RETRY_BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, StorageError):
            raise
        except Exception as e:
            if out_of_time(e):
                raise _error(f"{url}: cannot {action} ({_describe_timeout(e)})") from None
            if not _is_transient(e) or attempt >= attempts:
                raise _error(f"{url}: cannot {action} ({_describe(e)})") from None
            logger.warning(redact(f"{url}: {action} failed ({_describe(e)}), retry {attempt}/{attempts - 1}"))
            _sleep_within_deadline(_backoff(attempt, backoff_s))
    raise AssertionError("unreachable")


def out_of_time(e: BaseException) -> bool:
    """Whether `e` ended an operation because its deadline passed (no retry can help within it)."""
    return deadlines.passed() or any(isinstance(x, deadlines.DeadlineExceeded) for x in _chain(e))


def _why(e: BaseException) -> str:
    """What happened, for a message: the storage deadline when it ended the operation, else `e` in a line."""
    return _describe_timeout(e) if out_of_time(e) else _describe(e)


def _describe_timeout(e: BaseException) -> str:
    ran_out = next((x for x in _chain(e) if isinstance(x, deadlines.DeadlineExceeded)), None)
    seconds = ran_out.seconds if ran_out is not None else deadlines.length() or 0.0
    said = (
        f"{Failure.TIMEOUT.value}: no answer within {seconds:g}s, the storage deadline ({deadlines.OPTION})"
    )
    return said if ran_out is not None else f"{said}; last error: {_describe(e)}"


def _sleep_within_deadline(seconds: float) -> None:
    left = deadlines.remaining()
    time.sleep(seconds if left is None else max(0.0, min(seconds, left)))


def _ls(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """One fresh, detailed, non-recursive listing (s3fs pages through it: one request per 1000 keys)."""
    fs.invalidate_cache(path)  # other workers write here: a cached listing would be stale
    return fs.ls(path, detail=True)


def _info(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    fs.invalidate_cache(path)
    return fs.info(path)
