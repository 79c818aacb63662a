"""The one answer to "which rows of an OUT are committed, and where does each live" (docs/format.md, "Readers").

A `Snapshot` is an OUT at a moment: its committed shards and, for each, the one place its rows are read from,
its data file or a range of a compacted file (manifest.py). Every reader asks it: `TokenDataset`,
`vqpipe.raydata.read_tokens`, `vqpipe inspect` and `decode`, `vqpipe compact`, `vqpipe status` and the plan of
`vqpipe tokenize`; nothing else lists `done/` or `data/`.

What it costs: one listing of `done/` and one of `data/`, the ledger index, the compaction manifest; markers
are read only where the index lacks them, data file footers only where a crash lost a marker. So a training
reader plans its epoch over 100k shards without reading 100k markers (docs/scale.md).

The rules (format 2): a shard is committed when its done marker exists, or its data file does (the data file
appears whole, last, and is the commit: a crash between it and its marker loses nothing; the lease holder
writes the marker again). A committed shard's rows are in the compacted file whose manifest entry matches its
commit, else in its data file. A file a committed shard needs that is missing is damage, reported up front with
its name, never skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .. import storage
from ..errors import StorageError
from ..index import Committed
from ..ledger import Ledger
from ..manifest import Commit, Manifest, Placement, Source, place, read_manifest, sources
from ..records import RunRecord
from .layout import COMPACTED_PREFIX, INCOMPLETE_NAME, Layout

logger = logging.getLogger(__name__)

_PARQUET = ".parquet"
_REPAIR_HINT = (
    "`vqpipe status OUT --verify` lists every damaged file; `vqpipe tokenize ... --repair` tokenizes their "
    "shards again where the inputs still exist"
)


@dataclass(frozen=True)
class Damage:
    """A file that committed rows need and that is not as committed: missing, or of another size."""

    url: str
    problem: str  # "missing" | "size" | "unreadable" | "rows"
    detail: str
    shards: tuple[str, ...]  # the committed shards whose rows (or error records) it holds
    kind: str = "data"  # "data" | "compacted" | "errors"

    def describe(self) -> str:
        shards = ", ".join(self.shards[:3]) + (
            f" and {len(self.shards) - 3} more" if len(self.shards) > 3 else ""
        )
        return f"{storage.redact(self.url)}: {self.detail} (rows of {shards})"


@dataclass
class Snapshot:
    """An OUT's committed shards at one moment, and where each of their rows lives."""

    ledger: Ledger
    run: RunRecord | None
    committed: Committed
    manifest: Manifest
    placement: Placement
    data_files: dict[str, int]  # file name directly in data/ -> size in bytes (format 1.x: also compacted/)
    incomplete: bool  # data/INCOMPLETE-…: a compaction (or migration) moving rows is unfinished

    @classmethod
    def open(
        cls,
        output: str | None = None,
        storage_options: dict[str, Any] | None = None,
        *,
        ledger: Ledger | None = None,
        maintain: bool = False,
        require_run: bool = True,
    ) -> Snapshot:
        """Read an OUT's committed rows' whereabouts. `maintain` (only while holding OUT's lease): write lost
        markers again and keep the index up to date. `require_run`: an OUT without run.json is an error
        (StorageError naming it), not an empty snapshot."""
        if ledger is None:
            if output is None:
                raise TypeError("Snapshot.open needs an output or a ledger")
            ledger = Ledger(output, storage_options)
        run = ledger.read_run_record()
        if run is None and require_run:
            raise StorageError(
                f"{storage.redact(ledger.output)}: not a vqpipe output (no {_name(ledger.layout.run_url, ledger)})"
            )
        layout = ledger.layout
        so = ledger.storage_options
        data_files = {
            n: int(v.get("size", -1)) for n, v in storage.iter_files_info(layout.data_dir, _PARQUET, so)
        }
        if layout.version < 2:  # format 1.x kept compacted files apart
            for n, v in storage.iter_files_info(storage.join(ledger.output, "compacted"), _PARQUET, so):
                data_files["compacted/" + n] = int(v.get("size", -1))
        manifest = read_manifest(layout, so)
        listed_parts = {p.file for p in manifest.parts}
        uncommitted = (
            {
                n[: -len(_PARQUET)]: size
                for n, size in data_files.items()
                if "data/" + n not in listed_parts
                and n != INCOMPLETE_NAME
                and not n.startswith(COMPACTED_PREFIX)
            }
            if layout.version >= 2
            else None  # format 1.x: a data file without a marker was never committed
        )
        committed = ledger.committed(maintain=maintain, uncommitted_data=uncommitted)
        ids = sorted(committed.position)
        commits = {
            i: Commit(c or "", r or 0)
            for i, c, r in zip(ids, committed.column("commit", ids), committed.column("rows", ids))
        }
        snap = cls(
            ledger=ledger,
            run=run,
            committed=committed,
            manifest=manifest,
            placement=place(manifest, commits),
            data_files=data_files,
            incomplete=INCOMPLETE_NAME in data_files,
        )
        return snap

    # -- what is committed --------------------------------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        return self.ledger.layout

    @property
    def output(self) -> str:
        return self.ledger.output

    @property
    def shard_ids(self) -> list[str]:
        """The committed shards, sorted."""
        return sorted(self.committed.position)

    def rows(self, shard_ids: list[str] | None = None) -> list[int]:
        """Rows of each shard (its done marker's count), in the order of `shard_ids` (default: all, sorted)."""
        ids = self.shard_ids if shard_ids is None else shard_ids
        return [n or 0 for n in self.committed.column("rows", ids)]

    @property
    def total_rows(self) -> int:
        return sum(self.rows())

    # -- where the rows are ---------------------------------------------------------------------------------------

    def sources(self, shard_ids: list[str] | None = None, *, compacted: bool = True) -> list[Source]:
        """The files (and row ranges) holding every row of `shard_ids` (default: every committed shard) exactly
        once. `compacted=False`: data files only (an epoch begun before a compaction of format 1.x, which kept
        them). Raises StorageError naming any file these rows need that is missing."""
        ids = self.shard_ids if shard_ids is None else sorted(shard_ids)
        unknown = [i for i in ids if i not in self.committed.position]
        if unknown:
            raise ValueError(
                f"{storage.redact(self.output)}: shard(s) not committed: {', '.join(unknown[:5])}"
            )
        wanted = set(ids)
        placement = self.placement if compacted else place(Manifest(), {})
        placed = Placement(
            compacted={i: pe for i, pe in placement.compacted.items() if i in wanted},
            in_data=[i for i in ids if i not in placement.compacted] if compacted else ids,
        )
        commits = {i: Commit("", r) for i, r in zip(ids, self.rows(ids))}
        sizes = dict(zip(ids, (n or 0 for n in self.committed.column("data_bytes", ids))))
        srcs = sources(self.layout, placed, commits, sizes)
        missing = [d for d in self._missing(srcs)]
        if missing:
            lines = "; ".join(d.describe() for d in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise StorageError(
                f"{storage.redact(self.output)}: committed rows are missing: {lines}{more}. {_REPAIR_HINT}"
            )
        return srcs

    def _missing(self, srcs: list[Source]) -> list[Damage]:
        out = []
        for s in srcs:
            if s.rows and self._relative(s) not in self.data_files:
                out.append(
                    Damage(
                        s.url,
                        "missing",
                        "no such file",
                        s.shards,
                        "compacted" if s.file_rows is not None else "data",
                    )
                )
        return out

    def _relative(self, s: Source) -> str:
        """A source's key in `data_files`: its name in data/ (format 1.x compacted files: compacted/<name>)."""
        if s.file_rows is None:
            return f"{s.id}{_PARQUET}"
        return s.id.removeprefix("data/")

    def missing(self) -> list[Damage]:
        """Files committed rows need that the listing of data/ does not show (no reads; `verify.verify` also
        reads every file, checksums included)."""
        return self._missing(self.sources_unchecked())

    def sources_unchecked(self) -> list[Source]:
        """`sources()` of every committed shard without the check for missing files."""
        ids = self.shard_ids
        commits = {i: Commit("", r) for i, r in zip(ids, self.rows(ids))}
        sizes = dict(zip(ids, (n or 0 for n in self.committed.column("data_bytes", ids))))
        return sources(self.layout, self.placement, commits, sizes)

    def unexpected(self) -> list[str]:
        """Names of files in data/ that hold no committed row a reader should read: a format-1.x leftover of a
        killed run, data files a compaction moved but has not removed yet (only while `incomplete`), files
        not written by vqpipe. A reader pointed at data/ would read them."""
        needed = {self._relative(s) for s in self.sources_unchecked()}
        return sorted(
            n
            for n in self.data_files
            if n not in needed and n != INCOMPLETE_NAME and not n.startswith("compacted/")
        )


def _name(url: str, ledger: Ledger) -> str:
    return url[len(ledger.output) :].lstrip("/") or url
