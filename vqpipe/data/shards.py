"""One DataLoader worker's reads: the rows behind the epoch's spans, one open data file at a time, the row groups
of a span decoded in one pyarrow call. Local files are memory-mapped; URLs stream through vqpipe's storage layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import StorageError
from .epoch import EpochPlan, row_group_order
from .rows import RowBlock, to_block


class ShardReader:
    """Rows of the epoch's spans, one open data file and one decoded row group at a time."""

    def __init__(self, ds: Any):  # a TokenDataset: its files, columns, seed and epoch
        self.ds = ds
        self.shard: int | None = None
        self.file: pq.ParquetFile | None = None
        self.source: Any = None
        self.rg_order: np.ndarray = np.arange(0)
        self.rg_starts: np.ndarray = np.zeros(1, dtype=np.int64)
        self.groups: dict[int, RowBlock] = {}  # decoded row groups of the open shard
        self.last: int | None = None

    def read(self, plan: EpochPlan, begin: int, end: int) -> RowBlock:
        return RowBlock.concat([self._span(s.shard, s.start, s.stop) for s in plan.spans(begin, end)])

    def _span(self, shard: int, start: int, stop: int) -> RowBlock:
        self._open(shard)
        first = int(np.searchsorted(self.rg_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.rg_starts, stop, side="left"))  # one past the last row group needed
        self._load([int(g) for g in self.rg_order[first:last]])
        parts = []
        for i in range(first, last):
            lo, hi = self.rg_starts[i], self.rg_starts[i + 1]
            block = self.groups[int(self.rg_order[i])]
            parts.append(block.take(slice(max(start, lo) - lo, min(stop, hi) - lo)))
        return RowBlock.concat(parts)

    def _load(self, groups: list[int]) -> None:
        """Decode the row groups a span needs in one call (pyarrow decodes them in parallel); keep only those
        and the last one, which the next window may start in."""
        keep = {g: b for g, b in self.groups.items() if g in groups or g == self.last}
        missing = [g for g in groups if g not in keep]
        if missing:
            table = self.file.read_row_groups(missing, columns=list(self.ds.columns))
            block = to_block(table, self.ds.label_fill)
            offset = 0
            for g in missing:
                n = self.file.metadata.row_group(g).num_rows
                keep[g] = block.take(slice(offset, offset + n))
                offset += n
        self.groups, self.last = keep, groups[-1] if groups else self.last

    def _open(self, shard: int) -> None:
        if shard == self.shard:
            return
        self.close()
        ds = self.ds
        url, rows = ds.data_urls[shard], ds.shard_rows[shard]
        self.file, self.source = open_parquet(url, ds.storage_options)
        meta = self.file.metadata
        if meta.num_rows != rows:
            raise StorageError(f"{url}: {meta.num_rows} rows, but its done marker says {rows}")
        check_file(self.file.schema_arrow, url, ds.columns)
        order = row_group_order(
            ds.shard_ids[shard], meta.num_row_groups, shuffle=ds.shuffle, seed=ds.seed, epoch=ds.epoch
        )
        sizes = [meta.row_group(int(g)).num_rows for g in order]
        self.shard, self.rg_order = shard, order
        self.rg_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def close(self) -> None:
        for f in (self.file, self.source):
            if f is not None:
                f.close()
        self.file, self.source, self.shard, self.groups, self.last = None, None, None, {}, None


def open_parquet(url: str, storage_options: dict[str, Any] | None) -> tuple[pq.ParquetFile, Any]:
    """The file and, for remote ones, the stream under it (to close). Local files go to pyarrow's own reader
    (memory-mapped); others stream through vqpipe's storage layer (range reads, retries)."""
    try:
        if storage.is_local(url):
            return pq.ParquetFile(url, memory_map=True), None
        source = storage.open_input(url, storage_options)
        return pq.ParquetFile(source), source
    except FileNotFoundError:
        raise StorageError(f"{url}: no such file (its shard has a done marker)") from None


def check_file(schema: pa.Schema, url: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise StorageError(f"{url}: no column(s) {', '.join(missing)} (it has {', '.join(schema.names)})")
