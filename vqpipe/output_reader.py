"""An OUT's committed rows read back (by `vqpipe inspect` and `vqpipe decode`): the done markers, the layout the
data files' metadata give, a seeded sample of rows, the rows of given keys, code counts per scale, error examples.

Reads with pyarrow directly: only `key`, `label`, `codes` and the file metadata.
"""

from __future__ import annotations

import contextlib
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
from .records import DoneRecord

_EXAMPLES_PER_REASON = 3


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


@dataclass
class OutputReader:
    """An OUT's committed shards, read once: markers, then data and error files on demand."""

    ledger: Ledger
    markers: dict[str, DoneRecord] = field(default_factory=dict)
    layout: Layout | None = None

    @classmethod
    def open(cls, output: str, storage_options: dict[str, Any] | None = None) -> OutputReader:
        ledger = Ledger(output.rstrip("/"), storage_options)
        reader = cls(ledger)
        reader.markers = ledger.read_done_many(sorted(ledger.done_ids()))
        return reader

    @contextlib.contextmanager
    def data_file(self, shard_id: str) -> Iterator[pq.ParquetFile]:
        """The shard's data file (column chunks are fetched only when read), its layout checked."""
        url = self.ledger.data_url(shard_id)
        with storage.open_input(url, self.ledger.storage_options) as raw:
            f = pq.ParquetFile(raw)
            self._check_layout(url, f)
            yield f

    def read_layout(self) -> Layout:
        """The rows' layout: the one of the data files read so far, else the first committed shard's."""
        if self.layout is not None:
            return self.layout
        url = self.ledger.data_url(next(iter(self.markers)))
        with storage.open_input(url, self.ledger.storage_options) as raw:
            return self._check_layout(url, pq.ParquetFile(raw))

    def _check_layout(self, url: str, f: pq.ParquetFile) -> Layout:
        layout = Layout.from_metadata((f.schema_arrow.metadata or {}).get(b"vqpipe"), storage.redact(url))
        if self.layout is None:
            self.layout = layout
        elif (layout.patch_nums, layout.vocab_size) != (self.layout.patch_nums, self.layout.vocab_size):
            raise ConfigError(
                f"{url}: tokens of another layout ({layout.preset}, scales {layout.patch_nums}) than the "
                f"other shards ({self.layout.preset}, scales {self.layout.patch_nums})"
            )
        return layout

    def sample_rows(self, n: int, seed: int) -> list[Row]:
        """n committed rows drawn uniformly without replacement (seeded), in the order drawn."""
        ids = [i for i in self.markers if self.markers[i].rows]
        counts = np.array([self.markers[i].rows for i in ids], dtype=np.int64)
        picks = np.random.default_rng(seed).choice(
            int(counts.sum()), min(n, int(counts.sum())), replace=False
        )
        shard_of = np.searchsorted(np.cumsum(counts), picks, side="right")
        local = picks - (np.cumsum(counts) - counts)[shard_of]
        by_shard: dict[int, list[int]] = {}
        for s, i in zip(shard_of.tolist(), local.tolist()):
            by_shard.setdefault(s, []).append(i)
        found: dict[tuple[int, int], Row] = {}
        for s, rows in by_shard.items():
            with self.data_file(ids[s]) as f:
                t = f.read(columns=["key", "label", "codes"]).take(rows)
            codes = _codes(t)
            for j, i in enumerate(rows):
                found[s, i] = Row(ids[s], t["key"][j].as_py(), t["label"][j].as_py(), codes[j])
        return [found[s, i] for s, i in zip(shard_of.tolist(), local.tolist())]

    def find_keys(self, keys: list[str]) -> list[Row]:
        """Every committed row whose key is in `keys` (a key may occur in several shards)."""
        rows = []
        for shard_id in self.markers:
            with self.data_file(shard_id) as f:
                hits = pc.is_in(f.read(columns=["key"])["key"], value_set=pa.array(keys, pa.string()))
                if not pc.any(hits).as_py():
                    continue
                t = f.read(columns=["key", "label", "codes"]).filter(hits)
            codes = _codes(t)
            rows += [
                Row(shard_id, k, lab, c)
                for k, lab, c in zip(t["key"].to_pylist(), t["label"].to_pylist(), codes)
            ]
        return rows

    def code_counts(self, max_rows: int, seed: int) -> tuple[list[np.ndarray], int]:
        """Per scale, how often each code occurs, over every row or whole shards (seeded) covering `max_rows`."""
        ids = [i for i in self.markers if self.markers[i].rows]
        order = (
            np.random.default_rng(seed).permutation(len(ids)) if self._rows() > max_rows else range(len(ids))
        )
        counts: list[np.ndarray] | None = None
        counted = 0
        for s in order:
            with self.data_file(ids[s]) as f:
                layout = self.read_layout()  # known: the data file was just read
                offsets, vocab = layout.offsets, layout.vocab_size
                if counts is None:
                    counts = [np.zeros(vocab, np.int64) for _ in layout.patch_nums]
                for batch in f.iter_batches(columns=["codes"], batch_size=8192):
                    codes = _codes(batch)
                    for k in range(len(counts)):
                        scale = codes[:, offsets[k] : offsets[k + 1]].ravel()
                        counts[k] += np.bincount(scale, minlength=vocab)
                    counted += len(codes)
            if counted >= max_rows:
                break
        return counts or [], counted

    def error_examples(self) -> dict[str, list[dict[str, str]]]:
        """reason -> a few (shard, key, detail) examples, from the error files of shards that had errors."""
        wanted: Counter[str] = Counter()
        for rec in self.markers.values():
            wanted.update(rec.errors_by_reason)
        examples: dict[str, list[dict[str, str]]] = {r: [] for r in wanted}
        for shard_id, rec in self.markers.items():
            if all(len(v) >= min(_EXAMPLES_PER_REASON, wanted[r]) for r, v in examples.items()):
                break
            if not rec.errors:
                continue
            url = self.ledger.errors_url(shard_id)
            with storage.open_input(url, self.ledger.storage_options) as f:
                errors = pq.read_table(f).to_pylist()
            for e in errors:
                if len(examples.setdefault(e["reason"], [])) < _EXAMPLES_PER_REASON:
                    examples[e["reason"]].append({"shard": shard_id, "key": e["key"], "detail": e["detail"]})
        return examples

    def _rows(self) -> int:
        return sum(rec.rows for rec in self.markers.values())


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
