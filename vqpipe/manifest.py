"""Where each committed shard's rows live: its own data file, or a range of a compacted file (docs/compaction.md).

`vqpipe compact` copies committed shards into fewer, larger Parquet files under `OUT/compacted/` and records in
`OUT/compacted/_manifest.json` which shards each file holds: per shard its id, row count, first row in the file
and a fingerprint of its done marker. The done marker stays the truth:

- a shard without a done marker is read from nowhere, whatever the manifest says;
- a manifest entry counts only while the shard's marker still exists and has the fingerprint the entry recorded
  (a shard tokenized again after compaction has a new marker: its rows come from `data/` again);
- every other committed shard is read from `data/<id>.parquet`.

So each committed row is read exactly once, from one place. Compacted files are immutable once listed: a rerun of
`vqpipe compact` adds files and entries, and never rewrites a listed file. Plain Python over the Ledger; no pyarrow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .errors import StorageError
from .ledger import Ledger
from .records import DoneRecord

COMPACTED_DIR = "compacted"
MANIFEST_NAME = "_manifest.json"  # "_": pyarrow, pandas and Spark skip it when reading the directory
MANIFEST_VERSION = 1

# The marker fields that identify one commit of a shard. A subset, so that fields a later vqpipe adds to or
# derives for markers do not invalidate every compacted entry (which, after --delete-sources, would leave the
# shard with no readable rows); a new commit of the shard always changes `started`.
_IDENTITY = ("shard_id", "rows", "samples", "started", "attempt", "input", "data_bytes")


def marker_fingerprint(record: DoneRecord) -> str:
    """A short hash of the fields of a done marker that identify that commit of its shard, as written (a key
    an older marker lacks hashes as null, not as the default the record filled in)."""
    marker = record.as_written if record.as_written is not None else record.to_json()
    identity = {k: marker.get(k) for k in _IDENTITY}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[
        :24
    ]


@dataclass(frozen=True)
class ShardEntry:
    """One shard's rows in a compacted file: rows [offset, offset + rows) of that file."""

    id: str
    rows: int
    offset: int
    marker: str  # marker_fingerprint of the done marker the rows were copied under


@dataclass(frozen=True)
class Part:
    """One compacted file (a name under OUT/compacted/) and the shards it holds, in file order."""

    file: str
    rows: int
    bytes: int
    shards: tuple[ShardEntry, ...]


@dataclass(frozen=True)
class Manifest:
    parts: tuple[Part, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "parts": [
                {
                    "file": p.file,
                    "rows": p.rows,
                    "bytes": p.bytes,
                    "shards": [[e.id, e.rows, e.offset, e.marker] for e in p.shards],  # compact at 1M shards
                }
                for p in self.parts
            ],
        }

    @classmethod
    def from_json(cls, d: Any, url: str) -> Manifest:
        try:
            if d["version"] != MANIFEST_VERSION:
                raise StorageError(
                    f"{url}: manifest version {d['version']!r}, this vqpipe reads {MANIFEST_VERSION}"
                )
            parts = tuple(
                Part(
                    file=str(p["file"]),
                    rows=int(p["rows"]),
                    bytes=int(p["bytes"]),
                    shards=tuple(ShardEntry(str(i), int(n), int(o), str(m)) for i, n, o, m in p["shards"]),
                )
                for p in d["parts"]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(f"{url}: not a vqpipe compaction manifest ({type(e).__name__}: {e})") from None
        for p in parts:
            if sum(e.rows for e in p.shards) > p.rows or any(e.offset + e.rows > p.rows for e in p.shards):
                raise StorageError(f"{url}: {p.file} lists more rows than it holds")
        return cls(parts)


def manifest_url(ledger: Ledger) -> str:
    return ledger.path(COMPACTED_DIR, MANIFEST_NAME)


def part_url(ledger: Ledger, part: Part) -> str:
    return ledger.path(COMPACTED_DIR, part.file)


def read_manifest(ledger: Ledger) -> Manifest:
    """The committed manifest, or an empty one when nothing was compacted."""
    url = manifest_url(ledger)
    got = storage.read_versioned(url, ledger.storage_options)  # one GET; None when absent
    if got is None:
        return Manifest()
    try:
        d = json.loads(got[0])
    except ValueError:
        raise StorageError(f"{url}: not JSON") from None
    return Manifest.from_json(d, url)


def write_manifest(ledger: Ledger, manifest: Manifest) -> None:
    """Commit the manifest (atomically): the last write of a compaction."""
    storage.write_json_atomic(manifest_url(ledger), manifest.to_json(), ledger.storage_options)


@dataclass
class Placement:
    """Where the rows of a set of committed shards are read from."""

    compacted: dict[str, tuple[Part, ShardEntry]] = field(default_factory=dict)  # shard id -> its valid entry
    in_data: list[str] = field(default_factory=list)  # shard ids read from data/<id>.parquet
    stale: list[str] = field(default_factory=list)  # listed, but the marker changed or is gone: not used

    def parts(self) -> dict[str, tuple[Part, list[ShardEntry]]]:
        """Compacted file name -> (part, its valid entries in file order)."""
        out: dict[str, tuple[Part, list[ShardEntry]]] = {}
        for part, entry in self.compacted.values():
            out.setdefault(part.file, (part, []))[1].append(entry)
        for _, entries in out.values():
            entries.sort(key=lambda e: e.offset)
        return out


@dataclass(frozen=True)
class Source:
    """One file a reader opens and which of its rows count: a shard's data file, or a compacted file."""

    id: str  # the shard id, or the compacted file's name
    url: str
    rows: int  # rows that count
    file_rows: int | None  # rows the compacted file holds (None for a data file: its marker's `rows`)
    ranges: tuple[tuple[int, int], ...] | None  # row ranges [start, stop) that count; None: every row
    shards: tuple[str, ...]  # the committed shards whose rows these are, in file order


def sources(ledger: Ledger, markers: dict[str, DoneRecord], manifest: Manifest | None = None) -> list[Source]:
    """The files holding every row of the shards of `markers` exactly once, ordered by their first shard id (so an
    unshuffled read keeps shard-id order as far as the compacted files allow)."""
    manifest = read_manifest(ledger) if manifest is None else manifest
    placed = place(manifest, markers)
    out = [Source(i, ledger.data_url(i), markers[i].rows, None, None, (i,)) for i in placed.in_data]
    for part, entries in placed.parts().values():
        ranges: list[tuple[int, int]] = []
        for e in entries:
            if ranges and ranges[-1][1] == e.offset:
                ranges[-1] = (ranges[-1][0], e.offset + e.rows)
            elif e.rows:
                ranges.append((e.offset, e.offset + e.rows))
        whole = ranges == [(0, part.rows)]
        out.append(
            Source(
                part.file,
                part_url(ledger, part),
                sum(e.rows for e in entries),
                part.rows,
                None if whole else tuple(ranges),
                tuple(e.id for e in entries),
            )
        )
    return sorted(out, key=lambda s: (s.shards[0], s.id))


def place(manifest: Manifest, markers: dict[str, DoneRecord]) -> Placement:
    """Assign each shard of `markers` (committed shards: id -> done marker) to one place its rows are read from."""
    placed = Placement()
    fingerprints = {i: marker_fingerprint(m) for i, m in markers.items()}
    for part in manifest.parts:
        for e in part.shards:
            valid = fingerprints.get(e.id) == e.marker and markers[e.id].rows == e.rows
            if not valid:
                placed.stale.append(e.id)
            elif e.id in placed.compacted:  # compact never writes this; refuse rather than read rows twice
                raise StorageError(
                    f"{e.id}: listed in both {placed.compacted[e.id][0].file} and {part.file} "
                    "with the same done marker; the compaction manifest is inconsistent"
                )
            else:
                placed.compacted[e.id] = (part, e)
    placed.in_data = sorted(set(markers) - set(placed.compacted))
    return placed
