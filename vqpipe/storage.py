"""Every byte vqpipe reads or writes goes through here (fsspec): local paths and any fsspec URL.

Three promises the rest of the job relies on:
- Listing is paginated: expanding `part-{000000..099999}.tar` lists each parent directory once, never one
  request per shard, and the listing's metadata doubles as each shard's fingerprint.
- Reads stream (block read-ahead, nothing downloaded whole) and survive a dropped connection mid-shard.
- Writes commit atomically: a name appears only when its `atomic_write` block exits normally.

No message built here carries a credential: every StorageError and log line goes through `redact`.
This is the only vqpipe module that imports fsspec.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import http.client
import io
import json
import logging
import os
import posixpath
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Retry policy for transient errors (connection reset, timeout) that escape the filesystem's own retries.
# botocore, s3fs and gcsfs already retry throttling, 5xx and connect errors per request, but a connection
# dropped while a body is being read surfaces as a plain ConnectionError and would kill a shard hours into a job.
# A few attempts with doubling backoff (0.5 + 1 + 2 s) ride out a network blip without multiplying the
# client's own retries against a dead endpoint; past that, the job's per-shard retry takes over.
RETRY_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.5

# Range-request size for streaming reads of remote objects: sequential tar reading wants large read-ahead
# blocks (few requests), but each open shard holds one block in memory (s3fs's default is 50 MiB).
READ_BLOCK_SIZE = 8 * 2**20
# Part size for uploads to object stores: the upload buffers this much in memory before sending a part.
# S3 needs parts of at least 5 MiB and allows 10,000 of them, so 16 MiB caps an object at ~160 GB.
WRITE_BLOCK_SIZE = 16 * 2**20

# File names a glob or directory expands to shards; other matches (img2dataset's .parquet and _stats.json side
# files) are skipped. A file named explicitly is always planned: the reader then says whether it is a tar.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# Name prefix of temporaries left by an interrupted atomic write; `cleanup_temporaries` removes them.
TMP_PREFIX = ".tmp-"

# Protocols whose write files create the object only on close and whose discard() aborts the upload
# (s3fs aborts the multipart upload; gcsfs cancels the resumable upload). Everything else that is not local
# (memory://, which publishes a file when it is opened; azure, ftp, hdfs, ...) writes a temporary key and
# moves it into place.
_ABORTABLE_UPLOAD_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs"})

_BRACE = re.compile(r"\{[^{}]*(?:\.\.|,)[^{}]*\}")
_GLOB_MAGIC = re.compile(r"[*?\[]")


# ---------------------------------------------------------------------------------------------- redaction

# Option and parameter names that hold credentials: any name containing one of the long words (client_secret,
# aws_secret_access_key, X-Amz-Security-Token, AccountKey, ...), or exactly one of the short ones.
_SECRET_WORDS = (
    "secret",
    "token",
    "password",
    "passwd",
    "key",
    "signature",
    "credential",
    "auth",
    "session",
    "private",
)
_SECRET_SHORT = ("sig", "pwd", "sas", "pass", "connection_string")
_SECRET_NAME = (
    r"(?![\w.-]*(?:error|exception|warning)\b)"  # "KeyError: 'x'" is an exception, not a key
    r"(?:[\w.-]*(?:" + "|".join(_SECRET_WORDS) + r")[\w.-]*|(?:" + "|".join(_SECRET_SHORT) + r")\b)"
)
_REDACTIONS = (
    (re.compile(r"(?i)\bbearer\s+[\w.~+/-]+=*"), "Bearer ***"),
    # name=value, name: value, 'name': 'value', "name": "value" (query strings, dict reprs, JSON, configs);
    # a quoted value is masked up to its closing quote.
    (
        re.compile(
            r"""(?i)(["']?\b""" + _SECRET_NAME + r"""["']?\s*[=:]\s*)(["']?)(?(2)[^"'\n]*|[^\s"'&,;)}\]]+)"""
        ),
        r"\1\2***",
    ),
    # user:password@ in URLs
    (re.compile(r"(://[^/\s:@]+):[^/\s@]+@"), r"\1:***@"),
    # AWS access key ids (long-term AKIA, temporary ASIA, and the other documented prefixes)
    (re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA|ANVA|AIPA|A3T[A-Z0-9])[A-Z0-9]{16}\b"), "***"),
)
_SECRET_OPTION = re.compile("|".join(_SECRET_WORDS + _SECRET_SHORT), re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with anything that looks like a credential replaced by `***` (keys, secrets, tokens, passwords,
    signatures in query strings or dict reprs, `user:pass@` in URLs, AWS access key ids)."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def public_storage_options(opts: dict[str, Any] | None) -> dict[str, Any]:
    """A JSON-safe copy of `opts` for run.json: secret-looking keys keep their name but not their value
    (`***`), other strings are redacted, objects become `<TypeName>`."""

    def clean(key: str | None, value: Any) -> Any:
        if key is not None and _SECRET_OPTION.search(key) and value is not None:
            return "***"
        if isinstance(value, dict):
            return {str(k): clean(str(k), v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(None, v) for v in value]
        if isinstance(value, str):
            return redact(value)
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return f"<{type(value).__name__}>"

    return clean(None, dict(opts or {}))


def _error(message: str) -> StorageError:
    return StorageError(redact(message))


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------------- URLs


def protocol(url: str) -> str:
    """The URL's protocol: "file" for local paths, else "s3", "gs", "memory", ... (first of a chain)."""
    return fsspec.utils.get_protocol(url)


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs."""
    return protocol(url) in ("file", "local")


def join(base: str, *parts: str) -> str:
    """`base` and `parts` joined with "/", keeping `base`'s protocol: join("s3://b/run", "done", "x.json")."""
    out = base
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        if not out.endswith("/"):
            out += "/"
        out += part
    return out


def _fs(url: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError, TypeError) as e:
        raise _error(f"{url}: cannot access this location ({_describe(e)})") from None
    if isinstance(fs, LocalFileSystem):
        path = os.path.normpath(path)
    return fs, path


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return os.path.normpath(path)
    return fs.unstrip_protocol(path)


def _key(fs: fsspec.AbstractFileSystem, name: str) -> str:
    """A listing entry's name in the form `url_to_fs` gives paths, for comparisons."""
    name = fs._strip_protocol(name).rstrip("/")
    return os.path.normpath(name) if isinstance(fs, LocalFileSystem) else name


def _basename(fs: fsspec.AbstractFileSystem, name: str) -> str:
    name = _key(fs, name)
    return os.path.basename(name) if isinstance(fs, LocalFileSystem) else posixpath.basename(name)


# --------------------------------------------------------------------------------------- transient errors

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
    client already retried, or a missing, forbidden or malformed request."""
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


# ------------------------------------------------------------------------------- listing and fingerprints


def _fingerprint(info: dict[str, Any]) -> dict[str, Any]:
    """What identifies one version of a file: size plus mtime (local) or ETag/version and last-modified.

    Object times are cut to whole seconds: S3 listings give milliseconds, HEAD gives seconds, and the two
    must agree for the same object. Local mtimes keep their sub-second precision (both come from stat)."""
    fp: dict[str, Any] = {"size": info.get("size")}
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        fp["etag"] = str(etag).strip('"')
    version = info.get("VersionId") or info.get("generation") or info.get("version_id")
    if version and version != "null":
        fp["version"] = str(version)
    for field in ("mtime", "LastModified", "last_modified", "updated", "modified", "created"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, _dt.datetime):
            value = int(value.timestamp())
        elif isinstance(value, float) and field != "mtime":  # memory:// lists a float, info() a datetime
            value = int(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(_dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
        fp["mtime"] = value
        break
    return fp


def _expand_one(inp: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    fs, path = _fs(inp, storage_options)

    if _BRACE.search(path):
        import braceexpand  # ships with webdataset

        names = list(dict.fromkeys(braceexpand.braceexpand(inp)))
        if any(_GLOB_MAGIC.search(n) for n in names):  # {a,b}/*.tar: each alternative is a glob
            for name in names:
                yield from _expand_one(name, storage_options)
            return
        wanted = [_key(fs, n) for n in names]
        by_parent: dict[str, list[str]] = {}
        for name in wanted:
            by_parent.setdefault(fs._parent(name), []).append(name)
        found: dict[str, dict[str, Any]] = {}
        for parent in by_parent:
            try:
                entries = _retrying(inp, "list " + parent, lambda p=parent: _ls(fs, p))
            except FileNotFoundError:
                entries = []
            found.update({_key(fs, e["name"]): e for e in entries if e.get("type") == "file"})
        missing = [n for n in wanted if n not in found]
        if missing:
            examples = ", ".join(_url(fs, n) for n in missing[:5])
            raise _error(
                f"{inp}: {len(missing)} of {len(wanted)} expanded names do not exist, e.g. {examples}"
            )
        for name in wanted:
            yield _url(fs, name), _fingerprint(found[name])
        return

    if _GLOB_MAGIC.search(path):
        fs.invalidate_cache()  # glob may read any cached listing below its root: make them all fresh
        matches = _retrying(inp, "list", lambda: fs.glob(path, detail=True))
        files = [(name, info) for name, info in matches.items() if info.get("type") == "file"]
        if not files:
            with contextlib.suppress(FileNotFoundError, StorageError):  # a name with "[" in it, not a glob
                files = [(path, _retrying(inp, "stat", lambda: _info(fs, path)))]
        if not files or files[0][1].get("type") != "file":
            raise _error(f"{inp}: matches no files")
        files = _tars_only(inp, files)
        for name, info in files:
            yield _url(fs, _key(fs, name)), _fingerprint(info)
        return

    try:
        info = _retrying(inp, "stat", lambda: _info(fs, path))
    except FileNotFoundError:
        raise _error(f"{inp}: no such file or directory") from None
    if info.get("type") != "directory":
        yield _url(fs, path), _fingerprint(info)
        return
    entries = _retrying(inp, "list", lambda: _ls(fs, path))
    files = [(e["name"], e) for e in entries if e.get("type") == "file"]
    for name, info in _tars_only(inp, files):
        yield _url(fs, _key(fs, name)), _fingerprint(info)


def _tars_only(inp: str, files: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """The tar files among what a glob or directory matched: an img2dataset folder also holds `.parquet` and
    `_stats.json` side files, which are not shards. Skipped names are logged; no tar at all is an error."""
    tars = [(n, i) for n, i in files if n.endswith(TAR_SUFFIXES)]
    skipped = sorted(posixpath.basename(n.rstrip("/")) for n, _ in files if not n.endswith(TAR_SUFFIXES))
    if not tars:
        raise _error(
            f"{inp}: matches no tar files ({', '.join(TAR_SUFFIXES)}); found e.g. {', '.join(skipped[:5])}"
        )
    if skipped:
        logger.info(
            redact(f"{inp}: skipping {len(skipped)} file(s) that are not tars, e.g. {', '.join(skipped[:5])}")
        )
    return tars


def expand_inputs_with_info(
    inputs: Sequence[str], storage_options: dict[str, Any] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Resolve input specs to (url, fingerprint) pairs, sorted by url and de-duplicated.

    Each spec is a file, a directory (its *.tar files, not recursive), a glob (`shards/*.tar`) or a
    WebDataset brace pattern (`part-{000000..000099}.tar`, `{a,b}`). Brace patterns list each parent
    directory once and intersect, so the fingerprints cost no request per file. Local results are absolute
    paths, remote ones full URLs. A spec that matches nothing, or brace names that do not exist, raise
    StorageError."""
    if isinstance(inputs, str):
        inputs = [inputs]
    found: dict[str, dict[str, Any]] = {}
    for inp in inputs:
        found.update(_expand_one(inp, storage_options))
    return sorted(found.items())


def expand_inputs(inputs: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[str]:
    """Resolve input specs (files, directories, globs, brace patterns) to sorted, unique full URLs."""
    return [url for url, _ in expand_inputs_with_info(inputs, storage_options)]


def input_fingerprint(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size and mtime (local) or ETag, size and last-modified (objects) of `url`: changes when the file does.
    Equal to the fingerprint `expand_inputs_with_info` reports for the same unchanged file."""
    fs, path = _fs(url, storage_options)
    try:
        return _fingerprint(_retrying(url, "stat", lambda: _info(fs, path)))
    except FileNotFoundError:
        raise _error(f"{url}: no such file") from None


def list_files(dir_url: str, suffix: str = "", storage_options: dict[str, Any] | None = None) -> list[str]:
    """Sorted basenames of the files directly in `dir_url` ending with `suffix` (one listing); [] if the
    directory does not exist."""
    fs, path = _fs(dir_url, storage_options)
    try:
        entries = _retrying(dir_url, "list", lambda: _ls(fs, path))
    except FileNotFoundError:
        return []
    names = (_basename(fs, e["name"]) for e in entries if e.get("type") == "file")
    return sorted(n for n in names if n.endswith(suffix))


def list_files_info(
    dir_url: str, suffix: str = "", storage_options: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Basename -> fingerprint (size, mtime or ETag) of the files directly in `dir_url` ending with `suffix`,
    from one listing (no request per file); {} if the directory does not exist."""
    fs, path = _fs(dir_url, storage_options)
    if isinstance(fs, LocalFileSystem):  # scandir: fsspec's ls costs ~50 us a file, 5 s for 100k markers
        try:
            with os.scandir(path) as found:
                return {
                    e.name: {"size": (st := e.stat()).st_size, "mtime": st.st_mtime}
                    for e in found
                    if e.name.endswith(suffix) and e.is_file()
                }
        except FileNotFoundError:
            return {}
    try:
        entries = _retrying(dir_url, "list", lambda: _ls(fs, path))
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        name = _basename(fs, e["name"])
        if e.get("type") == "file" and name.endswith(suffix):
            out[name] = _fingerprint(e)
    return out


def file_exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a file (not a directory) exists at `url`: one HEAD on S3, where `exists` follows a miss with a
    listing (to find a directory of that name)."""
    fs, path = _fs(url, storage_options)
    if not _is_s3(fs):
        return exists(url, storage_options)
    bucket, key, _ = fs.split_path(path)

    def head() -> bool:
        try:
            fs.call_s3("head_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True

    return _retrying(url, "check existence of", head)


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a file or directory exists at `url` (asked fresh, not from a listing cache)."""
    fs, path = _fs(url, storage_options)

    def check() -> bool:
        fs.invalidate_cache(path)
        return fs.exists(path)

    return _retrying(url, "check existence of", check)


def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the file at `url`; nothing happens if it is already gone."""
    fs, path = _fs(url, storage_options)
    with contextlib.suppress(FileNotFoundError):
        _retrying(url, "remove", lambda: fs.rm_file(path))
    fs.invalidate_cache(path)


# -------------------------------------------------------------------------------------------------- reads


class RetryingReader(io.RawIOBase):
    """Sequential reads over `fs.open(path)` that survive transient errors: the file is re-opened at the
    current offset, with bounded attempts and doubling backoff. Refuses to continue if the object changed
    (size or ETag) between the first open and a re-open, since the bytes would be a mix of two versions."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        url: str,
        open_kwargs: dict[str, Any] | None = None,
        attempts: int | None = None,
        backoff_s: float | None = None,
    ):
        super().__init__()
        self._fs, self._path, self.name = fs, path, url
        self._open_kwargs = dict(open_kwargs or {})
        self._attempts = RETRY_ATTEMPTS if attempts is None else attempts
        self._backoff_s = RETRY_BACKOFF_S if backoff_s is None else backoff_s
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
        for attempt in range(1, self._attempts + 1):
            try:
                if self._f is None:
                    self._reopen()
                return fn()
            except FileNotFoundError:
                raise _error(f"{self.name}: no such file") from None
            except StorageError:
                raise
            except Exception as e:
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
                time.sleep(_backoff(attempt, self._backoff_s))
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
    (`attempts`, `backoff_s` default to RETRY_ATTEMPTS, RETRY_BACKOFF_S). Missing -> StorageError."""
    fs, path = _fs(url, storage_options)
    open_kwargs = (
        {} if isinstance(fs, LocalFileSystem) else {"block_size": READ_BLOCK_SIZE, "cache_type": "readahead"}
    )
    raw = RetryingReader(fs, path, url, open_kwargs, attempts, backoff_s)
    return io.BufferedReader(raw, buffer_size=2**20)


def open_input_fingerprinted(
    url: str, storage_options: dict[str, Any] | None = None
) -> tuple[IO[bytes], dict[str, Any]]:
    """`open_input(url)` and the fingerprint of the version opened, taken from the open's own metadata
    request (object stores: the HEAD that gives the size) instead of a request of its own."""
    stream = open_input(url, storage_options)
    raw = stream.raw
    details = getattr(getattr(raw, "_f", None), "details", None) if isinstance(raw, RetryingReader) else None
    if details and details.get("size") is not None:
        return stream, _fingerprint(details)
    try:  # local files (a stat), or a store whose files keep no details
        return stream, input_fingerprint(url, storage_options)
    except BaseException:
        stream.close()
        raise


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole content of `url` (one request for objects). Missing -> StorageError."""
    fs, path = _fs(url, storage_options)
    try:
        return _retrying(url, "read", lambda: fs.cat_file(path))
    except FileNotFoundError:
        raise _error(f"{url}: no such file") from None


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """`url` parsed as JSON. Missing or malformed -> StorageError."""
    data = read_bytes(url, storage_options)
    try:
        return json.loads(data)
    except ValueError as e:
        raise _error(f"{url}: not valid JSON ({e})") from None


# ------------------------------------------------------------------------------------------------- writes


class _PendingFile(io.RawIOBase):
    """The file `atomic_write` yields: writes go through, but close() does not commit (writers such as
    pyarrow may close their sink); only leaving the block normally does. A failed write (a full disk) is a
    StorageError naming `url`."""

    def __init__(self, f: Any, url: str):
        super().__init__()
        self._f, self._url = f, url
        self._closing = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.closed:
            raise ValueError("write to closed file")
        n = memoryview(b).nbytes
        try:
            self._f.write(b)
        except OSError as e:
            raise _error(f"{self._url}: cannot write ({_describe(e)})") from None
        return n

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        # Not while closing: the commit flushes, and reports a failure as a StorageError. A flush from close()
        # ran in atomic_write's cleanup and raised the raw OSError of a full disk over the real error.
        if not self.closed and not self._closing and not self._f.closed:
            try:
                self._f.flush()
            except OSError as e:
                raise _error(f"{self._url}: cannot write ({_describe(e)})") from None

    def close(self) -> None:
        self._closing = True
        super().close()


def _discard(f: Any) -> None:
    """Abandon an object-store upload: abort it, and never let close() (or garbage collection) commit it."""
    try:
        if callable(getattr(f, "discard", None)):
            f.discard()  # s3fs: aborts the multipart upload, if one was started
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


def _open_for_writing(url: str, fs: fsspec.AbstractFileSystem, path: str, block_size: int) -> Any:
    try:
        return _retrying(url, "open for writing", lambda: fs.open(path, "wb", block_size=block_size))
    except FileNotFoundError as e:
        raise _error(f"{url}: cannot write ({_describe(e)})") from None


@contextlib.contextmanager
def _atomic_upload(
    url: str, fs: fsspec.AbstractFileSystem, path: str, block_size: int
) -> Iterator[IO[bytes]]:
    # The object appears only when close() completes the upload; discard() aborts it on error.
    f = _open_for_writing(url, fs, path, block_size)
    try:
        yield _PendingFile(f, url)  # type: ignore[misc]
    except BaseException:
        _discard(f)
        raise
    try:
        f.close()
    except Exception as e:
        _discard(f)
        raise _error(f"{url}: cannot write ({_describe(e)})") from None


@contextlib.contextmanager
def _atomic_via_temp_key(
    url: str, fs: fsspec.AbstractFileSystem, path: str, block_size: int
) -> Iterator[IO[bytes]]:
    # For filesystems where an opened file is visible at once (memory://) or whose uploads cannot be
    # aborted: write a temporary sibling and move it into place.
    parent = fs._parent(path)
    tmp = posixpath.join(parent, _tmp_name(posixpath.basename(path)))
    with contextlib.suppress(Exception):
        fs.makedirs(parent, exist_ok=True)
    f = _open_for_writing(url, fs, tmp, block_size)
    try:
        yield _PendingFile(f, url)  # type: ignore[misc]
    except BaseException:
        _discard(f)
        with contextlib.suppress(Exception):
            fs.rm_file(tmp)
        fs.invalidate_cache(parent)
        raise
    try:
        f.close()
        fs.mv(tmp, path)
    except Exception as e:
        with contextlib.suppress(Exception):
            fs.rm_file(tmp)
        raise _error(f"{url}: cannot write ({_describe(e)})") from None
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
    """
    fs, path = _fs(url, storage_options)
    block_size = WRITE_BLOCK_SIZE if block_size is None else block_size
    if isinstance(fs, LocalFileSystem):
        cm = _atomic_local(url, path)
    elif _ABORTABLE_UPLOAD_PROTOCOLS.intersection(_protocols(fs)):
        cm = _atomic_upload(url, fs, path, block_size)
    else:
        cm = _atomic_via_temp_key(url, fs, path, block_size)
    with cm as f:
        try:
            yield f
        finally:
            f.close()  # committed or abandoned: no more writes


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


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
    removed = 0
    for name in _temporary_files(dir_url, fs, path):
        with contextlib.suppress(FileNotFoundError):
            _retrying(dir_url, "remove " + name, lambda n=name: fs.rm_file(n))
        removed += 1
    if hasattr(fs, "list_multipart_uploads") and hasattr(fs, "abort_mpu") and hasattr(fs, "split_path"):
        # s3fs. Unfinished uploads are invisible but billed. Best effort: listing them needs a permission
        # (s3:ListBucketMultipartUploads) a job may lack, and the bucket's lifecycle rules may handle them.
        bucket, key, _ = fs.split_path(path)
        try:
            for upload in fs.list_multipart_uploads(bucket):
                if posixpath.dirname(upload["Key"]) == key.rstrip("/"):
                    fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])
                    removed += 1
        except Exception as e:
            logger.warning(redact(f"{dir_url}: cannot clean up unfinished uploads ({_describe(e)})"))
    if removed:
        logger.info(redact(f"{dir_url}: removed {removed} leftover(s) of interrupted writes"))
        fs.invalidate_cache(path)
    return removed


def _temporary_files(dir_url: str, fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The `.tmp-` files directly in `path`. A directory of 100k committed shards must not cost a stat per
    file (local: names only) or 100 listing pages (S3: one listing of the `.tmp-` prefix)."""
    if isinstance(fs, LocalFileSystem):
        try:
            with os.scandir(path) as entries:
                return [e.path for e in entries if e.name.startswith(TMP_PREFIX) and e.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            return []
    if _is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        prefix = f"{key.rstrip('/')}/{TMP_PREFIX}" if key else TMP_PREFIX
        found, token = [], None
        while True:
            kw = {"ContinuationToken": token} if token else {}
            page = _retrying(
                dir_url,
                "list",
                lambda kw=kw: fs.call_s3(
                    "list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/", **kw
                ),
            )
            found += [f"{bucket}/{o['Key']}" for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return found
    try:
        entries = _retrying(dir_url, "list", lambda: _ls(fs, path))
    except FileNotFoundError:
        return []
    names = [_key(fs, e["name"]) for e in entries if e.get("type") == "file"]
    return [n for n in names if _basename(fs, n).startswith(TMP_PREFIX)]


# ------------------------------------------------------------------------------------- conditional writes


class WriteConflict(StorageError):
    """A conditional write or delete found the object absent, present or changed against its condition."""


_LOCK_STALE_S = 30.0  # a local lock file older than this was left by a process that died inside the lock
_warned_unconditional: set[str] = set()


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
            raise _error(f"{url}: cannot write ({_describe(e)})") from None
        finally:
            fs.invalidate_cache(path)
        return str(out.get("ETag", "")).strip('"')
    with _exclusive(url, fs, path):
        _check_version(url, storage_options, if_version)
        write_bytes_atomic(url, data, storage_options)
    return _content_version(data)


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
            raise _error(f"{url}: cannot remove ({_describe(e)})") from None
        finally:
            fs.invalidate_cache(path)
        return
    with _exclusive(url, fs, path):
        _check_version(url, storage_options, if_version)
        remove(url, storage_options)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in _protocols(fs) and hasattr(fs, "call_s3") and hasattr(fs, "split_path")


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
            raise _error(f"{url}: cannot lock ({_describe(e)})") from None
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
