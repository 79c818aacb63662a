"""One DataLoader worker's reads: the rows behind the epoch's spans, one open file at a time (a shard's data file or
a compacted file), the row groups of a span decoded in one pyarrow call. Local files are memory-mapped; URLs stream through vqpipe's storage layer."""

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
    """Rows of the epoch's spans, one open file and its decoded row groups at a time.

    The epoch plan counts in "sources" (manifest.Source): a shard's data file, or the rows of a compacted file
    that count. A source is a list of segments, each rows [lo, hi) of one physical row group (a whole row group
    for a data file); shuffling permutes the segments, seeded by the source's id."""

    def __init__(self, ds: Any):  # a TokenDataset: its sources, columns, seed and epoch
        self.ds = ds
        self.source_index: int | None = None
        self.file: pq.ParquetFile | None = None
        self.source: Any = None
        self.segments: list[tuple[int, int, int]] = []  # (row group, lo, hi) in epoch order
        self.seg_starts: np.ndarray = np.zeros(1, dtype=np.int64)
        self.groups: dict[int, RowBlock] = {}  # decoded row groups of the open file
        self.last: int | None = None

    def read(self, plan: EpochPlan, begin: int, end: int) -> RowBlock:
        return RowBlock.concat([self._span(s.shard, s.start, s.stop) for s in plan.spans(begin, end)])

    def _span(self, index: int, start: int, stop: int) -> RowBlock:
        self._open(index)
        first = int(np.searchsorted(self.seg_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.seg_starts, stop, side="left"))  # one past the last segment needed
        self._load(list(dict.fromkeys(self.segments[i][0] for i in range(first, last))))
        parts = []
        for i in range(first, last):
            group, lo, _ = self.segments[i]
            begin = int(self.seg_starts[i])
            a, b = max(start, begin) - begin, min(stop, int(self.seg_starts[i + 1])) - begin
            parts.append(self.groups[group].take(slice(lo + a, lo + b)))
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

    def _open(self, index: int) -> None:
        if index == self.source_index:
            return
        self.close()
        ds = self.ds
        src = ds.sources[index]
        self.file, self.source = open_parquet(src.url, ds.storage_options)
        meta = self.file.metadata
        want = src.rows if src.file_rows is None else src.file_rows
        if meta.num_rows != want:
            said = "its done marker says" if src.file_rows is None else "the compaction manifest says"
            raise StorageError(f"{src.url}: {meta.num_rows} rows, but {said} {want}")
        check_file(self.file.schema_arrow, src.url, ds.columns)
        segments = _segments([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], src.ranges)
        order = row_group_order(src.id, len(segments), shuffle=ds.shuffle, seed=ds.seed, epoch=ds.epoch)
        self.segments = [segments[int(k)] for k in order]
        sizes = [hi - lo for _, lo, hi in self.segments]
        self.source_index = index
        self.seg_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def close(self) -> None:
        for f in (self.file, self.source):
            if f is not None:
                f.close()
        self.file, self.source, self.source_index, self.groups, self.last = None, None, None, {}, None


def _segments(group_rows: list[int], ranges: Sequence[tuple[int, int]] | None) -> list[tuple[int, int, int]]:
    """(row group, lo, hi) pieces of the file rows that count, in file order: every row group whole when all rows
    count (a data file: the same order and seeds as before compaction existed)."""
    out = []
    start = 0
    for g, n in enumerate(group_rows):
        for a, b in ranges if ranges is not None else [(start, start + n)]:
            lo, hi = max(a, start), min(b, start + n)
            if lo < hi:
                out.append((g, lo - start, hi - start))
        start += n
    return out


def open_parquet(url: str, storage_options: dict[str, Any] | None) -> tuple[pq.ParquetFile, Any]:
    """The file and, for remote ones, the stream under it (to close). Local files go to pyarrow's own reader
    (memory-mapped); others stream through vqpipe's storage layer (range reads, retries)."""
    try:
        if storage.is_local(url):
            return pq.ParquetFile(url, memory_map=True), None
        source = storage.open_input(url, storage_options)
        return pq.ParquetFile(source), source
    except FileNotFoundError:
        raise StorageError(
            f"{url}: no such file (its shard has a done marker; was the dataset built before a "
            "`vqpipe compact --delete-sources`? build it again)"
        ) from None


def check_file(schema: pa.Schema, url: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise StorageError(f"{url}: no column(s) {', '.join(missing)} (it has {', '.join(schema.names)})")
