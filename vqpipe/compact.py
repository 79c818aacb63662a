"""`vqpipe compact`: move committed shards' rows into fewer, larger Parquet files, for readers (docs/compaction.md).

Holds OUT's run lease throughout, so no tokenize run writes meanwhile. Shards whose rows are in their own data file
(and the rows that still count in compacted files holding rows of shards tokenized again since) are packed in
shard-id order into new files `data/compacted-<n>.parquet` of about `target_bytes` (or `target_rows`), with the
data files' schema and metadata and row groups of `row_group_rows`; a file only holds shards whose schema and
metadata (apart from the shard's own id and URL) agree.

A row is never in two files a reader of `data/` sees, nor in none, outside the move: first the marker
`data/INCOMPLETE-…` (out/incomplete.py) makes every directory reader fail; then the new files, each atomic; then
the manifest (`_vqpipe/manifest.json`: the commit point); then the data files and old compacted files it replaced
are removed; then the marker. A compaction killed anywhere leaves the marker, and the next one finishes the job.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage
from .errors import ConfigError, StorageError
from .lease import Lease
from .ledger import Ledger
from .manifest import Manifest, Part, ShardEntry, Source, write_manifest
from .out import card
from .out.incomplete import clear_incomplete, mark_incomplete
from .out.layout import COMPACTED_PREFIX, DATA_DIR
from .out.query import arrow_dataset, duckdb_sql
from .out.snapshot import Snapshot
from .schema import METADATA_KEY, read_metadata
from .writer import PARQUET_OPTIONS

logger = logging.getLogger(__name__)

_PART_NAME = re.compile(rf"^{COMPACTED_PREFIX}(\d+)\.parquet$")
_READ_THREADS = 16  # concurrent footer and shard reads: object-store latency, not bandwidth, bounds them
_FOOTER_CHUNK = 1024
_READ_AHEAD_BYTES = 64 * 2**20  # shards read ahead of the writer (at least one)
# While writing many files, commit the manifest this often: a crash loses at most this much work.
_MANIFEST_EVERY_S = 60.0


@dataclass(frozen=True)
class CompactOptions:
    output: str
    # compressed bytes of the data files packed into one compacted file
    target_bytes: int | None = 256 * 2**20
    target_rows: int | None = None  # instead of (or as well as) target_bytes: whichever is reached first
    row_group_rows: int = 512  # as the tokenizer's rows_per_group: the training reader's memory bound
    storage_options: dict[str, Any] | None = None
    wait_for_lease_s: float = 0.0
    lease_ttl_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("target_bytes", "target_rows", "row_group_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"compact: {name} must be >= 1, got {value}")


@dataclass
class CompactResult:
    new_parts: list[Part] = field(default_factory=list)
    already_compacted: int = 0  # shards whose valid entry an earlier compaction wrote (and that stay there)
    rewritten_parts: int = 0  # compacted files replaced because some of their rows no longer counted
    removed_sources: int = 0  # data files (and replaced compacted files) removed after the manifest

    @property
    def shards(self) -> int:
        return sum(len(p.shards) for p in self.new_parts)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.new_parts)


@dataclass(frozen=True)
class _Piece:
    """Rows of one committed shard to copy: rows [offset, offset + rows) of the file at `url`."""

    id: str
    url: str
    offset: int
    rows: int
    commit: str  # the shard's commit fingerprint (the manifest entry records it)
    footer: pq.FileMetaData
    compat: str  # schema and metadata apart from the shard itself: what one compacted file must share
    bytes: int  # compressed size of these rows (about, for a piece of a compacted file)


def compact(opts: CompactOptions) -> CompactResult:
    """Compact OUT while holding its lease; LeaseError if another run holds it."""
    ledger = Ledger(opts.output, opts.storage_options)
    if ledger.read_run() is None:  # checked before the lease: nothing is written into what is not an OUT
        raise ConfigError(f"{storage.redact(opts.output)}: not a vqpipe output (no run.json)")
    if ledger.layout.version < 2:
        raise ConfigError(
            f"{storage.redact(opts.output)} is a format-1.x OUT; run `vqpipe migrate` on it first (docs/format.md)"
        )
    lease = Lease(opts.output, opts.storage_options, ttl_s=opts.lease_ttl_s, layout=ledger.layout)
    lease.acquire(wait_s=opts.wait_for_lease_s)
    with lease:
        return _compact_holding(opts, ledger, lease)


def _compact_holding(opts: CompactOptions, ledger: Ledger, lease: Lease) -> CompactResult:
    layout, so = ledger.layout, opts.storage_options
    storage.cleanup_temporaries(layout.data_dir, so)
    snap = Snapshot.open(ledger=ledger, maintain=True)  # also writes markers a crash lost
    placed, manifest = snap.placement, snap.manifest
    listed = {p.file for p in manifest.parts}
    unlisted = [n for n in snap.data_files if _PART_NAME.match(n) and f"{DATA_DIR}/{n}" not in listed]
    counted = {part.file for part, _ in placed.compacted.values()}
    stale_parts = [
        p
        for p in manifest.parts
        if p.file not in counted or any(e.id not in placed.compacted for e in p.shards)
    ]
    superseded = [i for i in placed.compacted if f"{i}.parquet" in snap.data_files]
    result = CompactResult(rewritten_parts=sum(1 for p in stale_parts if p.file in counted))
    if not (placed.in_data or stale_parts or unlisted or superseded or snap.incomplete):
        result.already_compacted = len(placed.compacted)
        return result
    mark_incomplete(layout, so, "vqpipe compact is moving rows")
    for name in unlisted:  # written by a compaction that died before its manifest: nothing refers to them
        logger.info("removing %s: written by an interrupted compaction, listed nowhere", name)
        storage.remove(storage.join(layout.data_dir, name), so)
    rewrite = {p.file for p in stale_parts}
    result.already_compacted = sum(1 for part, _ in placed.compacted.values() if part.file not in rewrite)
    todo = _pieces(snap, placed.in_data, [p for p in stale_parts if p.file in counted])  # lazily: 1M footers
    parts = [p for p in manifest.parts if p.file not in rewrite]
    names = [
        *(n for n in snap.data_files if n not in unlisted),
        *(p.file.split("/")[-1] for p in manifest.parts),
    ]
    number = 1 + max((int(m.group(1)) for n in names if (m := _PART_NAME.match(n))), default=-1)
    last_commit = time.monotonic()
    for group in _pack(todo, opts):
        lease.check()  # a compaction that lost its lease stops writing
        part = _write_part(snap, f"{COMPACTED_PREFIX}{number:06d}.parquet", group, opts.row_group_rows)
        parts.append(part)
        result.new_parts.append(part)
        number += 1
        logger.info("%s: %d shards, %d rows, %d bytes", part.file, len(part.shards), part.rows, part.bytes)
        if not rewrite and time.monotonic() - last_commit > _MANIFEST_EVERY_S:
            # (not while rewriting: a shard would be listed in its old file and its new one until the end)
            write_manifest(layout, Manifest(tuple(parts)), so)
            last_commit = time.monotonic()
    lease.check()
    write_manifest(layout, Manifest(tuple(parts)), so)  # the commit point of this compaction
    # Now every committed row is in exactly one listed file: remove what the manifest replaced.
    done = Snapshot.open(ledger=ledger)
    doomed = [f"{i}.parquet" for i in done.placement.compacted if f"{i}.parquet" in snap.data_files]
    doomed += [p.file.split("/")[-1] for p in stale_parts]
    for name in doomed:
        storage.remove(storage.join(layout.data_dir, name), so)
    result.removed_sources = len(doomed)
    left = sorted(set(done.unexpected()) - set(doomed))
    if left:
        logger.warning(
            "data/ holds files that are no committed rows (readers of data/ read them): %s", left[:5]
        )
    clear_incomplete(layout, so)
    card.write_quietly(done, len(ledger.failed_ids() - done.committed.ids))
    return result


def _pieces(snap: Snapshot, in_data: list[str], stale_parts: list[Part]) -> Iterator[_Piece]:
    """What to copy, in shard-id order: the data files of `in_data`, and the rows that still count in
    `stale_parts`; footers read concurrently (on an object store each is a round trip or two)."""
    commits = dict(zip(snap.shard_ids, snap.committed.column("commit", snap.shard_ids)))
    wanted: list[
        tuple[str, str, int, int, int | None]
    ] = []  # id, url, offset, rows, file rows (None: a data file)
    for i, rows in zip(in_data, snap.rows(in_data)):
        wanted.append((i, snap.ledger.data_url(i), 0, rows, None))
    for part in stale_parts:
        for e in part.shards:
            if e.id in snap.placement.compacted and snap.placement.compacted[e.id][0].file == part.file:
                wanted.append((e.id, snap.layout.file_url(part.file), e.offset, e.rows, part.rows))
    wanted.sort()
    footers: dict[str, pq.FileMetaData] = {}

    def load(w: tuple[str, str, int, int, int | None]) -> _Piece:
        shard_id, url, offset, rows, file_rows = w
        footer = footers.get(url) or _footer(url, snap.ledger.storage_options)
        footers[url] = footer
        want = rows if file_rows is None else file_rows
        if footer.num_rows != want:
            raise StorageError(
                f"{storage.redact(url)}: {footer.num_rows} rows, but {want} are committed there"
            )
        schema = footer.schema.to_arrow_schema()
        meta = read_metadata(schema)
        for key in ("shard", "compacted"):
            meta.pop(key, None)
        compat = schema.remove_metadata().to_string() + json.dumps(meta, sort_keys=True)
        size = sum(
            footer.row_group(g).column(c).total_compressed_size
            for g in range(footer.num_row_groups)
            for c in range(footer.num_columns)
        )
        size = size if file_rows is None else size * rows // max(1, file_rows)
        return _Piece(shard_id, url, offset, rows, commits[shard_id] or "", footer, compat, size)

    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        for start in range(0, len(wanted), _FOOTER_CHUNK):  # bounded: footers of 1M shards do not fit
            yield from pool.map(load, wanted[start : start + _FOOTER_CHUNK])


def _footer(url: str, storage_options: dict[str, Any] | None) -> pq.FileMetaData:
    try:
        with storage.open_input(url, storage_options) as f:
            return pq.ParquetFile(f).metadata
    except FileNotFoundError:
        raise StorageError(f"{storage.redact(url)}: no such file, but committed rows are in it") from None
    except (pa.ArrowException, OSError) as e:
        raise StorageError(
            f"{storage.redact(url)}: not a readable Parquet file ({type(e).__name__}: {e})"
        ) from None


def _pack(pieces: Iterable[_Piece], opts: CompactOptions) -> Iterator[list[_Piece]]:
    """Pieces (in id order) into groups up to the target size, one open group per kind of file (schema and
    metadata), so that shards of interleaved settings (e.g. two GPU types) still fill large files; a shard is
    never split."""
    open_groups: dict[str, tuple[list[_Piece], list[int]]] = {}  # compat -> (pieces, [rows, bytes])
    for s in pieces:
        group, size = open_groups.get(s.compat, ([], [0, 0]))
        full = (opts.target_rows is not None and size[0] + s.rows > opts.target_rows) or (
            opts.target_bytes is not None and size[1] + s.bytes > opts.target_bytes
        )
        if group and full:
            yield group
            group, size = [], [0, 0]
        group.append(s)
        size[0] += s.rows
        size[1] += s.bytes
        open_groups[s.compat] = (group, size)
    yield from sorted((g for g, _ in open_groups.values() if g), key=lambda g: g[0].id)


def _read_ahead(group: list[_Piece], load: Callable[[_Piece], pa.Table]) -> Iterator[tuple[_Piece, pa.Table]]:
    """load(s) for the group's pieces in order, in threads, up to _READ_AHEAD_BYTES (compressed) ahead."""
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        queue: deque = deque()
        ahead = 0
        for s in group:
            while queue and ahead + s.bytes > _READ_AHEAD_BYTES:
                done, future = queue.popleft()
                ahead -= done.bytes
                yield done, future.result()
            queue.append((s, pool.submit(load, s)))
            ahead += s.bytes
        while queue:
            done, future = queue.popleft()
            yield done, future.result()


def _write_part(snap: Snapshot, name: str, group: list[_Piece], row_group_rows: int) -> Part:
    """Copy the group's rows, shard after shard, into one file committed atomically as data/`name`."""
    url = storage.join(snap.layout.data_dir, name)
    schema = group[0].footer.schema.to_arrow_schema()
    meta = {**read_metadata(schema), "shard": None, "compacted": {"shards": [s.id for s in group]}}
    schema = schema.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    entries, offset = [], 0
    pending: list[pa.Table] = []
    so = snap.ledger.storage_options
    with storage.atomic_write(url, so) as f:
        writer = pq.ParquetWriter(f, schema, **PARQUET_OPTIONS)
        for s, table in _read_ahead(group, lambda s: _read_piece(s, so)):
            pending.append(table.replace_schema_metadata(schema.metadata))
            if sum(t.num_rows for t in pending) >= row_group_rows:
                pending = _write_full_groups(writer, pending, row_group_rows)
            entries.append(ShardEntry(s.id, s.rows, offset, s.commit))
            offset += s.rows
        table = pa.concat_tables(pending) if pending else None
        if table is not None and table.num_rows:
            writer.write_table(table, row_group_size=row_group_rows)
        writer.close()
        size = f.tell()
    return Part(f"{DATA_DIR}/{name}", offset, size, tuple(entries))


def _read_piece(s: _Piece, storage_options: dict[str, Any] | None) -> pa.Table:
    """The piece's rows: its row groups only (a piece of a compacted file), page checksums verified."""
    try:
        with storage.open_input(s.url, storage_options) as src:
            pf = pq.ParquetFile(src, metadata=s.footer, page_checksum_verification=True)
            starts, groups, first = 0, [], None
            for g in range(s.footer.num_row_groups):
                n = s.footer.row_group(g).num_rows
                if starts + n > s.offset and starts < s.offset + s.rows:
                    groups.append(g)
                    first = starts if first is None else first
                starts += n
            table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"{storage.redact(s.url)}: cannot read ({type(e).__name__}: {e})") from None
    table = table.slice(s.offset - (first or 0), s.rows)
    if table.num_rows != s.rows:
        raise StorageError(f"{storage.redact(s.url)}: {table.num_rows} rows where {s.rows} are committed")
    return table.replace_schema_metadata(None)


def _write_full_groups(writer: pq.ParquetWriter, pending: list[pa.Table], rows: int) -> list[pa.Table]:
    """Write whole row groups of `rows` rows from the pending tables; return the rest."""
    table = pa.concat_tables(pending)
    full = table.num_rows // rows * rows
    writer.write_table(table.slice(0, full), row_group_size=rows)
    return [table.slice(full)] if full < table.num_rows else []


# -- reading an OUT with SQL engines and pyarrow (kept here: the import path docs/compaction.md gave) --------------


def read_sources(output: str, storage_options: dict[str, Any] | None = None) -> list[Source]:
    """The files (and row ranges) that hold every committed row of OUT exactly once (out/snapshot.py)."""
    return Snapshot.open(output, storage_options).sources()


__all__ = ["CompactOptions", "CompactResult", "arrow_dataset", "compact", "duckdb_sql", "read_sources"]
