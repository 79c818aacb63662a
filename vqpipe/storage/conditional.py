"""Conditional writes: write or delete an object only if it is absent or still at the version read (S3:
If-None-Match / If-Match; local: an exclusive lock file; elsewhere best effort)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import StorageError
from .deadlines import bounded
from .listing import remove
from .redaction import _error, redact
from .retries import _info, _retrying, _why
from .urls import _fs, _is_s3, _protocols
from .writes import write_bytes_atomic

logger = logging.getLogger(__name__)


class WriteConflict(StorageError):
    """A conditional write or delete found the object absent, present or changed against its condition."""


_LOCK_STALE_S = 30.0  # a local lock file older than this was left by a process that died inside the lock
_warned_unconditional: set[str] = set()


@bounded
def read_versioned(url: str, storage_options: dict[str, Any] | None = None) -> tuple[bytes, str] | None:
    """`url`'s content and a version token for `write_if`/`remove_if` (S3: the ETag; elsewhere: a hash of
    the content), or None when absent."""
    fs, path = _fs(url, storage_options)
    if _is_s3(fs):
        try:  # version first, then bytes: newer bytes than the version make the next conditional write fail
            etag = str(_retrying(url, "stat", lambda: _info(fs, path)).get("ETag", "")).strip('"')
            data = _retrying(url, "read", lambda: fs.cat_file(path))
        except FileNotFoundError:
            return None
        return data, etag
    try:
        data = _retrying(url, "read", lambda: fs.cat_file(path))
    except FileNotFoundError:
        return None
    return data, _content_version(data)


@bounded
def write_if(
    url: str, data: bytes, storage_options: dict[str, Any] | None = None, *, if_version: str | None
) -> str:
    """Write `data` to `url` only if it is absent (`if_version` None) or still at version `if_version`;
    return the new version. Raises WriteConflict otherwise.

    Atomic on local disks (an exclusive lock file around check-and-replace; also on NFS) and on S3
    (`If-None-Match: *` / `If-Match: <ETag>`, which AWS and moto honour). Other stores check, then write:
    two writers racing within that gap may both succeed (logged once per protocol)."""
    fs, path = _fs(url, storage_options)
    if _is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        condition = {"IfNoneMatch": "*"} if if_version is None else {"IfMatch": f'"{if_version}"'}
        try:
            out = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except Exception as e:
            if _condition_failed(e):
                raise WriteConflict(redact(f"{url}: changed meanwhile (conditional write refused)")) from None
            raise _error(f"{url}: cannot write ({_why(e)})") from None
        finally:
            fs.invalidate_cache(path)
        return str(out.get("ETag", "")).strip('"')
    with _exclusive(url, fs, path):
        _check_version(url, storage_options, if_version)
        write_bytes_atomic(url, data, storage_options)
    return _content_version(data)


@bounded
def remove_if(url: str, storage_options: dict[str, Any] | None = None, *, if_version: str) -> None:
    """Delete `url` only if it is still at version `if_version`; WriteConflict otherwise (S3: `If-Match`
    on the delete; stores that ignore it delete unconditionally after the check)."""
    fs, path = _fs(url, storage_options)
    if _is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        _check_version(url, storage_options, if_version)
        try:
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=f'"{if_version}"')
        except Exception as e:
            if _condition_failed(e):
                raise WriteConflict(
                    redact(f"{url}: changed meanwhile (conditional delete refused)")
                ) from None
            raise _error(f"{url}: cannot remove ({_why(e)})") from None
        finally:
            fs.invalidate_cache(path)
        return
    with _exclusive(url, fs, path):
        _check_version(url, storage_options, if_version)
        remove(url, storage_options)


def _content_version(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _condition_failed(e: BaseException) -> bool:
    """s3fs turns a failed precondition into FileExistsError (If-None-Match) or a plain OSError; the
    botocore error it came from has the code."""
    if isinstance(e, FileExistsError | FileNotFoundError):
        return True
    cause = e.__cause__ or e
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def _check_version(url: str, storage_options: dict[str, Any] | None, if_version: str | None) -> None:
    current = read_versioned(url, storage_options)
    if if_version is None and current is not None:
        raise WriteConflict(redact(f"{url}: already exists"))
    if if_version is not None and (current is None or current[1] != if_version):
        raise WriteConflict(redact(f"{url}: changed meanwhile"))


@contextlib.contextmanager
def _exclusive(url: str, fs: fsspec.AbstractFileSystem, path: str) -> Iterator[None]:
    """Local: hold `<path>.lock` (O_EXCL create, atomic also over NFS) for a check-and-replace. Other
    non-S3 stores: nothing to hold; say once that their conditional writes are only best effort."""
    if not isinstance(fs, LocalFileSystem):
        proto = _protocols(fs)[0]
        if proto not in _warned_unconditional:
            _warned_unconditional.add(proto)
            logger.warning("%s:// has no conditional writes here: the run lease is best effort", proto)
        yield
        return
    lock = path + ".lock"
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    deadline = time.monotonic() + 2 * _LOCK_STALE_S
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.stat(lock).st_mtime > _LOCK_STALE_S:
                    os.unlink(lock)  # its holder died between create and unlink
                    continue
            if time.monotonic() > deadline:
                raise _error(
                    f"{url}: {lock} stays locked; remove it if no vqpipe run uses this output"
                ) from None
            time.sleep(0.005)
        except OSError as e:
            raise _error(f"{url}: cannot lock ({_why(e)})") from None
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
