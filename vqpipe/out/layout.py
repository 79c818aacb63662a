"""Where each file of an OUT lives, for the two layouts vqpipe reads (docs/format.md).

Format 2 (written by this version): committed rows only under `data/` — a shard's `<id>.parquet`, or a
compacted file — so that any reader pointed at OUT or `OUT/data` reads rows and nothing else; every other file
under `_vqpipe/` (pyarrow, Ray Data and Spark skip `_` names) and, where it is Parquet, named `.pq`, so that
no `**/*.parquet` glob (DuckDB, Polars) finds it. Format 1.x kept bookkeeping beside `data/`: it is read as
it is, and `vqpipe migrate` moves it (vqpipe/out/migrate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import storage

META_DIR = "_vqpipe"
DATA_DIR = "data"
# While a compaction (or a migration) moves rows between files, this file in data/ makes every reader of the
# directory fail loudly instead of reading a row twice or not at all. It is not Parquet; its name and its
# text say what to do. Removed when the move is finished.
INCOMPLETE_NAME = "INCOMPLETE-run-vqpipe-compact.parquet"
COMPACTED_PREFIX = "compacted-"  # data/compacted-<n>.parquet


@dataclass(frozen=True)
class Layout:
    """The paths of one OUT. `version` 2: bookkeeping under `_vqpipe/`; 1: format 1.x, beside `data/`."""

    output: str
    version: int = 2

    def meta(self, *parts: str) -> str:
        """A bookkeeping path: under `_vqpipe/` (format 2) or OUT itself (1.x)."""
        return (
            storage.join(self.output, META_DIR, *parts)
            if self.version >= 2
            else storage.join(self.output, *parts)
        )

    @property
    def run_url(self) -> str:
        return self.meta("run.json")

    @property
    def plan_url(self) -> str:
        return self.meta("plan.json")

    @property
    def lease_url(self) -> str:
        return self.meta("lease.json")

    @property
    def data_dir(self) -> str:
        return storage.join(self.output, DATA_DIR)

    @property
    def table_suffix(self) -> str:
        """The suffix of bookkeeping Parquet files (error records, index segments): not `.parquet` in format 2."""
        return ".pq" if self.version >= 2 else ".parquet"

    @property
    def manifest_url(self) -> str:
        return (
            self.meta("manifest.json")
            if self.version >= 2
            else storage.join(self.output, "compacted", "_manifest.json")
        )

    @property
    def incomplete_url(self) -> str:
        return storage.join(self.data_dir, INCOMPLETE_NAME)

    def data_url(self, shard_id: str) -> str:
        return storage.join(self.data_dir, f"{shard_id}.parquet")

    def errors_url(self, shard_id: str) -> str:
        return self.meta("errors", f"{shard_id}{self.table_suffix}")

    def done_url(self, shard_id: str) -> str:
        return self.meta("done", f"{shard_id}.json")

    def failed_url(self, shard_id: str) -> str:
        return self.meta("failed", f"{shard_id}.json")

    def file_url(self, relative: str) -> str:
        """A file named relative to OUT (a compaction manifest names its files so)."""
        return storage.join(self.output, relative)


def detect(output: str, storage_options: dict[str, Any] | None = None) -> Layout:
    """The layout of the OUT at `output`: format 2 when `_vqpipe/run.json` exists or nothing does yet (a new OUT
    is written in format 2), 1 when only a format-1.x `run.json` does. One or two existence checks."""
    output = output.rstrip("/")
    if storage.exists(storage.join(output, META_DIR, "run.json"), storage_options):
        return Layout(output, 2)
    if storage.exists(storage.join(output, "run.json"), storage_options):
        return Layout(output, 1)
    return Layout(output, 2)
