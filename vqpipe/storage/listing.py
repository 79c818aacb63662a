"""Listing: input specs (files, directories, globs, brace patterns) expanded to shard URLs with one
paginated listing per parent directory, and each input's version (size, mtime or ETag) taken from that
listing; existence checks and removal."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import functools
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from ..errors import StorageError
from ..gcpause import without_cyclic_gc
from . import deadlines
from .deadlines import bounded
from .redaction import _error, _not_found, redact
from .retries import _info, _ls, _retrying
from .urls import _basename, _fs, _is_s3, _key, _url

logger = logging.getLogger(__name__)

# File names a glob or directory expands to shards; other matches (img2dataset's .parquet and _stats.json side
# files) are skipped. A file named explicitly is always planned: the reader then says whether it is a tar.
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

_BRACE = re.compile(r"\{[^{}]*(?:\.\.|,)[^{}]*\}")
_GLOB_MAGIC = re.compile(r"[*?\[]")


def _input_version(info: dict[str, Any]) -> dict[str, Any]:
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
    # One deadline per request-sized step: a brace pattern over many directories is many listings.
    retrying = functools.partial(_retrying, deadline_s=deadlines.seconds_of(storage_options))

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
                entries = retrying(inp, "list " + parent, functools.partial(_ls, fs, parent))
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
            yield _url(fs, name), _input_version(found[name])
        return

    if isinstance(fs, LocalFileSystem):
        local = _expand_local(inp, path)
        if local is not None:
            yield from local
            return

    if _GLOB_MAGIC.search(path):
        fs.invalidate_cache()  # glob may read any cached listing below its root: make them all fresh
        matches = retrying(inp, "list", lambda: fs.glob(path, detail=True))
        files = [(name, info) for name, info in matches.items() if info.get("type") == "file"]
        if not files:
            with contextlib.suppress(FileNotFoundError, StorageError):  # a name with "[" in it, not a glob
                files = [(path, retrying(inp, "stat", lambda: _info(fs, path)))]
        if not files or files[0][1].get("type") != "file":
            raise _error(f"{inp}: matches no files")
        files = _tars_only(inp, files)
        for name, info in files:
            yield _url(fs, _key(fs, name)), _input_version(info)
        return

    try:
        info = retrying(inp, "stat", lambda: _info(fs, path))
    except FileNotFoundError:
        raise _error(f"{inp}: no such file or directory") from None
    if info.get("type") != "directory":
        yield _url(fs, path), _input_version(info)
        return
    entries = retrying(inp, "list", lambda: _ls(fs, path))
    files = [(e["name"], e) for e in entries if e.get("type") == "file"]
    for name, info in _tars_only(inp, files):
        yield _url(fs, _key(fs, name)), _input_version(info)


def _expand_local(inp: str, path: str) -> list[tuple[str, dict[str, Any]]] | None:
    """A local directory, or a glob in the last path component only (`shards/*.tar`), listed with one
    `os.scandir`: fsspec's glob costs ~30 us and a ~1 KB dict a file (3 s and 100 MB at 100k inputs), this a
    tenth. None when this path does not apply (the general code then answers, errors included). Symlinks are
    followed, as `input_version` does, so the listed version is the one a later stat of the URL gives."""
    parent, pattern = os.path.split(path)
    if not (_GLOB_MAGIC.search(pattern) and not _GLOB_MAGIC.search(parent) and "**" not in pattern):
        if _GLOB_MAGIC.search(path) or not os.path.isdir(path):
            return None
        parent, pattern = path, "*"  # a directory: all its files
    match = re.compile(fnmatch.translate(pattern)).match  # fnmatchcase, compiled once
    prefix = parent if parent.endswith(os.sep) else parent + os.sep
    try:
        files = [(prefix + name, version) for name, version in _scan_local(parent, match)]
    except OSError:  # missing, not a directory, not readable: the general code says which
        return None
    if not files:
        return None  # no match: maybe a file with "[" in its name; the general code decides
    return _tars_only(inp, files)


def _scan_local(path: str, keep: Callable[[str], object]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, version) of the files directly in local directory `path` whose names `keep` accepts, from one
    `os.scandir` and a stat each (links followed, as `input_version` does). A file removed since the scan, or a
    broken link, is not listed; errors opening `path` propagate."""
    with os.scandir(path) as entries:
        for e in entries:
            if keep(e.name) and e.is_file():
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                yield e.name, {"size": st.st_size, "mtime": st.st_mtime}


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


@without_cyclic_gc
def expand_inputs_with_info(
    inputs: Sequence[str], storage_options: dict[str, Any] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Resolve input specs to (url, input version) pairs, sorted by url and de-duplicated.

    Each spec is a file, a directory (its *.tar files, not recursive), a glob (`shards/*.tar`) or a
    WebDataset brace pattern (`part-{000000..000099}.tar`, `{a,b}`). Brace patterns list each parent
    directory once and intersect, so the versions cost no request per file. Local results are absolute
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


@bounded
def input_version(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size and mtime (local) or ETag, size and last-modified (objects) of `url`: changes when the file does.
    Equal to the version `expand_inputs_with_info` reports for the same unchanged file. (In done records this
    is the input's `fingerprint` key; in vqpipe's code, "fingerprint" is the output settings' hash.)"""
    fs, path = _fs(url, storage_options)
    try:
        return _input_version(_retrying(url, "stat", lambda: _info(fs, path)))
    except FileNotFoundError:
        raise _not_found(url) from None


@bounded
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
    """Basename -> version (size, mtime or ETag) of the files directly in `dir_url` ending with `suffix`,
    from one listing (no request per file); {} if the directory does not exist."""
    return dict(iter_files_info(dir_url, suffix, storage_options))


def iter_files_info(
    dir_url: str, suffix: str = "", storage_options: dict[str, Any] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(basename, version) of each file `list_files_info` gives, one at a time: a caller keeping something
    smaller than the version dict per file (100k done markers) never holds them all."""
    fs, path = _fs(dir_url, storage_options)
    if isinstance(fs, LocalFileSystem):  # scandir: fsspec's ls costs ~50 us a file, 5 s for 100k markers
        with contextlib.suppress(FileNotFoundError):
            yield from _scan_local(path, lambda name: name.endswith(suffix))
        return
    try:
        listing = functools.partial(_ls, fs, path)
        entries = _retrying(dir_url, "list", listing, deadline_s=deadlines.seconds_of(storage_options))
    except FileNotFoundError:
        return
    for e in entries:
        name = _basename(fs, e["name"])
        if e.get("type") == "file" and name.endswith(suffix):
            yield name, _input_version(e)


@bounded
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


@bounded
def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a file or directory exists at `url` (asked fresh, not from a listing cache)."""
    fs, path = _fs(url, storage_options)

    def check() -> bool:
        fs.invalidate_cache(path)
        return fs.exists(path)

    return _retrying(url, "check existence of", check)


@bounded
def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the file at `url`; nothing happens if it is already gone."""
    fs, path = _fs(url, storage_options)
    with contextlib.suppress(FileNotFoundError):
        _retrying(url, "remove", lambda: fs.rm_file(path))
    fs.invalidate_cache(path)
