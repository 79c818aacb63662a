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
from .redaction import _describe, _error, redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Retry policy for transient errors (connection reset, timeout) that escape the filesystem's own retries.
# botocore and s3fs already retry throttling and HTTP/connect errors per request, but a connection dropped
# while a body is being read surfaces as a plain ConnectionError and would kill a shard hours into a job.
# A few attempts with doubling backoff (0.5 + 1 + 2 s) ride out a network blip without multiplying the
# client's own retries against a dead endpoint; past that, the job's per-shard retry takes over.
RETRY_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.5

# Errors worth a re-open. botocore's connection errors are left out on purpose: botocore and s3fs have
# already retried those (~7 s against a dead endpoint) and another round would multiply the wait. What
# escapes them mid-body is a plain ConnectionError or an aiohttp error, which s3fs re-raises as is.
_OPTIONAL_TRANSIENT = (
    ("aiohttp", ("ClientPayloadError", "ClientConnectionError", "ServerTimeoutError")),
    ("requests.exceptions", ("ConnectionError", "ChunkedEncodingError", "Timeout")),
)


def _is_transient(e: BaseException) -> bool:
    """A dropped connection or timeout worth retrying (as opposed to missing, forbidden, malformed)."""
    if isinstance(e, (ConnectionError, TimeoutError, http.client.IncompleteRead)):
        return True
    # Client libraries are only consulted when already imported: none is a dependency of this module.
    for module_name, names in _OPTIONAL_TRANSIENT:
        module = sys.modules.get(module_name)
        for name in names:
            cls = getattr(module, name, None) if module is not None else None
            if isinstance(cls, type) and isinstance(e, cls):
                return True
    return False


def _backoff(attempt: int, backoff_s: float) -> float:
    return backoff_s * 2 ** (attempt - 1)


def _retrying(
    url: str,
    action: str,
    fn: Callable[[], T],
    attempts: int | None = None,
    backoff_s: float | None = None,
) -> T:
    """fn() with transient errors retried; FileNotFoundError passes through, other failures -> StorageError."""
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    backoff_s = RETRY_BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, StorageError):
            raise
        except Exception as e:
            if not _is_transient(e) or attempt >= attempts:
                raise _error(f"{url}: cannot {action} ({_describe(e)})") from None
            logger.warning(redact(f"{url}: {action} failed ({_describe(e)}), retry {attempt}/{attempts - 1}"))
            time.sleep(_backoff(attempt, backoff_s))
    raise AssertionError("unreachable")


def _ls(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """One fresh, detailed, non-recursive listing (s3fs pages through it: one request per 1000 keys)."""
    fs.invalidate_cache(path)  # other workers write here: a cached listing would be stale
    return fs.ls(path, detail=True)


def _info(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    fs.invalidate_cache(path)
    return fs.info(path)
