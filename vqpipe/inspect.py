"""`vqpipe inspect` and `vqpipe decode`: read an OUT (done markers, data and error files) and gather what a person
needs to judge the tokens before training on them: a seeded sample of rows with their reconstructions and
originals, codebook usage per scale, error reasons with example keys, and seconds per stage.

Reads OUT with pyarrow directly (only `key`, `label`, `codes` and the file metadata). The figures and the page
are drawn by `vqpipe.report`; the model side lives in `vqpipe.reconstruct`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import __version__, storage
from .errors import ConfigError
from .ledger import Ledger, read_status
from .records import DoneRecord
from .stats import stage_stats, usage_stats

logger = logging.getLogger(__name__)

_EXAMPLES_PER_REASON = 3


@dataclass(frozen=True)
class InspectOptions:
    output: str
    report_dir: str | None = None  # local; default OUT/report, or ./<name>-report when OUT is remote
    checkpoint: str | None = None
    preset: str | None = None  # default: the preset the data files name
    random_weights: bool = False
    samples: int = 32  # rows whose reconstruction quality is measured
    grid_rows: int = 8  # of those, rows drawn in reconstructions.png
    seed: int = 0
    usage_rows: int = 1_000_000  # rows counted for codebook usage (whole shards, seeded, when OUT has more)
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("samples", "usage_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inspect: {name} must be at least 1, got {getattr(self, name)}")
        if self.grid_rows < 0:
            raise ConfigError(f"inspect: grid rows must be 0 or more, got {self.grid_rows}")

    @property
    def uses_model(self) -> bool:
        return bool(self.checkpoint or self.random_weights)

    def report_path(self) -> str:
        if self.report_dir:
            return self.report_dir
        if storage.is_local(self.output):
            return os.path.join(self.output, "report")
        return f"{posixpath.basename(self.output.rstrip('/')) or 'out'}-report"


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
    def from_metadata(cls, meta: dict[str, Any]) -> Layout:
        return cls(
            meta["model"]["preset"],
            meta["model"]["sha256"],
            tuple(meta["patch_nums"]),
            meta["vocab_size"],
            meta["resolution"],
        )

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
            self._check_layout(url, json.loads((f.schema_arrow.metadata or {})[b"vqpipe"]))
            yield f

    def _check_layout(self, url: str, meta: dict[str, Any]) -> None:
        layout = Layout.from_metadata(meta)
        if self.layout is None:
            self.layout = layout
        elif (layout.patch_nums, layout.vocab_size) != (self.layout.patch_nums, self.layout.vocab_size):
            raise ConfigError(
                f"{url}: tokens of another layout ({layout.preset}, scales {layout.patch_nums}) than the "
                f"other shards ({self.layout.preset}, scales {self.layout.patch_nums})"
            )

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
                offsets, vocab = self.layout.offsets, self.layout.vocab_size
                if counts is None:
                    counts = [np.zeros(vocab, np.int64) for _ in self.layout.patch_nums]
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
        wanted = Counter()
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


def _codes(table: Any) -> np.ndarray:
    col = table.column("codes")
    flat = (col.combine_chunks() if hasattr(col, "combine_chunks") else col).flatten().to_numpy()
    return flat.reshape(len(table), col.type.list_size)


def gather_status(reader: OutputReader) -> dict[str, Any]:
    st = read_status(reader.ledger)
    d = st.to_dict()
    return {
        "shards": d["shards"],
        "samples": d["samples"],
        "rows": d["rows"],
        "errors": d["errors"],
        "failed_shards": {
            i: {"reason": rec.reason, "detail": storage.redact(str(rec.detail))}
            for i, rec in st.failed.items()
        },
        "generated": time.time(),
        "vqpipe_version": __version__,
    }


def inspect(opts: InspectOptions) -> str:
    """Write stats.json, the figures and index.html for OUT into the report directory; returns its path."""
    from . import report

    reader = OutputReader.open(opts.output, opts.storage_options)
    if not reader.markers:
        raise ConfigError(f"{storage.redact(opts.output)}: no committed shard (done/*.json) to inspect")
    stats = {"output": storage.redact(opts.output), **gather_status(reader)}
    counts, counted = reader.code_counts(opts.usage_rows, opts.seed)
    if reader.layout is None:  # every committed shard is empty: the layout still comes from a data file
        with reader.data_file(next(iter(reader.markers))):
            pass
        counts = [np.zeros(reader.layout.vocab_size, np.int64) for _ in reader.layout.patch_nums]
    lay = reader.layout
    stats["layout"] = {
        "preset": lay.preset,
        "model_sha256": lay.model_sha256,
        "patch_nums": list(lay.patch_nums),
        "vocab_size": lay.vocab_size,
        "resolution": lay.resolution,
    }
    stats["codebook"] = {"rows_counted": counted, "scales": usage_stats(counts, lay.patch_nums)}
    by_reason: Counter = Counter()
    for rec in reader.markers.values():
        by_reason.update(rec.errors_by_reason)
    examples = reader.error_examples()
    stats["errors_by_reason"] = {
        r: {"count": n, "examples": examples.get(r, [])} for r, n in sorted(by_reason.items())
    }
    stats["stages"] = stage_stats(reader.markers)
    figures: dict[str, bytes] = {}
    if opts.uses_model and stats["rows"]:
        from .reconstruct import measure

        quality, grid, note = measure(reader, opts)
        stats["quality"], stats["model_note"] = quality, note
        if grid:
            figures["reconstructions"], quality["grid"] = report.reconstruction_figure(grid, lay.patch_nums)
    else:
        stats["quality"] = None
        stats["model_note"] = (
            "No committed rows to reconstruct."
            if opts.uses_model
            else "Reconstructions and PSNR/SSIM are left out: they need the tokenizer. Run with --checkpoint URL "
            "(the checkpoint the tokens were made with) or --random-weights."
        )
    figures["codebook_usage"] = report.codebook_figure(counts, stats["codebook"]["scales"])
    figures["throughput"] = report.throughput_figure(stats["stages"])
    out_dir = opts.report_path()
    os.makedirs(out_dir, exist_ok=True)
    for name, png in figures.items():
        with open(os.path.join(out_dir, f"{name}.png"), "wb") as f:
            f.write(png)
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1, allow_nan=False, default=_jsonable)
    with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(report.html_page(stats, figures))
    logger.info("report written to %s", os.path.join(out_dir, "index.html"))
    return out_dir


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
