"""Atomic writes: a name appears only when its `atomic_write` block exits normally (local: temporary file,
fsync, rename; S3/GCS: an upload aborted on error; others: a temporary key moved into place), and the
clean-up of what interrupted writes left behind.

One module although over 300 lines: the three ways of committing and the clean-up of what each leaves behind
(`.tmp-` names, unfinished uploads) are one contract, read together."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import deadlines
from .deadlines import bounded
from .redaction import _describe, _error, redact
from .retries import _ls, _retrying, _why
from .urls import _basename, _fs, _is_s3, _key, _protocols

logger = logging.getLogger(__name__)

# Part size for uploads to object stores: the upload buffers this much in memory before sending a part.
# S3 needs parts of at least 5 MiB and allows 10,000 of them, so 16 MiB caps an object at ~160 GB.
WRITE_BLOCK_SIZE = 16 * 2**20

# Name prefix of temporaries left by an interrupted atomic write; `cleanup_temporaries` removes them.
TMP_PREFIX = ".tmp-"

# Protocols whose write files create the object only on close and whose discard() aborts the upload
# (s3fs aborts the multipart upload; gcsfs cancels the resumable upload). Everything else that is not local
# (memory://, which publishes a file when it is opened; azure, ftp, hdfs, ...) writes a temporary key and
# moves it into place.
_ABORTABLE_UPLOAD_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})


class _PendingFile(io.RawIOBase):
    """The file `atomic_write` yields: writes go through, but close() does not commit (writers such as
    pyarrow may close their sink); only leaving the block normally does. A failed write (a full disk, a store
    that does not answer an upload within `deadline_s`) is a StorageError naming `url`."""

    def __init__(self, f: Any, url: str, deadline_s: float | None = None):
        super().__init__()
        self._f, self._url = f, url
        self._deadline_s = deadlines.DEFAULT_DEADLINE_S if deadline_s is None else deadline_s
        self._closing = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.closed:
            raise ValueError("write to closed file")
        n = memoryview(b).nbytes
        try:
            with deadlines.deadline(self._deadline_s):  # an object store uploads a part when a block fills
                self._f.write(b)
        except Exception as e:
            raise _error(f"{self._url}: cannot write ({_why(e)})") from None
        return n

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        # Not while closing: the commit flushes, and reports a failure as a StorageError. A flush from close()
        # ran in atomic_write's cleanup and raised the raw OSError of a full disk over the real error.
        if not self.closed and not self._closing and not self._f.closed:
            try:
                with deadlines.deadline(self._deadline_s):
                    self._f.flush()
            except Exception as e:
                raise _error(f"{self._url}: cannot write ({_why(e)})") from None

    def close(self) -> None:
        self._closing = True
        super().close()


def _discard(f: Any, error: BaseException | None = None, deadline_s: float | None = None) -> None:
    """Abandon an object-store upload: abort it, and never let close() (or garbage collection) commit it.
    After a stop (`error` not an Exception: SIGTERM on the driver) no request is sent: the store may be the
    reason the stop was needed, and the next run's start aborts unfinished uploads anyway."""
    try:
        if callable(getattr(f, "discard", None)) and (error is None or isinstance(error, Exception)):
            # s3fs aborts the multipart upload, if one was started; in time of its own (`fresh`): the write may
            # have failed because its own time ran out.
            with deadlines.deadline(
                deadlines.DEFAULT_DEADLINE_S if deadline_s is None else deadline_s, fresh=True
            ):
                f.discard()
    except Exception as e:
        logger.warning(redact(f"{getattr(f, 'path', '?')}: aborting the upload failed ({_describe(e)})"))
    finally:
        # AbstractBufferedFile.__del__ closes open files, and close() uploads what is buffered.
        with contextlib.suppress(Exception):
            f.closed = True


def _fsync_dir(path: str) -> None:
    """Make a rename durable (POSIX); best effort elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_name(name: str) -> str:
    # Hidden, and not ending in the final name's suffix: readers globbing `data/*.parquet` never see it.
    return f"{TMP_PREFIX}{name}.{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _abandon_local(f: IO[bytes], tmp: str) -> None:
    with contextlib.suppress(OSError):
        f.close()
    with contextlib.suppress(OSError):
        os.unlink(tmp)


@contextlib.contextmanager
def _atomic_local(url: str, path: str) -> Iterator[IO[bytes]]:
    parent, name = os.path.split(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, _tmp_name(name))
        f = open(tmp, "xb")  # noqa: SIM115 -- closed below, on both paths
    except OSError as e:
        raise _error(f"{url}: cannot write ({_describe(e)})") from None
    try:
        yield _PendingFile(f, url)  # type: ignore[misc]
    except BaseException:
        _abandon_local(f, tmp)
        raise
    try:
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except OSError as e:
        _abandon_local(f, tmp)
        raise _error(f"{url}: cannot write ({_describe(e)})") from None
    _fsync_dir(parent)


def _open_for_writing(
    url: str, fs: fsspec.AbstractFileSystem, path: str, block_size: int, deadline_s: float
) -> Any:
    opening = functools.partial(fs.open, path, "wb", block_size=block_size)
    try:
        return _retrying(url, "open for writing", opening, deadline_s=deadline_s)
    except FileNotFoundError as e:
        raise _error(f"{url}: cannot write ({_describe(e)})") from None


@contextlib.contextmanager
def _atomic_upload(
    url: str, fs: fsspec.AbstractFileSystem, path: str, block_size: int, deadline_s: float
) -> Iterator[IO[bytes]]:
    # The object appears only when close() completes the upload; discard() aborts it on error.
    f = _open_for_writing(url, fs, path, block_size, deadline_s)
    try:
        yield _PendingFile(f, url, deadline_s)  # type: ignore[misc]
    except BaseException as e:
        _discard(f, e, deadline_s)
        raise
    try:
        with deadlines.deadline(deadline_s):
            f.close()
    except BaseException as e:
        _discard(f, e, deadline_s)
        if not isinstance(e, Exception):
            raise
        raise _error(f"{url}: cannot write ({_why(e)})") from None


@contextlib.contextmanager
def _atomic_via_temp_key(
    url: str, fs: fsspec.AbstractFileSystem, path: str, block_size: int, deadline_s: float
) -> Iterator[IO[bytes]]:
    # For filesystems where an opened file is visible at once (memory://) or whose uploads cannot be
    # aborted: write a temporary sibling and move it into place.
    parent = fs._parent(path)
    tmp = posixpath.join(parent, _tmp_name(posixpath.basename(path)))
    with contextlib.suppress(Exception), deadlines.deadline(deadline_s):
        fs.makedirs(parent, exist_ok=True)
    f = _open_for_writing(url, fs, tmp, block_size, deadline_s)
    try:
        yield _PendingFile(f, url, deadline_s)  # type: ignore[misc]
    except BaseException as e:
        _discard(f, e, deadline_s)
        with contextlib.suppress(Exception), deadlines.deadline(deadline_s, fresh=True):
            fs.rm_file(tmp)
        fs.invalidate_cache(parent)
        raise
    try:
        with deadlines.deadline(deadline_s):
            f.close()
            fs.mv(tmp, path)
    except Exception as e:
        with contextlib.suppress(Exception), deadlines.deadline(deadline_s, fresh=True):
            fs.rm_file(tmp)
        raise _error(f"{url}: cannot write ({_why(e)})") from None
    finally:
        fs.invalidate_cache(parent)


@contextlib.contextmanager
def atomic_write(
    url: str, storage_options: dict[str, Any] | None = None, *, block_size: int | None = None
) -> Iterator[IO[bytes]]:
    """Yield a binary file whose content appears under `url` only if the block exits normally.

    If the block raises, nothing is left under `url` (an older file there stays untouched) and the
    exception propagates. Local: temporary file in the same directory, fsync, os.replace (parents are
    created). S3/GCS: direct upload, aborted on error. Others: temporary key moved into place. Closing the
    yielded file inside the block does not commit. `block_size` is the upload part size (WRITE_BLOCK_SIZE).
    Opening, each write (a part upload) and the commit each end within the storage deadline
    (`vqpipe_deadline_s` in `storage_options`), or raise a StorageError saying so.
    """
    fs, path = _fs(url, storage_options)
    block_size = WRITE_BLOCK_SIZE if block_size is None else block_size
    deadline_s = deadlines.seconds_of(storage_options)
    if isinstance(fs, LocalFileSystem):
        cm = _atomic_local(url, path)
    elif _ABORTABLE_UPLOAD_PROTOCOLS.intersection(_protocols(fs)):
        cm = _atomic_upload(url, fs, path, block_size, deadline_s)
    else:
        cm = _atomic_via_temp_key(url, fs, path, block_size, deadline_s)
    with cm as f:
        try:
            yield f
        finally:
            f.close()  # committed or abandoned: no more writes


@bounded
def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write `data` to `url` atomically (see atomic_write)."""
    with atomic_write(url, storage_options) as f:
        f.write(data)


def write_json_atomic(url: str, obj: Any, storage_options: dict[str, Any] | None = None) -> None:
    """Write `obj` as JSON (sorted keys, indent 2, trailing newline) to `url` atomically."""
    write_bytes_atomic(url, (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode(), storage_options)


def cleanup_temporaries(dir_url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Remove what crashed atomic writes left directly in `dir_url`: `.tmp-*` files and, on S3, unfinished
    multipart uploads of keys in that directory. Returns how many were removed.

    Call it before workers start writing there: it would also remove the temporaries of live writers."""
    fs, path = _fs(dir_url, storage_options)
    deadline_s = deadlines.seconds_of(storage_options)  # for each request-sized step
    removed = 0
    for name in _temporary_files(dir_url, fs, path, deadline_s):
        with contextlib.suppress(FileNotFoundError):
            _retrying(dir_url, "remove " + name, functools.partial(fs.rm_file, name), deadline_s=deadline_s)
        removed += 1
    if hasattr(fs, "list_multipart_uploads") and hasattr(fs, "abort_mpu") and hasattr(fs, "split_path"):
        # s3fs. Unfinished uploads are invisible but billed. Best effort: listing them needs a permission
        # (s3:ListBucketMultipartUploads) a job may lack, and the bucket's lifecycle rules may handle them.
        bucket, key, _ = fs.split_path(path)
        try:
            with deadlines.deadline(deadline_s):
                uploads = fs.list_multipart_uploads(bucket)
            for upload in uploads:
                if posixpath.dirname(upload["Key"]) == key.rstrip("/"):
                    with deadlines.deadline(deadline_s):
                        fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])
                    removed += 1
        except Exception as e:
            logger.warning(redact(f"{dir_url}: cannot clean up unfinished uploads ({_describe(e)})"))
    if removed:
        logger.info(redact(f"{dir_url}: removed {removed} leftover(s) of interrupted writes"))
        fs.invalidate_cache(path)
    return removed


def _temporary_files(dir_url: str, fs: fsspec.AbstractFileSystem, path: str, deadline_s: float) -> list[str]:
    """The `.tmp-` files directly in `path`. A directory of 100k committed shards must not cost a stat per
    file (local: names only) or 100 listing pages (S3: one listing of the `.tmp-` prefix)."""
    if isinstance(fs, LocalFileSystem):
        try:  # names, not DirEntry objects: this runs over data/, errors/ and done/ at every run's start
            names = [n for n in os.listdir(path) if n.startswith(TMP_PREFIX)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [p for n in names if os.path.isfile(p := os.path.join(path, n))]
    if _is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        prefix = f"{key.rstrip('/')}/{TMP_PREFIX}" if key else TMP_PREFIX
        found: list[str] = []
        token = None
        while True:
            kw: dict[str, Any] = {"ContinuationToken": token} if token else {}
            call = functools.partial(
                fs.call_s3, "list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/", **kw
            )
            page: dict[str, Any] = _retrying(dir_url, "list", call, deadline_s=deadline_s)
            found += [f"{bucket}/{o['Key']}" for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return found
    try:
        entries = _retrying(dir_url, "list", functools.partial(_ls, fs, path), deadline_s=deadline_s)
    except FileNotFoundError:
        return []
    names = [_key(fs, e["name"]) for e in entries if e.get("type") == "file"]
    return [n for n in names if _basename(fs, n).startswith(TMP_PREFIX)]
