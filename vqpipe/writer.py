"""Rows -> one Parquet data file and one error file per shard, committed atomically.

Rows stream into row groups as they arrive, so memory stays bounded whatever the shard size. Nothing is
visible under the final names until `commit()`; leaving the `with` block by an exception discards everything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .schema import ERROR_SCHEMA, data_table

logger = logging.getLogger(__name__)

# Statistics over 680-long code lists and 20k-value tensors cost time and space and answer no query, and
# dictionary-encoding them costs 2.3-3.4 ms of CPU per row for files 3.5% larger (benchmarks/README.md).
_PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": ["key", "label"], "use_dictionary": ["label"]}


class ShardWriter:
    def __init__(
        self,
        data_url: str,
        errors_url: str,
        schema: pa.Schema,
        rows_per_group: int,
        storage_options: dict[str, Any] | None = None,
    ):
        self.data_url, self.errors_url = data_url, errors_url
        self.schema = schema
        self.rows_per_group = rows_per_group
        self.storage_options = storage_options
        self.rows = 0
        self.errors: list[tuple[str, str, str]] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._stack = contextlib.ExitStack()
        self._file: Any = None
        self._parquet: pq.ParquetWriter | None = None

    def __enter__(self) -> ShardWriter:
        self._file = self._stack.enter_context(storage.atomic_write(self.data_url, self.storage_options))
        self._parquet = pq.ParquetWriter(self._file, self.schema, **_PARQUET_OPTIONS)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._parquet is not None:  # commit() was not reached: abort without committing anything
            self._parquet = None
            self._stack.__exit__(exc_type or RuntimeError, exc or RuntimeError("shard writer aborted"), tb)

    def write(
        self,
        keys: Sequence[str],
        labels: Sequence[int | None],
        metas: Sequence[str | None],
        codes: np.ndarray,
        var_input: np.ndarray | None,
        views: Sequence[str] | None = None,
    ) -> None:
        self._pending.append(data_table(self.schema, keys, labels, metas, codes, var_input, views))
        self._pending_rows += len(keys)
        self.rows += len(keys)
        if self._pending_rows >= self.rows_per_group:
            self._flush()

    def add_error(self, key: str, reason: str, detail: str) -> None:
        self.errors.append((key, reason, detail))

    def commit(self) -> dict[str, int]:
        """Close the data file under its final name, then the error file. Returns bytes written."""
        self._flush()
        parquet, self._parquet = self._parquet, None
        parquet.close()
        data_bytes = self._file.tell()
        self._stack.close()  # the atomic commit of the data file
        table = pa.Table.from_pylist(
            [{"key": k, "reason": r, "detail": d} for k, r, d in self.errors], schema=ERROR_SCHEMA
        )
        with storage.atomic_write(self.errors_url, self.storage_options) as f:
            pq.write_table(table, f, compression="zstd")
            error_bytes = f.tell()
        return {"data_bytes": data_bytes, "error_bytes": error_bytes}

    def _flush(self) -> None:
        if self._pending_rows:
            table = pa.concat_tables(self._pending)
            self._parquet.write_table(table, row_group_size=max(self.rows_per_group, table.num_rows))
            self._pending, self._pending_rows = [], 0
