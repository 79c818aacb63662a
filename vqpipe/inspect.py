"""`vqpipe inspect` and `vqpipe decode`: read an OUT (done markers, data and error files) and gather what a person
needs to judge the tokens before training on them: a seeded sample of rows with their reconstructions and
originals, codebook usage per scale, error reasons with example keys, and seconds per stage.

OUT is read by `vqpipe.output_reader`; the figures and the page are drawn by `vqpipe.report`; the model side lives
in `vqpipe.reconstruct`.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import __version__, storage
from .errors import ConfigError, StorageError
from .output_reader import OutputReader
from .stats import stage_stats, usage_stats
from .status import read_status

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InspectOptions:
    output: str
    report_dir: str | None = None  # local; default OUT/_report, or ./<name>-report when OUT is remote
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
            return os.path.join(self.output, "_report")  # "_": readers of OUT as a dataset skip it
        return f"{posixpath.basename(self.output.rstrip('/')) or 'out'}-report"


def gather_status(reader: OutputReader) -> dict[str, Any]:
    st = read_status(reader.snapshot)
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

    out_dir = opts.report_path()
    check_writable(out_dir)  # before minutes of reading, not when the first figure is saved
    reader = OutputReader.open(opts.output, opts.storage_options)
    if not reader.shard_ids:
        raise ConfigError(f"{storage.redact(opts.output)}: no committed shard to inspect")
    stats = {"output": storage.redact(opts.output), **gather_status(reader)}
    counts, counted = reader.code_counts(opts.usage_rows, opts.seed)
    lay = reader.read_layout()  # every committed shard may be empty: the layout still comes from a data file
    if not counts:  # no row was counted
        counts = [np.zeros(lay.vocab_size, np.int64) for _ in lay.patch_nums]
    stats["layout"] = {
        "preset": lay.preset,
        "model_sha256": lay.model_sha256,
        "patch_nums": list(lay.patch_nums),
        "vocab_size": lay.vocab_size,
        "resolution": lay.resolution,
    }
    stats["codebook"] = {"rows_counted": counted, "scales": usage_stats(counts, lay.patch_nums)}
    by_reason = reader.errors_by_reason()
    examples = reader.error_examples()
    stats["errors_by_reason"] = {
        r: {"count": n, "examples": examples.get(r, [])} for r, n in sorted(by_reason.items())
    }
    stats["stages"] = stage_stats(reader.timing_markers(opts.seed))
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
    page = report.html_page(stats, figures)
    try:
        os.makedirs(out_dir, exist_ok=True)
        for name, png in figures.items():
            with open(os.path.join(out_dir, f"{name}.png"), "wb") as f:
                f.write(png)
        with open(os.path.join(out_dir, "stats.json"), "w") as f:
            json.dump(stats, f, indent=1, allow_nan=False, default=_jsonable)
        with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as e:  # passed the check above, and failed anyway (a full disk, a mount gone read-only)
        raise StorageError(f"{out_dir}: cannot write the report ({e}); pass --report DIR") from None
    logger.info("report written to %s", os.path.join(out_dir, "index.html"))
    return out_dir


def check_writable(path: str) -> None:
    """The report directory exists or can be made, and this user can write into it; creates nothing (a mistyped
    OUT must not gain a report directory). Root writes through any mode bits, but not into a read-only mount."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK):
        return
    why = "not a directory" if not os.path.isdir(probe) else "not writable by this user"
    if os.path.isdir(probe) and os.statvfs(probe).f_flag & os.ST_RDONLY:
        why = "on a read-only filesystem"
    raise ConfigError(
        f"{path}: cannot write the report ({probe} is {why}); pass --report DIR, a directory you can write"
    )


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
