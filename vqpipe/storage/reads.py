"""Streaming reads: remote objects are fetched in large range requests with read-ahead, never downloaded
whole, and a dropped connection re-opens at the current offset."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from collections.abc import Callable
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import StorageError
from . import deadlines, retries
from .deadlines import bounded
from .listing import _input_version, input_version
from .redaction import _describe, _error, _not_found, redact
from .retries import (
    _backoff,
    _describe_timeout,
    _is_transient,
    _retrying,
    _sleep_within_deadline,
    out_of_time,
)
from .urls import _fs

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Range-request size for streaming reads of remote objects: sequential tar reading wants large read-ahead
# blocks (few requests), but each open shard holds one block in memory (s3fs's default is 50 MiB).
READ_BLOCK_SIZE = 8 * 2**20


class RetryingReader(io.RawIOBase):
    """Sequential reads over `fs.open(path)` that survive transient errors: the file is re-opened at the
    current offset, with bounded attempts and doubling backoff. Refuses to continue if the object changed
    (size or ETag) between the first open and a re-open, since the bytes would be a mix of two versions.
    Each open, read or seek ends within `deadline_s` (default: `deadlines.DEFAULT_DEADLINE_S`), retries
    included."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        url: str,
        open_kwargs: dict[str, Any] | None = None,
        attempts: int | None = None,
        backoff_s: float | None = None,
        deadline_s: float | None = None,
    ):
        super().__init__()
        self._fs, self._path, self.name = fs, path, url
        self._deadline_s = deadlines.DEFAULT_DEADLINE_S if deadline_s is None else deadline_s
        self._open_kwargs = dict(open_kwargs or {})
        self._attempts = retries.RETRY_ATTEMPTS if attempts is None else attempts
        self._backoff_s = retries.RETRY_BACKOFF_S if backoff_s is None else backoff_s
        self._f: Any = None
        self._pos = 0
        self._identity: tuple[Any, Any] | None = None
        self._with_retries("open", lambda: None)

    def _identity_of(self, f: Any) -> tuple[Any, Any]:
        details = getattr(f, "details", None) or {}
        return (getattr(f, "size", None), details.get("ETag") or details.get("etag"))

    def _reopen(self) -> None:
        self._fs.invalidate_cache(self._path)  # s3fs would take size and ETag from a cached listing
        f = self._fs.open(self._path, "rb", **self._open_kwargs)
        identity = self._identity_of(f)
        if self._identity is None:
            self._identity = identity
        elif identity != self._identity:
            f.close()
            raise _error(f"{self.name}: changed while being read (now size, etag = {identity})")
        if self._pos:
            f.seek(self._pos)
        self._f = f

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def _with_retries(self, action: str, fn: Callable[[], T]) -> T:
        with deadlines.deadline(self._deadline_s):
            return self._retrying(action, fn)

    def _retrying(self, action: str, fn: Callable[[], T]) -> T:
        for attempt in range(1, self._attempts + 1):
            try:
                if self._f is None:
                    self._reopen()
                return fn()
            except FileNotFoundError:
                raise _not_found(self.name) from None
            except StorageError:
                raise
            except Exception as e:
                if out_of_time(e):
                    raise _error(
                        f"{self.name}: {action} failed at byte {self._pos} ({_describe_timeout(e)})"
                    ) from None
                if not _is_transient(e) or attempt >= self._attempts:
                    raise _error(
                        f"{self.name}: {action} failed at byte {self._pos} after {attempt} attempt(s) "
                        f"({_describe(e)})"
                    ) from None
                logger.warning(
                    redact(
                        f"{self.name}: {action} failed at byte {self._pos} ({_describe(e)}), "
                        f"re-opening, retry {attempt}/{self._attempts - 1}"
                    )
                )
                self._drop()
                _sleep_within_deadline(_backoff(attempt, self._backoff_s))
        raise AssertionError("unreachable")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = self._with_retries("seek", lambda: self._f.seek(offset, whence))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._with_retries("read", lambda: self._f.read(len(view)))
        n = len(data)
        view[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        self._drop()
        super().close()


def open_input(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    attempts: int | None = None,
    backoff_s: float | None = None,
) -> IO[bytes]:
    """Open `url` for streaming binary reads: remote objects are fetched in READ_BLOCK_SIZE range requests
    with read-ahead, never downloaded whole, and a dropped connection re-opens at the current offset
    (`attempts`, `backoff_s` default to RETRY_ATTEMPTS, RETRY_BACKOFF_S). Each read ends within the storage
    deadline (`vqpipe_deadline_s` in `storage_options`). Missing -> StorageError."""
    fs, path = _fs(url, storage_options)
    open_kwargs = (
        {} if isinstance(fs, LocalFileSystem) else {"block_size": READ_BLOCK_SIZE, "cache_type": "readahead"}
    )
    raw = RetryingReader(
        fs, path, url, open_kwargs, attempts, backoff_s, deadlines.seconds_of(storage_options)
    )
    return io.BufferedReader(raw, buffer_size=2**20)


def open_input_with_version(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[IO[bytes], dict[str, Any]]:
    """`open_input(url)` and the version (size, mtime or ETag) of what was opened, taken from the open's own
    metadata request (object stores: the HEAD that gives the size) instead of a request of its own."""
    stream = open_input(url, storage_options)
    raw = getattr(stream, "raw", None)
    details = getattr(getattr(raw, "_f", None), "details", None) if isinstance(raw, RetryingReader) else None
    if details and details.get("size") is not None:
        return stream, _input_version(details)
    try:  # local files (a stat), or a store whose files keep no details
        return stream, input_version(url, storage_options)
    except BaseException:
        stream.close()
        raise


@bounded
def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole content of `url` (one request for objects). Missing -> StorageError."""
    fs, path = _fs(url, storage_options)
    try:
        return _retrying(url, "read", lambda: fs.cat_file(path))
    except FileNotFoundError:
        raise _not_found(url) from None


def sha256_of(url: str, storage_options: dict[str, Any] | None = None, keep: IO[bytes] | None = None) -> str:
    """sha256 of the file at `url`, streamed in parts (never held whole unless `keep` takes a copy of every part:
    then the digest describes exactly the bytes kept). Errors as `open_input`'s (StorageError, OSError)."""
    sha = hashlib.sha256()
    with open_input(url, storage_options) as f:
        while chunk := f.read(8 << 20):
            sha.update(chunk)
            if keep is not None:
                keep.write(chunk)
    return sha.hexdigest()


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """`url` parsed as JSON. Missing or malformed -> StorageError."""
    data = read_bytes(url, storage_options)
    try:
        return json.loads(data)
    except ValueError as e:
        raise _error(f"{url}: not valid JSON ({e})") from None
