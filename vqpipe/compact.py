"""`vqpipe compact`: copy committed shards into fewer, larger Parquet files, for readers (docs/compaction.md).

Holds OUT's run lease throughout, so no tokenize run writes meanwhile and the done markers read at the start stay
as they are. Shards not yet in the manifest (or whose marker changed since) are packed in shard-id order into new
files `compacted/part-<n>.parquet` of about `target_bytes` (or `target_rows`), with the data files' schema and
metadata and row groups of `row_group_rows`; a file only holds shards whose schema and metadata (apart from the
shard's own id and URL) agree. Each file is committed atomically, and the manifest after them. Files already
listed are never rewritten. `delete_sources` removes the data files of compacted shards, only once the manifest
that lists them is committed.

One module although over ~300 lines: the readers at the end (`read_sources`, `duckdb_sql`, `arrow_dataset`) are the
documented way to read what compaction writes (docs/compaction.md) and follow the same manifest rules.
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
from .manifest import (
    COMPACTED_DIR,
    Manifest,
    Part,
    ShardEntry,
    Source,
    marker_fingerprint,
    place,
    read_manifest,
    sources,
    write_manifest,
)
from .records import DoneRecord
from .schema import METADATA_KEY, read_metadata
from .writer import PARQUET_OPTIONS

logger = logging.getLogger(__name__)

_PART_NAME = re.compile(r"^part-(\d+)\.parquet$")
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
    delete_sources: bool = False
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
    already_compacted: int = 0  # shards whose valid entry an earlier compaction wrote
    stale: int = 0  # entries of earlier compactions whose shard was committed again (or removed) since
    deleted_sources: int = 0

    @property
    def shards(self) -> int:
        return sum(len(p.shards) for p in self.new_parts)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.new_parts)


@dataclass(frozen=True)
class _Shard:
    """A shard to compact: its marker, the footer of its data file, and what a compacted file must share."""

    id: str
    marker: DoneRecord
    footer: pq.FileMetaData
    compat: str  # schema and metadata apart from the shard itself
    bytes: int  # compressed size of its row groups


def compact(opts: CompactOptions) -> CompactResult:
    """Compact OUT while holding its lease; LeaseError if another run holds it."""
    ledger = Ledger(opts.output, opts.storage_options)
    if ledger.read_run() is None:  # checked before the lease: nothing is written into what is not an OUT
        raise ConfigError(f"{storage.redact(opts.output)}: not a vqpipe output (no run.json)")
    lease = Lease(opts.output, opts.storage_options, ttl_s=opts.lease_ttl_s)
    lease.acquire(wait_s=opts.wait_for_lease_s)
    with lease:
        return _compact_holding(opts, ledger, lease)


def _compact_holding(opts: CompactOptions, ledger: Ledger, lease: Lease) -> CompactResult:
    compacted_dir = ledger.path(COMPACTED_DIR)
    storage.cleanup_temporaries(compacted_dir, opts.storage_options)
    markers = ledger.read_done_many(sorted(ledger.done_ids()))
    manifest = read_manifest(ledger)
    _remove_unlisted(ledger, manifest)
    placed = place(manifest, markers)
    result = CompactResult(already_compacted=len(placed.compacted), stale=len(placed.stale))
    todo = _footers(ledger, placed.in_data, markers)
    parts = list(manifest.parts)
    number = 1 + max((int(m.group(1)) for p in parts if (m := _PART_NAME.match(p.file))), default=-1)
    last_commit = time.monotonic()
    for group in _pack(todo, opts):
        lease.check()  # a compaction that lost its lease stops writing
        part = _write_part(ledger, f"part-{number:06d}.parquet", group, opts.row_group_rows)
        parts.append(part)
        result.new_parts.append(part)
        number += 1
        logger.info("%s: %d shards, %d rows, %d bytes", part.file, len(part.shards), part.rows, part.bytes)
        if time.monotonic() - last_commit > _MANIFEST_EVERY_S:
            write_manifest(ledger, Manifest(tuple(parts)))
            last_commit = time.monotonic()
    if result.new_parts:
        lease.check()
        write_manifest(ledger, Manifest(tuple(parts)))  # the commit point of this compaction
    if opts.delete_sources:
        lease.check()
        covered = place(Manifest(tuple(parts)), markers).compacted  # only what the committed manifest lists
        # one listing instead of a request per compacted shard: after the first deletion data/ is small
        present = storage.list_files(ledger.path("data"), ".parquet", opts.storage_options)
        doomed = [n[: -len(".parquet")] for n in present if n[: -len(".parquet")] in covered]
        for shard_id in doomed:
            storage.remove(ledger.data_url(shard_id), opts.storage_options)
        result.deleted_sources = len(doomed)
    return result


def _remove_unlisted(ledger: Ledger, manifest: Manifest) -> None:
    """Compacted files no manifest lists were written by a compaction that died before its manifest: no reader
    can know them (listed files are never removed here). Only under the lease."""
    listed = {p.file for p in manifest.parts}
    for name in storage.list_files(ledger.path(COMPACTED_DIR), ".parquet", ledger.storage_options):
        if name not in listed:
            logger.info("removing %s: written by an interrupted compaction, listed nowhere", name)
            storage.remove(ledger.path(COMPACTED_DIR, name), ledger.storage_options)


def _footers(ledger: Ledger, shard_ids: list[str], markers: dict[str, DoneRecord]) -> Iterator[_Shard]:
    """The shards' footers in order, read concurrently (on an object store each is a round trip or two)."""
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        for start in range(0, len(shard_ids), _FOOTER_CHUNK):  # bounded: footers of 1M shards do not fit
            chunk = shard_ids[start : start + _FOOTER_CHUNK]
            yield from pool.map(lambda i: _footer(ledger, i, markers[i]), chunk)


def _footer(ledger: Ledger, shard_id: str, marker: DoneRecord) -> _Shard:
    url = ledger.data_url(shard_id)
    try:
        with storage.open_input(url, ledger.storage_options) as f:
            footer = pq.ParquetFile(f).metadata
    except FileNotFoundError:
        raise StorageError(f"{url}: no such file, but shard {shard_id} has a done marker") from None
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"{url}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    if footer.num_rows != marker.rows:
        raise StorageError(f"{url}: {footer.num_rows} rows, but its done marker says {marker.rows}")
    schema = footer.schema.to_arrow_schema()
    meta = read_metadata(schema)
    meta.pop("shard", None)
    compat = schema.remove_metadata().to_string() + json.dumps(meta, sort_keys=True)
    size = sum(
        footer.row_group(g).column(c).total_compressed_size
        for g in range(footer.num_row_groups)
        for c in range(footer.num_columns)
    )
    return _Shard(shard_id, marker, footer, compat, size)


def _pack(shards: Iterable[_Shard], opts: CompactOptions) -> Iterator[list[_Shard]]:
    """Shards (in id order) into groups up to the target size, one open group per kind of file (schema and
    metadata), so that shards of interleaved settings (e.g. two GPU types) still fill large files; a shard is
    never split."""
    open_groups: dict[str, tuple[list[_Shard], list[int]]] = {}  # compat -> (shards, [rows, bytes])
    for s in shards:
        n = s.marker.rows
        group, size = open_groups.get(s.compat, ([], [0, 0]))
        full = (opts.target_rows is not None and size[0] + n > opts.target_rows) or (
            opts.target_bytes is not None and size[1] + s.bytes > opts.target_bytes
        )
        if group and full:
            yield group
            group, size = [], [0, 0]
        group.append(s)
        size[0] += n
        size[1] += s.bytes
        open_groups[s.compat] = (group, size)
    yield from sorted((g for g, _ in open_groups.values() if g), key=lambda g: g[0].id)


def _read_ahead(group: list[_Shard], load: Callable[[_Shard], pa.Table]) -> Iterator[tuple[_Shard, pa.Table]]:
    """load(s) for the group's shards in order, in threads, up to _READ_AHEAD_BYTES (compressed) ahead."""
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


def _write_part(ledger: Ledger, name: str, group: list[_Shard], row_group_rows: int) -> Part:
    """Copy the group's rows, shard after shard, into one file committed atomically under `name`."""
    url = ledger.path(COMPACTED_DIR, name)
    schema = group[0].footer.schema.to_arrow_schema()
    meta = {**read_metadata(schema), "shard": None, "compacted": {"shards": [s.id for s in group]}}
    schema = schema.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    entries, offset = [], 0
    pending: list[pa.Table] = []
    with storage.atomic_write(url, ledger.storage_options) as f:
        writer = pq.ParquetWriter(f, schema, **PARQUET_OPTIONS)
        for s, table in _read_ahead(group, lambda s: _read_shard(ledger, s)):
            pending.append(table.replace_schema_metadata(schema.metadata))
            if sum(t.num_rows for t in pending) >= row_group_rows:
                pending = _write_full_groups(writer, pending, row_group_rows)
            n = s.marker.rows
            entries.append(ShardEntry(s.id, n, offset, marker_fingerprint(s.marker)))
            offset += n
        table = pa.concat_tables(pending) if pending else None
        if table is not None and table.num_rows:
            writer.write_table(table, row_group_size=row_group_rows)
        writer.close()
        size = f.tell()
    return Part(name, offset, size, tuple(entries))


def _read_shard(ledger: Ledger, s: _Shard) -> pa.Table:
    try:
        with storage.open_input(ledger.data_url(s.id), ledger.storage_options) as src:
            table = pq.ParquetFile(src, metadata=s.footer).read()
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"{ledger.data_url(s.id)}: cannot read ({type(e).__name__}: {e})") from None
    if table.num_rows != s.marker.rows:
        raise StorageError(
            f"{ledger.data_url(s.id)}: {table.num_rows} rows, its done marker says {s.marker.rows}"
        )
    return table


def _write_full_groups(writer: pq.ParquetWriter, pending: list[pa.Table], rows: int) -> list[pa.Table]:
    """Write whole row groups of `rows` rows from the pending tables; return the rest."""
    table = pa.concat_tables(pending)
    full = table.num_rows // rows * rows
    writer.write_table(table.slice(0, full), row_group_size=rows)
    return [table.slice(full)] if full < table.num_rows else []


# -- reading an OUT with SQL engines and pyarrow ---------------------------------------------------------------


def read_sources(output: str, storage_options: dict[str, Any] | None = None) -> list[Source]:
    """The files (and row ranges) that hold every committed row of OUT exactly once (manifest.sources)."""
    ledger = Ledger(output, storage_options)
    return sources(ledger, ledger.read_done_many(sorted(ledger.done_ids())))


def duckdb_sql(srcs: list[Source]) -> str:
    """A DuckDB query over `srcs` (read_sources): the whole files at once, plus the counted row ranges of any
    compacted file that also holds rows of shards committed again since (filtered on file_row_number)."""
    whole = [s.url for s in srcs if s.ranges is None and s.rows]
    parts = []
    if whole:
        parts.append(f"SELECT * FROM read_parquet([{', '.join(_sql_str(u) for u in whole)}])")
    for s in srcs:
        if s.ranges:
            where = " OR ".join(f"(file_row_number >= {a} AND file_row_number < {b})" for a, b in s.ranges)
            parts.append(
                f"SELECT * EXCLUDE (file_row_number) FROM read_parquet({_sql_str(s.url)}, file_row_number = true) "
                f"WHERE {where}"
            )
    if not parts:
        raise ValueError("no committed rows to query")
    return "\nUNION ALL BY NAME\n".join(parts)


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def arrow_dataset(srcs: list[Source]) -> Any:
    """A pyarrow dataset over `srcs` (read_sources): the whole files as files; the counted ranges of a compacted
    file that also holds rows committed again since are read into memory (only such files, which are rare)."""
    import pyarrow.dataset as pads

    files = [s.url for s in srcs if s.ranges is None and s.rows]
    if not any(s.ranges for s in srcs):
        return pads.dataset(files, format="parquet")
    tables: list[pa.Table] = []
    for s in srcs:
        if s.ranges:
            t = pq.read_table(s.url)
            tables.extend(t.slice(a, b - a) for a, b in s.ranges)
    children = [pads.dataset(tables)]
    if files:
        children.insert(0, pads.dataset(files, format="parquet"))
    return pads.dataset(children)
