"""One DataLoader worker's reads: the rows behind the epoch's spans, one open file at a time (a shard's data file or
a compacted file), the row groups of a span decoded in one pyarrow call (or a few, each about a window of rows).
Local files are memory-mapped; URLs stream through vqpipe's storage layer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import StorageError
from ..manifest import Source
from .epoch import EpochPlan, row_group_order
from .rows import RowBlock, to_block
from .views import check_file_views, check_picked


class ShardReader:
    """Rows of the epoch's spans, one open file and its decoded row groups at a time.

    The epoch plan counts in "sources" (manifest.Source): a shard's data file, or the rows of a compacted file
    that count. A source is a list of segments, each rows [lo, hi) of one physical row group (a whole row group
    for a data file); shuffling permutes the segments, seeded by the source's id. With one view per image
    (views.py) a position is an image and a segment stands for the images whose picked row lies in it, so each
    row group is still decoded once per epoch, whatever the views and wherever the row groups cut images."""

    def __init__(self, ds: Any):  # a TokenDataset: its sources, columns, view choice, seed and epoch
        self.ds = ds
        self.source_index: int | None = None
        self.url = ""
        self.file: pq.ParquetFile | None = None
        self.source: Any = None
        self.group_rows: list[int] = []
        self.segments: list[tuple[int, int, int]] = []  # (row group, lo, hi) in file order
        self.seg_rows: np.ndarray = np.zeros(
            1, dtype=np.int64
        )  # first row (of those that count) of each segment
        self.picks: np.ndarray | None = None  # per image, the view index picked; None: every row is read
        self.picked: np.ndarray | None = None  # per image, the row picked
        self.units: list[tuple[int, int, int]] = []  # (segment, first, stop) rows or images, in epoch order
        self.unit_starts: np.ndarray = np.zeros(1, dtype=np.int64)
        self.groups: dict[int, RowBlock] = {}  # decoded row groups of the open file
        self.last: int | None = None

    def read(self, plan: EpochPlan, begin: int, end: int) -> RowBlock:
        return RowBlock.concat([self._span(s.shard, s.start, s.stop) for s in plan.spans(begin, end)])

    def _span(self, index: int, start: int, stop: int) -> RowBlock:
        self._open(index)
        first = int(np.searchsorted(self.unit_starts, start, side="right")) - 1
        last = int(np.searchsorted(self.unit_starts, stop, side="left"))  # one past the last unit needed
        pieces = []
        for k in range(first, last):
            seg, lo, _ = self.units[k]
            begin = int(self.unit_starts[k])
            a, b = max(start, begin) - begin, min(stop, int(self.unit_starts[k + 1])) - begin
            if a < b:
                pieces.append((seg, lo + a, lo + b))
        parts: list[RowBlock] = []
        for batch in self._batches(pieces):
            self._load(list(dict.fromkeys(self.segments[seg][0] for seg, _, _ in batch)))
            parts += [self._take(*piece) for piece in batch]
        return RowBlock.concat(parts)

    def _take(self, seg: int, first: int, stop: int) -> RowBlock:
        """Rows [first, stop) of segment `seg` (images [first, stop), one row each, when views are picked)."""
        group, lo, _ = self.segments[seg]
        base = int(self.seg_rows[seg]) - lo  # a counted row r is row r - base of the row group
        if self.picked is None or self.picks is None:
            return self.groups[group].take(slice(first - base, stop - base))
        block = self.groups[group].take(self.picked[first:stop] - base)
        check_picked(block, self.picks[first:stop], self.ds.choice, self.url)
        return block

    def _batches(self, pieces: list[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, int]]]:
        """The pieces in runs whose row groups, decoded together, hold at most about one window of rows (with views
        picked, a window of images lies in views x as many rows)."""
        batch: list[tuple[int, int, int]] = []
        groups: set[int] = set()
        rows = 0
        for piece in pieces:
            group = self.segments[piece[0]][0]
            more = 0 if group in groups else self.group_rows[group]
            if batch and rows + more > self.ds.shuffle_buffer:
                yield batch
                batch, groups, rows = [], set(), 0
                more = self.group_rows[group]
            batch.append(piece)
            groups.add(group)
            rows += more
        if batch:
            yield batch

    def _load(self, groups: list[int]) -> None:
        """Decode the row groups a span needs in one call (pyarrow decodes them in parallel); keep only those
        and the last one, which the next window may start in."""
        keep = {g: b for g, b in self.groups.items() if g in groups or g == self.last}
        missing = [g for g in groups if g not in keep]
        if missing:
            if self.file is None:
                raise RuntimeError("ShardReader._load before _open: no file is open")
            try:
                table = self.file.read_row_groups(missing, columns=list(self.ds.read_columns))
            except (pa.ArrowException, OSError) as e:  # a checksum or decoding failure: damage, named
                raise StorageError(
                    f"{self.url}: row groups {missing} cannot be read ({type(e).__name__}: {e}); "
                    "`vqpipe status OUT --verify` checks every file"
                ) from None
            block = to_block(table, self.ds.label_fill)
            offset = 0
            for g in missing:
                n = self.group_rows[g]
                keep[g] = block.take(slice(offset, offset + n))
                offset += n
        self.groups, self.last = keep, groups[-1] if groups else self.last

    def _open(self, index: int) -> None:
        if index == self.source_index:
            return
        self.close()
        ds = self.ds
        src = ds.sources[index]
        self.file, self.source = open_source(src, ds.storage_options, ds.read_columns)
        meta = self.file.metadata
        check_file_views(self.file.schema_arrow, ds.choice, src.url)
        self.group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.segments = row_segments(self.group_rows, src.ranges)
        sizes = [hi - lo for _, lo, hi in self.segments]
        self.seg_rows = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        bounds = self.seg_rows  # segment j: rows, or images, [bounds[j], bounds[j + 1])
        if ds.choice.per_image:
            n_views = len(ds.choice.views)
            images = [ds.shard_rows_by_id[s] // n_views for s in src.shards]
            self.picks = ds.choice.picks(src.shards, images, ds.seed, ds.epoch)
            self.picked = np.arange(len(self.picks), dtype=np.int64) * n_views + self.picks
            bounds = np.searchsorted(
                self.picked, self.seg_rows
            )  # the images whose picked row is in segment j
        order = row_group_order(src.id, len(self.segments), shuffle=ds.shuffle, seed=ds.seed, epoch=ds.epoch)
        self.units = [(int(j), int(bounds[j]), int(bounds[j + 1])) for j in order]
        unit_sizes = [hi - lo for _, lo, hi in self.units]
        self.unit_starts = np.concatenate([[0], np.cumsum(unit_sizes)]).astype(np.int64)
        self.source_index, self.url = index, src.url

    def close(self) -> None:
        for f in (self.file, self.source):
            if f is not None:
                f.close()
        self.file, self.source, self.source_index, self.groups, self.last = None, None, None, {}, None
        self.picks = self.picked = None


def row_segments(
    group_rows: list[int], ranges: Sequence[tuple[int, int]] | None
) -> list[tuple[int, int, int]]:
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


def open_source(
    src: Source, storage_options: dict[str, Any] | None, columns: Sequence[str]
) -> tuple[pq.ParquetFile, Any]:
    """`open_parquet` of a source's file, checked: it holds the rows its done marker (or the compaction manifest)
    says, and `columns`."""
    file, stream = open_parquet(src.url, storage_options)
    try:
        want = src.rows if src.file_rows is None else src.file_rows
        if file.metadata.num_rows != want:
            said = "its done marker says" if src.file_rows is None else "the compaction manifest says"
            raise StorageError(f"{src.url}: {file.metadata.num_rows} rows, but {said} {want}")
        check_file(file.schema_arrow, src.url, columns)
    except BaseException:
        for f in (file, stream):
            if f is not None:
                f.close()
        raise
    return file, stream


def open_parquet(url: str, storage_options: dict[str, Any] | None) -> tuple[pq.ParquetFile, Any]:
    """The file and, for remote ones, the stream under it (to close). Local files go to pyarrow's own reader
    (memory-mapped); others stream through vqpipe's storage layer (range reads, retries). Page checksums are
    verified as pages are read (files written before format 2 have none: nothing to verify)."""
    source = None
    try:
        if storage.is_local(url):
            return pq.ParquetFile(url, memory_map=True, page_checksum_verification=True), None
        source = storage.open_input(url, storage_options)
        return pq.ParquetFile(source, page_checksum_verification=True), source
    except FileNotFoundError:
        raise StorageError(
            f"{storage.redact(url)}: no such file, but committed rows are in it (removed since the dataset was "
            "built, e.g. by `vqpipe compact`? build it again; else `vqpipe status OUT --verify`)"
        ) from None
    except (pa.ArrowException, OSError) as e:
        if source is not None:
            source.close()
        raise StorageError(
            f"{storage.redact(url)}: not a readable Parquet file ({type(e).__name__}: {e}); "
            "`vqpipe status OUT --verify` checks every file"
        ) from None


def check_file(schema: pa.Schema, url: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise StorageError(f"{url}: no column(s) {', '.join(missing)} (it has {', '.join(schema.names)})")
