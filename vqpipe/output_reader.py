"""An OUT's committed rows read back for `vqpipe inspect` and `vqpipe decode`: where they are (out/snapshot.py: data
files and compacted files, with or without the data files, local or remote), the layout the files' metadata give,
a seeded sample of rows, the rows of given keys, code counts per scale, error examples.

Reads with pyarrow directly: only `key`, `label`, `codes`, the file metadata, and only the row groups needed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from .errors import ConfigError, StorageError
from .ledger import Ledger
from .manifest import Source
from .out.snapshot import Snapshot
from .records import DoneRecord, InputRef

_EXAMPLES_PER_REASON = 3
_TIMING_SHARDS = 2000  # markers read for seconds per stage: a seeded sample beyond this many shards
_COLUMNS = ["key", "label", "codes"]


@dataclass
class Row:
    shard_id: str
    key: str
    label: int | None
    codes: np.ndarray  # (L,)


@dataclass
class Layout:
    """What the data files' metadata says about every row (must agree across the files read)."""

    preset: str
    model_sha256: str
    patch_nums: tuple[int, ...]
    vocab_size: int
    resolution: int

    @classmethod
    def from_metadata(cls, raw: bytes | None, url: str) -> Layout:
        """The layout in a data file's `vqpipe` metadata, every value type-checked: whoever can write one file
        into OUT's bucket writes this, and it reaches the report page and the decoder."""
        try:
            meta = json.loads(raw or b"")
            v = {
                "preset": meta["model"]["preset"],
                "model_sha256": meta["model"]["sha256"],
                "patch_nums": meta["patch_nums"],
                "vocab_size": meta["vocab_size"],
                "resolution": meta["resolution"],
            }
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError(f"{url}: no vqpipe layout in its metadata ({type(e).__name__}: {e})") from None
        for name, fits, what in _LAYOUT_TYPES:
            if not fits(v[name]):
                raise StorageError(f"{url}: metadata {name} is {v[name]!r}, not {what}")
        return cls(v["preset"], v["model_sha256"], tuple(v["patch_nums"]), v["vocab_size"], v["resolution"])

    @property
    def offsets(self) -> list[int]:
        return np.cumsum([0] + [pn * pn for pn in self.patch_nums]).tolist()


@dataclass(frozen=True)
class _Segment:
    """Rows [start, start + rows) of a source's file belong to one committed shard."""

    shard_id: str
    start: int
    rows: int


@dataclass
class OutputReader:
    """An OUT's committed rows: where they are (a Snapshot), then files read on demand."""

    snapshot: Snapshot
    sources: list[Source]
    layout: Layout | None = None
    _markers: dict[str, DoneRecord] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, output: str, storage_options: dict[str, Any] | None = None) -> OutputReader:
        snapshot = Snapshot.open(output.rstrip("/"), storage_options)
        return cls(snapshot, snapshot.sources())

    @property
    def ledger(self) -> Ledger:
        return self.snapshot.ledger

    @property
    def shard_ids(self) -> list[str]:
        return self.snapshot.shard_ids

    def input(self, shard_id: str) -> InputRef:
        return self.snapshot.committed.input(shard_id)

    def errors_by_reason(self) -> Counter[str]:
        return Counter(self.snapshot.committed.totals(self.shard_ids)["errors_by_reason"])

    def timing_markers(self, seed: int = 0) -> dict[str, DoneRecord]:
        """Done markers (with their seconds per stage) of every shard, or of a seeded sample of _TIMING_SHARDS."""
        if self._markers is None:
            ids = self.shard_ids
            if len(ids) > _TIMING_SHARDS:
                pick = np.random.default_rng(seed).choice(len(ids), _TIMING_SHARDS, replace=False)
                ids = sorted(ids[i] for i in pick)
            self._markers = self.ledger.read_done_many(ids)
        return self._markers

    def _segments(self, src: Source) -> list[_Segment]:
        if src.file_rows is None:
            return [_Segment(src.id, 0, src.rows)]
        entries = [self.snapshot.placement.compacted[i][1] for i in src.shards]
        return [_Segment(e.id, e.offset, e.rows) for e in sorted(entries, key=lambda e: e.offset)]

    def _open(self, src: Source) -> tuple[pq.ParquetFile, Any]:
        try:
            raw = storage.open_input(src.url, self.ledger.storage_options)
        except FileNotFoundError:
            raise StorageError(
                f"{storage.redact(src.url)}: no such file, but committed rows are in it"
            ) from None
        try:
            f = pq.ParquetFile(raw, page_checksum_verification=True)
        except (pa.ArrowException, OSError) as e:
            raw.close()
            raise StorageError(f"{storage.redact(src.url)}: not a readable Parquet file ({e})") from None
        self._check_layout(src.url, f)
        return f, raw

    def _read(self, src: Source, file_rows: list[int], columns: list[str]) -> pa.Table:
        """Rows at these positions of the file (in this order), reading only the row groups that hold them."""
        f, raw = self._open(src)
        try:
            sizes = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
            starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            group_of = (np.searchsorted(starts, file_rows, side="right") - 1).tolist()
            groups = sorted(set(group_of))
            table = f.read_row_groups(groups, columns=columns)
            first_of = dict(
                zip(groups, np.concatenate([[0], np.cumsum([sizes[g] for g in groups])]).tolist())
            )
            local = [first_of[g] + r - int(starts[g]) for g, r in zip(group_of, file_rows)]
            return table.take(pa.array(local, pa.int64()))
        except (pa.ArrowException, OSError) as e:
            raise StorageError(
                f"{storage.redact(src.url)}: cannot be read ({type(e).__name__}: {e})"
            ) from None
        finally:
            raw.close()

    def read_layout(self) -> Layout:
        """The rows' layout: the one of the files read so far, else the first file's."""
        if self.layout is not None:
            return self.layout
        if not self.sources:
            raise ConfigError(f"{storage.redact(self.snapshot.output)}: no committed rows")
        src = self.sources[0]
        f, raw = self._open(src)  # sets self.layout
        raw.close()
        return self._check_layout(src.url, f)

    def _check_layout(self, url: str, f: pq.ParquetFile) -> Layout:
        layout = Layout.from_metadata((f.schema_arrow.metadata or {}).get(b"vqpipe"), storage.redact(url))
        if self.layout is None:
            self.layout = layout
        elif (layout.patch_nums, layout.vocab_size) != (self.layout.patch_nums, self.layout.vocab_size):
            raise ConfigError(
                f"{storage.redact(url)}: tokens of another layout ({layout.preset}, scales {layout.patch_nums}) "
                f"than the other files ({self.layout.preset}, scales {self.layout.patch_nums})"
            )
        return layout

    def sample_rows(self, n: int, seed: int) -> list[Row]:
        """n committed rows drawn uniformly without replacement (seeded), in the order drawn."""
        segs = [(src, seg) for src in self.sources for seg in self._segments(src) if seg.rows]
        counts = np.array([seg.rows for _, seg in segs], dtype=np.int64)
        total = int(counts.sum())
        picks = np.random.default_rng(seed).choice(total, min(n, total), replace=False)
        ends = np.cumsum(counts)
        which = np.searchsorted(ends, picks, side="right")
        local = picks - (ends - counts)[which]
        by_source: dict[int, list[tuple[int, int]]] = {}  # source index -> [(pick order, file row)]
        src_index = {id(src): k for k, src in enumerate(self.sources)}
        for order, (w, i) in enumerate(zip(which.tolist(), local.tolist())):
            src, seg = segs[w]
            by_source.setdefault(src_index[id(src)], []).append((order, seg.start + i))
        found: dict[int, Row] = {}
        for k, wanted in by_source.items():
            src = self.sources[k]
            t = self._read(src, [r for _, r in wanted], _COLUMNS)
            codes = _codes(t)
            for j, (order, file_row) in enumerate(wanted):
                shard = next(
                    s.shard_id for s in self._segments(src) if s.start <= file_row < s.start + s.rows
                )
                found[order] = Row(shard, t["key"][j].as_py(), t["label"][j].as_py(), codes[j])
        return [found[i] for i in range(len(picks))]

    def find_keys(self, keys: list[str]) -> list[Row]:
        """Every committed row whose key is in `keys` (a key may occur in several shards)."""
        wanted = pa.array(keys, pa.string())
        rows = []
        for src in self.sources:
            for seg, t in self._segment_batches(src, ["key"]):
                hits = pc.is_in(t["key"], value_set=wanted)
                if not pc.any(hits).as_py():
                    continue
                positions = [seg.start + i for i in np.flatnonzero(hits.to_numpy(zero_copy_only=False))]
                found = self._read(src, positions, _COLUMNS)
                codes = _codes(found)
                rows += [
                    Row(seg.shard_id, k, lab, c)
                    for k, lab, c in zip(found["key"].to_pylist(), found["label"].to_pylist(), codes)
                ]
        return rows

    def _segment_batches(self, src: Source, columns: list[str]) -> Iterator[tuple[_Segment, pa.Table]]:
        """Each committed segment of the file with `columns` (the whole column read once per file)."""
        f, raw = self._open(src)
        try:
            table = f.read(columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise StorageError(
                f"{storage.redact(src.url)}: cannot be read ({type(e).__name__}: {e})"
            ) from None
        finally:
            raw.close()
        for seg in self._segments(src):
            yield seg, table.slice(seg.start, seg.rows)

    def code_counts(self, max_rows: int, seed: int) -> tuple[list[np.ndarray], int]:
        """Per scale, how often each code occurs, over every row or whole files (seeded) covering `max_rows`."""
        srcs = [s for s in self.sources if s.rows]
        total = sum(s.rows for s in srcs)
        order = np.random.default_rng(seed).permutation(len(srcs)) if total > max_rows else range(len(srcs))
        counts: list[np.ndarray] | None = None
        counted = 0
        for k in order:
            for _, t in self._segment_batches(srcs[k], ["codes"]):
                layout = self.read_layout()  # known: the file was just opened
                offsets, vocab = layout.offsets, layout.vocab_size
                if counts is None:
                    counts = [np.zeros(vocab, np.int64) for _ in layout.patch_nums]
                codes = _codes(t)
                for s in range(len(counts)):
                    counts[s] += np.bincount(codes[:, offsets[s] : offsets[s + 1]].ravel(), minlength=vocab)
                counted += len(codes)
            if counted >= max_rows:
                break
        return counts or [], counted

    def error_examples(self) -> dict[str, list[dict[str, str]]]:
        """reason -> a few (shard, key, detail) examples, from the error files of shards that had errors."""
        wanted = self.errors_by_reason()
        examples: dict[str, list[dict[str, str]]] = {r: [] for r in wanted}
        ids = self.shard_ids
        for shard_id, n in zip(ids, self.snapshot.committed.column("errors", ids)):
            if all(len(v) >= min(_EXAMPLES_PER_REASON, wanted[r]) for r, v in examples.items()):
                break
            if not n:
                continue
            url = self.ledger.errors_url(shard_id)
            try:
                with storage.open_input(url, self.ledger.storage_options) as f:
                    errors = pq.read_table(f).to_pylist()
            except FileNotFoundError:
                raise StorageError(
                    f"{storage.redact(url)}: no such file, but shard {shard_id} recorded errors"
                ) from None
            for e in errors:
                if len(examples.setdefault(e["reason"], [])) < _EXAMPLES_PER_REASON:
                    examples[e["reason"]].append({"shard": shard_id, "key": e["key"], "detail": e["detail"]})
        return examples


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


_LAYOUT_TYPES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("preset", lambda x: isinstance(x, str), "a string"),
    ("model_sha256", lambda x: isinstance(x, str), "a string"),
    ("vocab_size", _positive_int, "an integer >= 1"),
    ("resolution", _positive_int, "an integer >= 1"),
    (
        "patch_nums",
        lambda x: isinstance(x, list) and bool(x) and all(map(_positive_int, x)),
        "a list of integers >= 1",
    ),
)


def _codes(table: Any) -> np.ndarray:
    col = table.column("codes")
    flat = (col.combine_chunks() if hasattr(col, "combine_chunks") else col).flatten().to_numpy()
    return flat.reshape(len(table), col.type.list_size)
