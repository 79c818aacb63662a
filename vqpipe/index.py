"""The ledger index: one row per committed shard, so a plan, a status or a reader needs no marker reads.

`OUT/_vqpipe/index/seg-<time>-<run>-<n>.pq` files (format 1.x: `OUT/index/….parquet`) hold the summary of done
markers (`records.SUMMARY_KEYS`: id, input URL and fingerprint, samples, rows, images, views, errors by reason,
sizes, and the commit fingerprint that the compaction manifest matches) plus `marker`, the fingerprint the
done/ listing gave that marker (size, mtime or ETag) when the row was made from a listing. Later segments win.

The done markers stay the truth; the index is a cache derived from them:
- a row counts only for an id the done/ listing shows (a row never makes a shard look done), and only while
  the listed marker still has the fingerprint the row recorded (a marker rewritten since is read again);
- markers listed but not indexed (or indexed stale) are read and, by the run holding the lease, appended;
- rows appended by the run that committed them carry no marker fingerprint (the worker wrote the marker; the
  driver has only its content): they count while listed, and the next consolidation stamps them.
Only the run holding the lease writes here: appends as shards commit, a consolidated segment at its start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .out.layout import Layout
from .records import DoneRecord, InputRef

logger = logging.getLogger(__name__)

MAX_SEGMENTS = 16  # more than this at a run's start: consolidate into one

SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("marker", pa.string()),  # marker_key of the done/ listing's fingerprint of the marker; null: unknown
        ("url", pa.string()),
        ("input_fingerprint", pa.string()),  # JSON
        ("samples", pa.int64()),
        ("rows", pa.int64()),
        ("errors", pa.int64()),
        ("errors_by_reason", pa.string()),  # JSON
        ("members", pa.int64()),
        ("ignored_members", pa.int64()),
        ("ignored_by_reason", pa.string()),  # JSON
        ("data_bytes", pa.int64()),
        ("error_bytes", pa.int64()),
        ("record_version", pa.int64()),
        # Since format 2: what a training reader plans its epoch with and the compaction manifest matches, so
        # neither reads a marker. Null in rows of older segments: those markers are read again.
        ("images", pa.int64()),
        ("views", pa.string()),  # JSON list
        ("commit", pa.string()),  # DoneRecord.commit_fingerprint()
    ]
)
_SINCE_FORMAT_2 = ("images", "views", "commit")


def _dumps(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def marker_key(fingerprint: dict[str, Any]) -> str:
    """The `marker` column: a listing fingerprint as a canonical string (made and compared 100k times a run,
    so not JSON: `mtime=1.5|size=123`). The done/ listing keeps only this string per marker."""
    if len(fingerprint) == 2 and "mtime" in fingerprint and "size" in fingerprint:  # local: 4x faster
        return f"mtime={fingerprint['mtime']!r}|size={fingerprint['size']!r}"
    return "|".join([f"{k}={v!r}" for k, v in sorted(fingerprint.items())])


def _loads(s: str | None) -> dict[str, Any]:
    return json.loads(s) if s and s != "{}" else {}


def row_of(record: DoneRecord, marker: str | None) -> dict[str, Any]:
    """`marker`: the `marker_key` of the listed marker the record was read from (None: not known)."""
    return {
        "shard_id": record.shard_id,
        "marker": marker,
        "url": record.input.url,
        "input_fingerprint": _dumps(record.input.fingerprint),
        "samples": record.samples,
        "rows": record.rows,
        "errors": record.errors,
        "errors_by_reason": _dumps(record.errors_by_reason),
        "members": record.members,
        "ignored_members": record.ignored_members,
        "ignored_by_reason": _dumps(record.ignored_by_reason),
        "data_bytes": record.data_bytes,
        "error_bytes": record.error_bytes,
        "record_version": record.record_version,
        "images": record.images,
        "views": json.dumps(list(record.views)),
        "commit": record.commit_fingerprint(),
    }


@dataclass
class Committed:
    """The committed shards of an OUT (verified index rows plus markers read): their summaries, by id.

    Rows are kept as one Arrow table, not as 100k Python records: a plan asks for a few inputs, a status for
    column sums; `record(id)` builds one summary record on demand."""

    table: pa.Table
    position: dict[str, int]  # shard id -> row in table
    _columns: dict[str, list[Any]] = field(default_factory=dict)  # Python lists of columns, made on first use

    @property
    def ids(self) -> set[str]:
        return set(self.position)

    def __contains__(self, shard_id: str) -> bool:
        return shard_id in self.position

    def __len__(self) -> int:
        return len(self.position)

    def _column(self, name: str) -> list[Any]:
        if name not in self._columns:  # a plan asks about every committed input: one conversion, not 100k
            self._columns[name] = self.table.column(name).to_pylist()
        return self._columns[name]

    def column(self, name: str, shard_ids: Iterable[str]) -> list[Any]:
        """One summary column (`rows`, `images`, `commit`, `data_bytes`, ...) for `shard_ids`, in their order."""
        column, position = self._column(name), self.position
        return [column[position[i]] for i in shard_ids]

    def views(self, shard_ids: Iterable[str]) -> list[tuple[str, ...]]:
        """Each shard's views, in the order of an image's rows (markers from before views: center)."""
        parsed: dict[str | None, tuple[str, ...]] = {}  # mostly one value over 100k shards: parse it once
        out = []
        for text in self.column("views", shard_ids):
            if text not in parsed:
                parsed[text] = tuple(json.loads(text)) if text else ("center",)
            out.append(parsed[text])
        return out

    def input(self, shard_id: str) -> InputRef:
        i = self.position[shard_id]
        return InputRef(self._column("url")[i] or "", _loads(self._column("input_fingerprint")[i]))

    def url(self, shard_id: str) -> str:
        """The input URL the marker recorded (credentials masked)."""
        return self._column("url")[self.position[shard_id]] or ""

    def urls(self, shard_ids: Iterable[str]) -> list[str]:
        """`url` of each of `shard_ids` (a plan.json names every committed input)."""
        column, position = self._column("url"), self.position
        return [column[position[i]] or "" for i in shard_ids]

    def input_fingerprints(self, shard_ids: list[str]) -> list[dict[str, Any]]:
        """The input fingerprints the markers of `shard_ids` recorded, parsed as one JSON document: a plan
        asks this of every committed input, and 100k `json.loads` calls cost 10x one call on their join."""
        column = self._column("input_fingerprint")
        position = self.position
        return json.loads("[" + ",".join([column[position[i]] or "{}" for i in shard_ids]) + "]")

    def record(self, shard_id: str) -> DoneRecord:
        """The summary of one shard's done record (counts, input, sizes; no timings)."""
        row = self.table.slice(self.position[shard_id], 1).to_pylist()[0]
        return _record_of(row)

    def totals(self, shard_ids: Iterable[str]) -> dict[str, Any]:
        """samples, rows, data_bytes and errors/ignored members by reason, summed over `shard_ids`.

        In Python over whole columns, each distinct by-reason JSON parsed once with its count (a status over
        100k shards asks it of all of them: mostly one value, "{}"). Not Arrow compute: in this pyarrow any
        compute call imports pandas (0.6 s and 50 MB)."""
        rows = [self.position[i] for i in shard_ids]
        whole = len(rows) == self.table.num_rows  # the usual status: every committed shard is planned
        out: dict[str, Any] = {}
        for k in ("samples", "rows", "data_bytes"):
            column = self.table.column(k).to_pylist()
            out[k] = sum(filter(None, column if whole else (column[i] for i in rows)))
        for k in ("errors_by_reason", "ignored_by_reason"):
            column = self.table.column(k).to_pylist()
            total: dict[str, int] = {}
            for text, count in Counter(column if whole else (column[i] for i in rows)).items():
                for reason, n in _loads(text).items():
                    total[reason] = total.get(reason, 0) + n * count
            out[k] = total
        return out


def _record_of(row: dict[str, Any]) -> DoneRecord:
    return DoneRecord(
        shard_id=row["shard_id"],
        input=InputRef(row["url"] or "", _loads(row["input_fingerprint"])),
        samples=row["samples"] or 0,
        rows=row["rows"] or 0,
        errors=row["errors"] or 0,
        errors_by_reason=_loads(row["errors_by_reason"]),
        members=row["members"],
        ignored_members=row["ignored_members"] or 0,
        ignored_by_reason=_loads(row["ignored_by_reason"]),
        data_bytes=row["data_bytes"] or 0,
        error_bytes=row["error_bytes"] or 0,
        record_version=row["record_version"] or 0,
        images=row["images"],
        views=json.loads(row["views"]) if row["views"] else ["center"],
    )


class LedgerIndex:
    """Reads and appends the segments under OUT/index/."""

    def __init__(self, layout: Layout, storage_options: dict[str, Any] | None = None, run_id: str = "status"):
        self.dir = layout.meta("index")
        self.suffix = layout.table_suffix
        self.storage_options = storage_options
        self.run_id = run_id
        self._seq = 0
        self.segments: list[str] = []  # as found by the latest load()

    def load(self) -> pa.Table:
        """All rows of all segments, later segments last (empty table when there is no index). A segment that
        cannot be read is skipped with a warning: the markers it summarised are read instead."""
        self.segments = storage.list_files(self.dir, self.suffix, self.storage_options)
        tables: list[pa.Table] = []
        with _system_memory_pool():
            for name in self.segments:  # names sort by time
                self._read_segment(name, tables)
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()

    def _read_segment(self, name: str, tables: list[pa.Table]) -> None:
        url = storage.join(self.dir, name)
        try:
            with storage.open_input(url, self.storage_options) as f:
                # ParquetFile, not read_table: that imports pyarrow.dataset (a second per process)
                pf = pq.ParquetFile(f)
                have = [n for n in SCHEMA.names if n in pf.schema_arrow.names]
                table = pf.read(columns=have)
                for name in SCHEMA.names:  # a segment of an older vqpipe: its rows are re-read (null commit)
                    if name not in have and name in _SINCE_FORMAT_2:
                        table = table.append_column(name, pa.nulls(table.num_rows, SCHEMA.field(name).type))
                tables.append(table.select(SCHEMA.names).cast(SCHEMA))
        except Exception as e:  # noqa: BLE001 - a damaged cache costs marker reads, never the run
            if storage.exists(url, self.storage_options):
                logger.warning("%s: unreadable index segment, ignored (%s)", storage.redact(url), e)
            else:  # consolidated by the run holding the lease since our listing: its rows are elsewhere
                logger.debug("%s: replaced while being read", storage.redact(url))

    def append(self, rows: list[dict[str, Any]]) -> str | None:
        """Write `rows` as a new segment (one PUT); returns its name."""
        if not rows:
            return None
        return self._write(pa.Table.from_pylist(rows, schema=SCHEMA))

    def _write(self, table: pa.Table) -> str:
        self._seq += 1
        name = f"seg-{time.time_ns():020d}-{self.run_id}-{self._seq:04d}{self.suffix}"
        with storage.atomic_write(storage.join(self.dir, name), self.storage_options) as f:
            pq.write_table(table, f, compression="zstd")
        return name

    def replace(self, table: pa.Table, old_segments: list[str]) -> None:
        """Write `table` as one segment, then remove `old_segments` (a crash in between leaves duplicate rows,
        which later-wins reading resolves)."""
        name = self._write(table.cast(SCHEMA)) if table.num_rows else None
        for old in old_segments:
            if old != name:
                storage.remove(storage.join(self.dir, old), self.storage_options)


@contextlib.contextmanager
def _system_memory_pool() -> Iterator[None]:
    """Arrow allocates from the system allocator meanwhile: decoding a 100k-row segment through the default
    pool (mimalloc) leaves ~35 MB more resident than the 21 MB table, for the rest of the process."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def verified(table: pa.Table, listing: dict[str, str]) -> tuple[pa.Table, dict[str, int], bool]:
    """The latest row of each listed id whose marker fingerprint matches the listing (or is unknown), as a
    table; its positions; and whether the table differs from what the segments hold (rows dropped, stale or
    duplicated, or markers unstamped), i.e. whether consolidating would change anything. `listing`: id ->
    `marker_key` of each listed marker."""
    ids = table.column("shard_id").to_pylist()
    markers = table.column("marker").to_pylist()
    commits = table.column("commit").to_pylist()
    latest: dict[str, int] = {}
    for i, sid in enumerate(ids):
        latest[sid] = i
    keep, dirty = [], len(latest) != len(ids)
    for sid, i in latest.items():
        listed = listing.get(sid)
        if listed is None:
            dirty = True
            continue
        if commits[i] is None:
            dirty = True  # written by an older vqpipe, without what format 2 keeps: read the marker again
            continue
        if markers[i] is None:
            dirty = True  # trusted while listed; consolidation stamps it
        elif markers[i] != listed:
            dirty = True  # the marker was rewritten since: read it again
            continue
        keep.append(i)
    keep.sort()
    # the usual case, every row kept as it is, needs no selection (which would import pandas)
    picked = table if len(keep) == table.num_rows else table.take(pa.array(keep, pa.int64()))
    position = {ids[i]: n for n, i in enumerate(keep)}  # `keep` is sorted: row n of `picked` is row keep[n]
    return picked, position, dirty


def stamped(table: pa.Table, listing: dict[str, str]) -> pa.Table:
    """`table` with every row's marker set to the listing's fingerprint (`marker_key`) of its marker."""
    marker = pa.array([listing[s] for s in table.column("shard_id").to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index("marker"), "marker", marker)
