"""Rows -> one Parquet data file and one error file per shard, committed atomically.

Rows stream into row groups as they arrive, so memory stays bounded whatever the shard size. Nothing is
visible under the final names until `commit()`, which writes the error file first and the data file last: the
data file's appearance under `data/` is the shard's commit (docs/format.md), and its footer carries the commit
record (`COMMIT_KEY`) from which the done marker is made again if a crash loses it. Leaving the `with` block by
an exception discards everything. A row that cannot be written (a value Arrow refuses) becomes an error record
for its key, never a shard failure. Pages carry CRC32 checksums, which readers verify.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .schema import ERROR_SCHEMA, data_table

logger = logging.getLogger(__name__)

# Statistics over 680-long code lists and 20k-value tensors cost time and space and answer no query, and
# dictionary-encoding them costs 2.3-3.4 ms of CPU per row for files 3.5% larger (benchmarks/README.md).
# Page checksums: one flipped bit in a codes page must fail the read, not change 11 rows' codes silently.
_PARQUET_OPTIONS = {
    "compression": "zstd",
    "write_statistics": ["key", "label"],
    "use_dictionary": ["label"],
    "write_page_checksum": True,
}
PARQUET_OPTIONS = _PARQUET_OPTIONS  # the same for compacted files (vqpipe/compact.py)
# The Parquet key-value metadata key of a data file's commit record (a done marker without its own size).
COMMIT_KEY = "vqpipe_commit"


@dataclass(frozen=True)
class ErrorRecord:
    """One row of errors/<shard>.parquet: a sample that is not in data/, and why."""

    key: str
    reason: str
    detail: str
    key_raw: bytes | None = None  # the key's exact bytes when they are not UTF-8 (`key` is then escaped)


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
        self.errors: list[ErrorRecord] = []  # appended from the encoding and the writing thread
        self._errors_lock = threading.Lock()
        self._row_error_logged = False
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
        try:
            tables = [data_table(self.schema, keys, labels, metas, codes, var_input, views)]
        except Exception:  # noqa: BLE001 - some row's value: find it, keep the others
            tables = self._rows_one_by_one(keys, labels, metas, codes, var_input, views)
        for table in tables:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            self.rows += table.num_rows
        if self._pending_rows >= self.rows_per_group:
            self._flush(whole_groups_only=True)

    def _rows_one_by_one(self, keys, labels, metas, codes, var_input, views) -> list[pa.Table]:
        tables = []
        for i, key in enumerate(keys):
            one = None if var_input is None else var_input[i : i + 1]
            view = None if views is None else views[i : i + 1]
            try:
                tables.append(
                    data_table(self.schema, [key], [labels[i]], [metas[i]], codes[i : i + 1], one, view)
                )
            except Exception as e:  # noqa: BLE001 - this sample's row only
                if any(err.key == _escaped(key) for err in self.errors):
                    continue  # another view of the same image: one error record per sample
                if not self._row_error_logged:
                    self._row_error_logged = True
                    logger.exception(
                        "%s: a row could not be written; recorded as sample_error", self.data_url
                    )
                self.add_error(key, "sample_error", f"row not writable: {type(e).__name__}: {e}"[:300])
        return tables

    def add_error(self, key: str, reason: str, detail: str, key_raw: bytes | None = None) -> None:
        """Record one sample's error; text that is not valid UTF-8 is stored with `\\xNN` escapes."""
        if key_raw is None and _escaped(key) != key:
            key_raw = key.encode("utf-8", "surrogateescape" if _only_escapes(key) else "backslashreplace")
        with self._errors_lock:
            self.errors.append(ErrorRecord(_escaped(key), reason, _escaped(detail), key_raw))

    def commit(self, record: dict[str, Any] | None = None) -> dict[str, int]:
        """Write the error file, then close the data file under its final name: the shard's commit. `record`:
        the shard's done record as JSON without its sizes; stored, with `error_bytes`, in the data file's footer.
        Returns bytes written."""
        self._flush()
        parquet = self._open_parquet()
        table = pa.Table.from_pylist([vars(e) for e in self.errors], schema=ERROR_SCHEMA)
        with storage.atomic_write(self.errors_url, self.storage_options) as f:
            pq.write_table(table, f, compression="zstd", write_page_checksum=True)
            error_bytes = f.tell()
        if record is not None:
            parquet.add_key_value_metadata({COMMIT_KEY: json.dumps({**record, "error_bytes": error_bytes})})
        self._parquet = None
        parquet.close()
        data_bytes = self._file.tell()
        self._stack.close()  # the atomic commit of the data file
        return {"data_bytes": data_bytes, "error_bytes": error_bytes}

    def _flush(self, whole_groups_only: bool = False) -> None:
        """Write the pending rows as row groups of exactly `rows_per_group` rows (the last of the file may be
        smaller); `whole_groups_only`: keep a remainder pending for the next write."""
        if not self._pending_rows:
            return
        table = pa.concat_tables(self._pending)
        n = self.rows_per_group
        full = table.num_rows // n * n if whole_groups_only else table.num_rows
        if full:
            self._open_parquet().write_table(table.slice(0, full), row_group_size=n)
        rest = table.slice(full)
        self._pending, self._pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def _open_parquet(self) -> pq.ParquetWriter:
        if self._parquet is None:
            raise RuntimeError(f"{self.data_url}: the shard writer is used outside its `with` block")
        return self._parquet


def _escaped(text: str) -> str:
    """`text` as valid UTF-8: bytes tarfile kept as surrogates (surrogateescape) become `\\xNN`."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        if not _only_escapes(text):  # lone surrogates that stand for no byte: write their code points
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _only_escapes(text: str) -> bool:
    try:
        text.encode("utf-8", "surrogateescape")
        return True
    except UnicodeEncodeError:
        return False
