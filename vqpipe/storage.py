"""Every byte vqpipe reads or writes goes through here (fsspec): local paths and any fsspec URL.

(Stub: the storage helper replaces this with the full module, keeping these signatures.)
"""

from __future__ import annotations

from typing import IO, Any

import fsspec

from .errors import StorageError


def open_input(url: str, storage_options: dict[str, Any] | None = None) -> IO[bytes]:
    """Open `url` for streaming binary reads."""
    try:
        return fsspec.open(url, "rb", **(storage_options or {})).open()
    except FileNotFoundError as e:
        raise StorageError(f"{url}: no such file") from e


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    with open_input(url, storage_options) as f:
        return f.read()
