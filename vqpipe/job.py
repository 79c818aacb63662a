"""The tokenize job on the driver: list inputs, check OUT, plan, dispatch to the cluster, summarise.

Returns a summary, which decides the exit code (0 only when every planned shard is done, or failed within the
allowance) and is recorded in run.json. One module although over 300 lines: the driver's steps in their order,
each a short function, and the summary they end in.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import platform
import time
from dataclasses import dataclass, field
from typing import Any

from . import __version__, storage
from .config import JobConfig, fingerprint, output_settings, random_weights_id
from .dispatch_policy import failure_allowance, failure_kind, keep_failed
from .errors import (
    EXIT_INCOMPLETE,
    EXIT_NO_CAPACITY,
    EXIT_OK,
    CapacityError,
    CheckpointError,
    ConfigError,
    StorageError,
)
from .lease import Lease
from .ledger import Ledger
from .out import card
from .out.incomplete import mark_incomplete
from .out.layout import detect
from .out.snapshot import Snapshot
from .out.verify import forget_damaged, verify
from .plan import Plan, Shard, legacy_stem, make_plan
from .records import DoneRecord, FailedRecord, RunEnd, RunRecord, RunResult
from .status import Status, read_status
from .stop import StopRequest

logger = logging.getLogger(__name__)


def model_sha256(cfg: JobConfig, ledger: Ledger | None = None) -> str:
    """The checkpoint's sha256 (actors verify they loaded the same bytes), after checking on the driver that it
    loads strictly into the preset: a bad checkpoint fails in seconds, before OUT is touched or Ray starts.

    That check imports torch and holds the checkpoint in memory (~2 s and 300 MB + its size, on a driver that
    otherwise needs neither). It is skipped when OUT's run.json (`ledger`, read only) records these very bytes
    (the same sha256, hashed here while streaming) with this preset: a run writes run.json only after this
    check passed. So a nightly rerun with the same checkpoint, a no-op one above all, imports no torch; the
    actors still load the checkpoint strictly and compare its sha256 before any shard runs."""
    if cfg.model.checkpoint is None:
        return random_weights_id(cfg.model.preset)
    previous = ledger.read_run_record() if ledger is not None else None
    if previous is not None and previous.output_settings.get("preset") == cfg.model.preset:
        digest = _sha256(cfg.model.checkpoint, cfg.storage_options)
        if previous.output_settings.get("model_sha256") == digest:
            return digest
    from .model.checkpoint import verify_checkpoint

    return verify_checkpoint(cfg.model.checkpoint, cfg.model.preset, cfg.storage_options)


def _sha256(url: str, storage_options: dict[str, Any] | None) -> str:
    """sha256 of the file at `url`, read in 8 MiB parts (never held whole)."""
    try:
        return storage.sha256_of(url, storage_options)
    except (StorageError, OSError) as e:
        raise CheckpointError(
            storage.redact(f"checkpoint {url}: cannot be read ({type(e).__name__}: {e})")
        ) from e


def run_record(cfg: JobConfig, sha: str) -> RunRecord:
    settings = output_settings(cfg, sha)
    resolved = cfg.to_dict()
    resolved["storage_options"] = storage.public_storage_options(cfg.storage_options)
    resolved["inputs"] = [storage.redact(i) for i in cfg.inputs]
    resolved["model"]["checkpoint"] = storage.redact(cfg.model.checkpoint) if cfg.model.checkpoint else None
    return RunRecord(
        fingerprint=fingerprint(settings),
        output_settings=settings,
        config=resolved,
        versions=_versions(),
        started=time.time(),
    )


def _versions() -> dict[str, str]:
    # From the installed metadata: importing torch costs the driver seconds and ~300 MB on a run that may
    # have nothing to do (a no-op rerun). Same strings as torch.__version__ / pyarrow.__version__.
    return {
        "vqpipe": __version__,
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
        "pyarrow": importlib.metadata.version("pyarrow"),
    }


@dataclass
class Summary:
    plan: Plan
    status: Status
    failed: dict[str, dict[str, Any]]  # failed in this run
    seconds: float
    stop: StopRequest | None = None  # set when a signal ended the run early
    error: str | None = None  # a driver-side storage failure that ended the run (e.g. a full disk)
    kept_failed: dict[str, FailedRecord] = field(default_factory=dict)  # failed before, not retried
    no_capacity: str | None = None  # no replica could be placed in time: what they need, what was free
    allowed_failures: int = 0  # run.max_failed_shards / run.max_failed_fraction, as a number of shards

    @property
    def interrupted(self) -> bool:
        return self.stop is not None and self.stop.requested

    @property
    def unfinished(self) -> set[str]:
        """Planned shards that are not done, and inputs refused before they could run (a non-UTF-8 name)."""
        return (self.plan.ids | {r.shard_id for r in self.plan.refused}) - set(self.status.done)

    @property
    def ok(self) -> bool:
        """Every planned shard is done, or failed (none pending) and no more failed than allowed."""
        if self.error or self.no_capacity:
            return False
        unfinished = self.unfinished
        return unfinished <= {*self.failed, *self.kept_failed} and len(unfinished) <= self.allowed_failures

    @property
    def result(self) -> RunResult:
        if self.error:
            return "error"
        if self.no_capacity:
            return "no_capacity"
        if self.ok:
            return "within_allowance" if self.unfinished else "complete"
        return "interrupted" if self.interrupted else "failed"

    @property
    def exit_code(self) -> int:
        """0 when ok; 75 when no replica could be placed; 130/143 after SIGINT/SIGTERM; 1 otherwise (README)."""
        result = self.result
        if result in ("complete", "within_allowance"):
            return EXIT_OK
        if result == "no_capacity":
            return EXIT_NO_CAPACITY
        if result == "interrupted" and self.stop is not None:
            return self.stop.exit_code
        return EXIT_INCOMPLETE


def tokenize(cfg: JobConfig, stop: StopRequest | None = None) -> Summary:
    """Run the whole job into cfg.output; idempotent and resumable from OUT alone.

    Everything that can be checked on the driver is checked before OUT is touched or Ray starts: the preset, the
    inputs (at least one shard) and the checkpoint (read and checked against the preset). `stop`: a
    StopRequest whose signal handlers the caller installed; the dispatcher honours it, and outside the
    dispatcher a signal ends any wait at once by raising `stop.Interrupted` (see stop.py)."""
    t0 = time.monotonic()
    layout = detect(cfg.output, cfg.storage_options)
    if layout.version < 2:
        raise ConfigError(
            f"{storage.redact(cfg.output)} is a format-1.x OUT; run `vqpipe migrate {storage.redact(cfg.output)}` "
            "once to move it to format 2 (docs/format.md), then tokenize into it"
        )
    with stop.interrupting() if stop is not None else contextlib.nullcontext():
        lease = Lease(cfg.output, cfg.storage_options, ttl_s=cfg.run.lease_ttl_s, layout=layout)
        ledger = Ledger(cfg.output, cfg.storage_options, run_id=lease.run_id, layout=layout)
        inputs = storage.expand_inputs_with_info(list(cfg.inputs), cfg.storage_options)  # planning empties it
        sha = model_sha256(cfg, ledger)
        record = run_record(cfg, sha)
        # Nothing in OUT is touched before this run holds it: cleanup would break another live run's writes.
        lease.acquire(wait_s=cfg.run.wait_for_lease_s)
        with lease:
            return _tokenize_holding(cfg, sha, ledger, record, inputs, lease, stop, t0)


def _tokenize_holding(
    cfg: JobConfig,
    sha: str,
    ledger: Ledger,
    record: RunRecord,
    inputs: list[tuple[str, dict[str, Any]]],
    lease: Lease,
    stop: StopRequest | None,
    t0: float,
) -> Summary:
    previous = ledger.read_run_record()
    # Format-1.0 outputs may hold a plain-stem data file whose done marker a kill prevented; its input now
    # gets a new id, so that file must go before it is redone (sticky: set once, for that OUT's lifetime).
    record.legacy_stem_ids = previous is not None and previous.legacy_stem_ids
    record.run_id = lease.run_id
    ledger.start_run(record, allow_change=cfg.run.allow_config_change, previous=previous)
    logger.info("output %s (fingerprint %s)", storage.redact(cfg.output), record.fingerprint)

    # One listing of done/ and data/, and the index (markers it lacks are read once and indexed; markers a crash
    # lost are written again from their data files): no marker reads below.
    snapshot = Snapshot.open(ledger=ledger, maintain=True)
    if cfg.run.repair:
        damaged = verify(snapshot)
        if damaged:
            forget_damaged(snapshot, damaged)  # their shards are no longer committed: planned again below
            snapshot = Snapshot.open(ledger=ledger, maintain=True)
    if snapshot.incomplete:
        logger.warning(
            "%s: a compaction moving rows is unfinished (readers of data/ fail until it is); run `vqpipe compact`",
            storage.redact(cfg.output),
        )
    committed = snapshot.committed
    plan = make_plan(inputs, ledger, cfg.run.limit_shards, cfg.run.reprocess_changed, committed)
    inputs.clear()  # the plan holds what it needs; 100k listed versions are ~30 MB the run no longer needs
    # A committed input's URL as its marker recorded it (masked the same way): redacting 100k URLs costs seconds.
    done_ids = [s.shard_id for s in plan.done]
    planned = dict(zip(done_ids, committed.urls(done_ids)))
    planned.update(
        (s.shard_id, committed.url(s.shard_id) if s.shard_id in committed else storage.redact(s.url))
        for s in plan.todo
    )
    planned.update((r.shard_id, r.url) for r in plan.refused)
    ledger.write_plan(planned)
    if record.legacy_stem_ids:
        for stem in sorted({legacy_stem(s.url) for s in plan.todo if legacy_stem(s.url) not in committed}):
            ledger.remove_uncommitted(stem)
    for shard in plan.changed:
        action = (
            "reprocessing it" if cfg.run.reprocess_changed else "kept (use --reprocess-changed to redo it)"
        )
        logger.warning("%s: input changed since it was committed; %s", shard.shard_id, action)
    if cfg.run.reprocess_changed and plan.changed:
        if any(s.shard_id in snapshot.placement.compacted for s in plan.changed):
            # Their old rows stay in a compacted file until the next compaction rewrites it: until then readers
            # of data/ must fail rather than read two versions of those rows.
            mark_incomplete(
                ledger.layout, ledger.storage_options, "shards tokenized again are also in compacted files"
            )
        for shard in plan.changed:
            ledger.unmark_done(shard.shard_id)
    # Failure records of shards about to run: the driver removes one when its shard commits (a worker removing
    # "its" record would cost every shard a DELETE of a key that is nearly never there).
    had_failed = ledger.failed_ids() if plan.todo else set()
    kept = _keep_failed(plan, ledger, had_failed, cfg.run.retry_failed)
    logger.info(
        "%d shards: %d already done, %d to run%s",
        len(plan),
        len(plan.done),
        len(plan.todo),
        f", {len(kept)} failed before and not retried" if kept else "",
    )

    failed: dict[str, dict[str, Any]] = {}
    for refused in plan.refused:  # each fails alone, before anything runs
        failed[refused.shard_id] = {"reason": refused.reason, "detail": refused.detail, "attempts": 0}
        logger.error("%s: not run: %s: %s", refused.shard_id, refused.reason, refused.detail)
        failure = FailedRecord(refused.shard_id, refused.url, refused.reason, refused.detail, attempts=0)
        ledger.mark_failed(refused.shard_id, failure)
    error = no_capacity = None
    if plan.todo and not (stop and stop.requested):
        try:
            # The dispatcher acts on a stop itself (a grace period, then the summary); its storage calls are
            # bounded by the storage deadline.
            with stop.interrupting(False) if stop is not None else contextlib.nullcontext():
                stopped = _dispatch(cfg, sha, ledger, plan.todo, stop, failed, lease, had_failed)
        except StorageError as e:  # the driver cannot write OUT (a full disk, lost permissions): end the run
            error, stopped = str(e), True
        except CapacityError as e:  # not one replica could be placed: a scheduler may try again later
            logger.error("%s", e)
            no_capacity, stopped = str(e), True
        finally:
            _flush_index(ledger)
        lease.check()  # a run that lost its lease leaves OUT to the new holder
        if not stopped:
            # Attempts that died mid-shard (actor crash, node loss) leave `.tmp-` files behind. Every attempt
            # this run started has returned by now, so none is a live write: remove them instead of leaving
            # them in OUT. After a stop or an error, the next run's start removes them.
            ledger.remove_temporaries()
        snapshot = Snapshot.open(ledger=ledger)  # a fresh listing: also commits never reported
    status = read_status(snapshot, set(planned))
    allowed = failure_allowance(len(plan), cfg.run.max_failed_shards, cfg.run.max_failed_fraction)
    summary = Summary(plan, status, failed, time.monotonic() - t0, stop, error, kept, no_capacity, allowed)
    record.ended = RunEnd(
        summary.result,
        summary.exit_code,
        len(summary.unfinished & {*failed, *kept}),
        allowed,
        no_capacity or error or "",
        time.time(),
    )
    try:
        ledger.end_run(record)
    except StorageError as e:
        logger.warning("cannot record how the run ended in run.json (%s)", e)
    card.write_quietly(snapshot, len(status.failed) + len(status.failed_outside_plan))
    return summary


def _keep_failed(
    plan: Plan, ledger: Ledger, had_failed: set[str], retry_failed: bool
) -> dict[str, FailedRecord]:
    """Take the shards that failed before for what their input holds, the input unchanged since, out of
    `plan.todo` into `plan.kept_failed` (dispatch_policy.keep_failed): they stay failed and listed, not retried."""
    kept: dict[str, FailedRecord] = {}
    for shard in [s for s in plan.todo if s.shard_id in had_failed and not retry_failed]:
        try:
            record = ledger.read_failed(shard.shard_id)
        except (StorageError, OSError, ValueError, TypeError):  # unreadable: it is retried, as before
            continue
        if keep_failed(record, shard.fingerprint):
            kept[shard.shard_id] = record
    if kept:
        plan.kept_failed = [s for s in plan.todo if s.shard_id in kept]
        plan.todo = [s for s in plan.todo if s.shard_id not in kept]
        logger.warning(
            "%d shard(s) failed before for what their input holds, and the input is unchanged: not retried "
            "(--retry-failed retries them): %s",
            len(kept),
            ", ".join(f"{i} ({r.reason})" for i, r in sorted(kept.items())),
        )
    return kept


def _flush_index(ledger: Ledger) -> None:
    try:
        ledger.flush_index()
    except StorageError as e:  # the index is a cache: the next run reads those markers instead
        logger.warning("cannot append to the ledger index (%s); the next run rebuilds it", e)


def _dispatch(
    cfg: JobConfig,
    sha: str,
    ledger: Ledger,
    todo: list[Shard],
    stop: StopRequest | None,
    failed: dict[str, dict[str, Any]],
    lease: Lease | None = None,
    had_failed: set[str] | frozenset[str] = frozenset(),
) -> bool:
    """Run `todo` on the cluster, adding the shards that fail to `failed` (kept when a driver write ends the run
    early); returns whether a stop left shards running. Raises CapacityError when no replica can be placed."""
    from . import cluster
    from .progress import Progress, Tick, progress_bar

    progress = Progress(
        total=len(todo), interval_s=cfg.run.progress_interval_s, renderer=progress_bar(len(todo))
    )

    def on_done(shard: Shard, rec: DoneRecord) -> None:
        progress.record(rec)
        ledger.note_committed(rec)
        if shard.shard_id in had_failed:
            ledger.clear_failed(shard.shard_id)

    def on_failed(shard: Shard, info: dict[str, Any]) -> None:
        progress.failed += 1
        failed[shard.shard_id] = info
        logger.error(
            "%s: failed after %d attempts: %s: %s",
            shard.shard_id,
            info["attempts"],
            info["reason"],
            info["detail"],
        )
        record = FailedRecord(
            shard.shard_id, storage.redact(shard.url), info["reason"], info["detail"], info["attempts"]
        )
        record.kind, record.fingerprint = failure_kind(record.reason), dict(shard.fingerprint)
        ledger.mark_failed(shard.shard_id, record)

    cluster.connect(cfg.run.address)
    from .driver_metrics import DriverMetrics  # imports Ray: after it is connected

    metrics = DriverMetrics(storage.redact(cfg.output))
    last = Tick(0, 0, len(todo), 0, 0)
    try:
        if stop is not None:
            stop.install()  # again: ray.init replaced the SIGTERM handler with one that exits at once
            if stop.requested:  # it came while Ray was starting
                return False

        def tick(t: Tick) -> None:
            nonlocal last
            last = t
            if lease is not None:
                lease.check()  # raises once the lease is lost: the dispatcher stops and kills its actors
                lease.report(t.replicas_live, t.replicas_pending)
            progress.tick(t)
            metrics.update(progress, t)

        dispatcher = cluster.Dispatcher(cfg, sha, on_done, on_failed, tick, stop)
        dispatcher.run(todo)
    finally:
        if progress.renderer is not None:
            progress.renderer.close()
        metrics.update(progress, last, force=True)
    logger.info("progress: %s", progress.line())
    return bool(dispatcher.abandoned)
