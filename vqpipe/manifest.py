"""Where each committed shard's rows live: its own data file, or a range of a compacted file (docs/compaction.md).

`vqpipe compact` moves committed shards' rows into fewer, larger Parquet files (`data/compacted-<n>.parquet`) and
records in `_vqpipe/manifest.json` which shards each file holds: per shard its id, row count, first row in the
file and the commit fingerprint of its done marker (`DoneRecord.commit_fingerprint`). The done markers stay the
truth:

- a shard without a commit is read from nowhere, whatever the manifest says;
- a manifest entry counts only while the shard's commit still has the fingerprint (and row count) the entry
  recorded (a shard tokenized again after compaction has a new commit: its rows come from `data/<id>.parquet`);
- every other committed shard is read from `data/<id>.parquet`.

So each committed row is read exactly once, from one place. Listed files are immutable. Format-1.x manifests
(`compacted/_manifest.json`, version 1) name their files in `compacted/`; they are read as files relative to OUT
like version 2's. Plain Python: no pyarrow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .errors import StorageError
from .out.layout import Layout

MANIFEST_VERSION = 2  # 1: format 1.x, files named relative to compacted/


@dataclass(frozen=True)
class ShardEntry:
    """One shard's rows in a compacted file: rows [offset, offset + rows) of that file."""

    id: str
    rows: int
    offset: int
    commit: str  # the commit fingerprint of the done marker the rows were copied under


@dataclass(frozen=True)
class Part:
    """One compacted file (`file`: its path relative to OUT) and the shards it holds, in file order."""

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
                    "shards": [[e.id, e.rows, e.offset, e.commit] for e in p.shards],  # compact at 1M shards
                }
                for p in self.parts
            ],
        }

    @classmethod
    def from_json(cls, d: Any, url: str) -> Manifest:
        try:
            version = d["version"]
            if version not in (1, MANIFEST_VERSION):
                raise StorageError(
                    f"{url}: manifest version {version!r}, this vqpipe reads 1 and {MANIFEST_VERSION}"
                )
            prefix = "compacted/" if version == 1 else ""
            parts = tuple(
                Part(
                    file=prefix + str(p["file"]),
                    rows=int(p["rows"]),
                    bytes=int(p["bytes"]),
                    shards=tuple(ShardEntry(str(i), int(n), int(o), str(m)) for i, n, o, m in p["shards"]),
                )
                for p in d["parts"]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StorageError(f"{url}: not a vqpipe compaction manifest ({type(e).__name__}: {e})") from None
        for p in parts:
            if p.rows < 0 or any(e.rows < 0 or e.offset < 0 or e.offset + e.rows > p.rows for e in p.shards):
                raise StorageError(f"{url}: {p.file} lists rows outside the {p.rows} it holds")
            if "/" in p.file.strip("/").removeprefix("compacted/").removeprefix("data/") or ".." in p.file:
                raise StorageError(f"{url}: {p.file!r} is not a file of this OUT")
        return cls(parts)


def read_manifest(layout: Layout, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The committed manifest, or an empty one when nothing was compacted."""
    url = layout.manifest_url
    got = storage.read_versioned(url, storage_options)  # one GET; None when absent
    if got is None:
        return Manifest()
    try:
        d = json.loads(got[0])
    except ValueError:
        raise StorageError(f"{storage.redact(url)}: not JSON") from None
    return Manifest.from_json(d, storage.redact(url))


def write_manifest(layout: Layout, manifest: Manifest, storage_options: dict[str, Any] | None = None) -> None:
    """Commit the manifest (atomically): the commit point of a compaction."""
    storage.write_json_atomic(layout.manifest_url, manifest.to_json(), storage_options)


@dataclass(frozen=True)
class Commit:
    """What placing a committed shard needs of its done marker: its commit fingerprint and row count."""

    fingerprint: str
    rows: int


@dataclass
class Placement:
    """Where the rows of a set of committed shards are read from."""

    compacted: dict[str, tuple[Part, ShardEntry]] = field(default_factory=dict)  # shard id -> its valid entry
    in_data: list[str] = field(default_factory=list)  # shard ids read from data/<id>.parquet
    stale: list[str] = field(default_factory=list)  # listed, but the commit changed or is gone: not used

    def parts(self) -> dict[str, tuple[Part, list[ShardEntry]]]:
        """Compacted file name -> (part, its valid entries in file order)."""
        out: dict[str, tuple[Part, list[ShardEntry]]] = {}
        for part, entry in self.compacted.values():
            out.setdefault(part.file, (part, []))[1].append(entry)
        for _, entries in out.values():
            entries.sort(key=lambda e: e.offset)
        return out


def place(manifest: Manifest, commits: Mapping[str, Commit]) -> Placement:
    """Assign each committed shard (id -> its commit) to the one place its rows are read from."""
    placed = Placement()
    for part in manifest.parts:
        for e in part.shards:
            commit = commits.get(e.id)
            if commit is None or commit.fingerprint != e.commit or commit.rows != e.rows:
                placed.stale.append(e.id)
            elif e.id in placed.compacted:  # compact never writes this; refuse rather than read rows twice
                raise StorageError(
                    f"{e.id}: listed in both {placed.compacted[e.id][0].file} and {part.file} "
                    "with the same commit; the compaction manifest is inconsistent"
                )
            else:
                placed.compacted[e.id] = (part, e)
    placed.in_data = sorted(set(commits) - set(placed.compacted))
    return placed


@dataclass(frozen=True)
class Source:
    """One file a reader opens and which of its rows count: a shard's data file, or a compacted file."""

    id: str  # the shard id, or the compacted file's path relative to OUT
    url: str
    rows: int  # rows that count
    file_rows: int | None  # rows the compacted file holds (None for a data file: its marker's `rows`)
    ranges: tuple[tuple[int, int], ...] | None  # row ranges [start, stop) that count; None: every row
    shards: tuple[str, ...]  # the committed shards whose rows these are, in file order
    bytes: int | None = None  # the file's size as its commit or the manifest recorded it (None: unknown)


def sources(
    layout: Layout, placed: Placement, commits: Mapping[str, Commit], sizes: Mapping[str, int]
) -> list[Source]:
    """The files holding every row of the placed shards exactly once, ordered by their first shard id (so an
    unshuffled read keeps shard-id order as far as the compacted files allow). `sizes`: data file bytes by id."""
    out = [
        Source(i, layout.data_url(i), commits[i].rows, None, None, (i,), sizes.get(i)) for i in placed.in_data
    ]
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
                layout.file_url(part.file),
                sum(e.rows for e in entries),
                part.rows,
                None if whole else tuple(ranges),
                tuple(e.id for e in entries),
                part.bytes,
            )
        )
    return sorted(out, key=lambda s: (s.shards[0], s.id))
