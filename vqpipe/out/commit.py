"""A format-2 data file is its shard's commit; its footer keeps the commit record (`writer.COMMIT_KEY`), from
which the done marker is made again when a crash came between the data file and the marker."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import StorageError
from ..records import DoneRecord
from ..writer import COMMIT_KEY


def read_commit_record(
    url: str, shard_id: str, storage_options: dict[str, Any] | None = None, size: int | None = None
) -> DoneRecord | None:
    """The done record in the footer of the data file at `url` (its `data_bytes`: `size`, else the file's size),
    or None when there is no file there or it carries no record (not written by vqpipe 2)."""
    try:
        with storage.open_input(url, storage_options) as f:
            kv = pq.ParquetFile(f).metadata.metadata or {}
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError) as e:
        raise StorageError(
            storage.redact(f"{url}: not a readable Parquet file ({type(e).__name__}: {e})")
        ) from None
    raw = kv.get(COMMIT_KEY.encode())
    if raw is None:
        return None
    try:
        record = DoneRecord.from_json(json.loads(raw))
    except (ValueError, TypeError) as e:
        raise StorageError(storage.redact(f"{url}: a damaged commit record ({e})")) from None
    if record.shard_id != shard_id:
        raise StorageError(
            storage.redact(f"{url}: holds the commit of shard {record.shard_id!r}, not {shard_id!r}")
        )
    if size is None:
        size = int(storage.input_version(url, storage_options).get("size", 0))
    record.data_bytes = size
    record.as_written = None  # hashed as the marker written from it will read
    return record
