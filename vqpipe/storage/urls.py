"""URLs and paths: the protocol of a URL, joining, and the fsspec filesystem a URL lives on."""

from __future__ import annotations

import contextlib
import os
import posixpath
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import deadlines
from .redaction import _describe, _error


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
    options = deadlines.fsspec_options(storage_options)
    if protocol(url) in ("s3", "s3a"):
        with contextlib.suppress(ImportError):  # without s3fs, url_to_fs says what to install
            from .s3session import with_deadline_session

            options = with_deadline_session(options)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
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


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in _protocols(fs) and hasattr(fs, "call_s3") and hasattr(fs, "split_path")
