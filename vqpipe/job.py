"""The tokenize job on the driver: list inputs, check OUT, plan, dispatch to the cluster, summarise.

Returns a summary; the entry points turn it into an exit code (0 only when every planned shard is done).
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from dataclasses import dataclass, field
from typing import Any

from . import __version__, storage
from .config import JobConfig, fingerprint, output_settings, random_weights_id
from .errors import ConfigError
from .ledger import Ledger, Status, read_status
from .plan import Plan, Shard, make_plan

logger = logging.getLogger(__name__)

_HASH_CHUNK = 8 << 20


def model_sha256(cfg: JobConfig) -> str:
    """The checkpoint's sha256, streamed on the driver (actors verify they loaded the same bytes)."""
    if cfg.model.checkpoint is None:
        return random_weights_id(cfg.model.preset)
    digest = hashlib.sha256()
    with storage.open_input(cfg.model.checkpoint, cfg.storage_options) as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def run_record(cfg: JobConfig, sha: str) -> dict[str, Any]:
    settings = output_settings(cfg, sha)
    resolved = cfg.to_dict()
    resolved["storage_options"] = storage.public_storage_options(cfg.storage_options)
    resolved["inputs"] = [storage.redact(i) for i in cfg.inputs]
    resolved["model"]["checkpoint"] = storage.redact(cfg.model.checkpoint) if cfg.model.checkpoint else None
    return {
        "fingerprint": fingerprint(settings),
        "output_settings": settings,
        "config": resolved,
        "versions": _versions(),
        "started": time.time(),
    }


def _versions() -> dict[str, str]:
    import pyarrow
    import torch

    return {
        "vqpipe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyarrow": pyarrow.__version__,
    }


@dataclass
class Progress:
    """Driver-side progress lines: shards done/total, images/s, errors, ETA, live replicas."""

    total: int
    interval_s: float
    done: int = 0
    failed: int = 0
    images: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def record(self, rec: dict[str, Any]) -> None:
        self.done += 1
        self.images += rec.get("images", rec["rows"])  # markers before views (format 1.1) have rows only
        self.errors += rec["errors"]

    def line(self, replicas: int | None = None) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.images / elapsed
        finished = self.done + self.failed
        eta = elapsed / finished * (self.total - finished) if finished else float("nan")
        parts = [
            f"shards {self.done}/{self.total} done",
            f"{self.failed} failed" if self.failed else None,
            f"{self.images} images ({rate:.1f}/s)",
            f"{self.errors} sample errors",
            f"ETA {_duration(eta)}" if finished < self.total else None,
            f"{replicas} replicas" if replicas is not None else None,
        ]
        return ", ".join(p for p in parts if p)

    def tick(self, replicas: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            logger.info("progress: %s", self.line(replicas))


def _duration(s: float) -> str:
    if s != s:  # NaN: nothing finished yet
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class Summary:
    plan: Plan
    status: Status
    failed: dict[str, dict[str, Any]]
    seconds: float

    @property
    def ok(self) -> bool:
        planned = {s.shard_id for s in self.plan.all}
        return not self.failed and planned <= set(self.status.done)


def tokenize(cfg: JobConfig) -> Summary:
    """Run the whole job into cfg.output; idempotent and resumable from OUT alone."""
    from .model import PRESETS

    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {cfg.model.preset!r}; known: {', '.join(PRESETS)}")
    t0 = time.monotonic()
    ledger = Ledger(cfg.output, cfg.storage_options)
    sha = model_sha256(cfg)
    record = run_record(cfg, sha)
    ledger.start_run(record, allow_change=cfg.run.allow_config_change)
    logger.info("output %s (fingerprint %s)", storage.redact(cfg.output), record["fingerprint"])

    inputs = storage.expand_inputs_with_info(list(cfg.inputs), cfg.storage_options)
    plan = make_plan(inputs, ledger, cfg.run.limit_shards, cfg.run.reprocess_changed)
    ledger.write_plan({s.shard_id: storage.redact(s.url) for s in plan.all})
    for shard in plan.changed:
        action = (
            "reprocessing it" if cfg.run.reprocess_changed else "kept (use --reprocess-changed to redo it)"
        )
        logger.warning("%s: input changed since it was committed; %s", shard.shard_id, action)
    if cfg.run.reprocess_changed:
        for shard in plan.changed:
            ledger.unmark_done(shard.shard_id)
    logger.info("%d shards: %d already done, %d to run", len(plan.all), len(plan.done), len(plan.todo))

    failed: dict[str, dict[str, Any]] = {}
    if plan.todo:
        failed = _dispatch(cfg, sha, ledger, plan.todo)
        # Attempts that died mid-shard (actor crash, node loss) leave `.tmp-` files behind. Every attempt this
        # run started has returned by now, so none is a live write: remove them instead of leaving them in OUT.
        ledger.remove_temporaries()
    status = read_status(ledger)
    return Summary(plan, status, failed, time.monotonic() - t0)


def _dispatch(cfg: JobConfig, sha: str, ledger: Ledger, todo: list[Shard]) -> dict[str, dict[str, Any]]:
    from . import cluster

    progress = Progress(total=len(todo), interval_s=cfg.run.progress_interval_s)
    failed: dict[str, dict[str, Any]] = {}

    def on_done(shard: Shard, rec: dict[str, Any]) -> None:
        progress.record(rec)

    def on_failed(shard: Shard, info: dict[str, Any]) -> None:
        progress.failed += 1
        failed[shard.shard_id] = info
        ledger.mark_failed(
            shard.shard_id, {"shard_id": shard.shard_id, "url": storage.redact(shard.url), **info}
        )
        logger.error(
            "%s: failed after %d attempts: %s: %s",
            shard.shard_id,
            info["attempts"],
            info["reason"],
            info["detail"],
        )

    cluster.connect(cfg.run.address)
    cluster.Dispatcher(cfg, sha, on_done, on_failed, progress.tick).run(todo)
    logger.info("progress: %s", progress.line())
    return failed
