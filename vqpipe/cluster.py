"""Ray: encoder actors wrapping ShardWorker, shard dispatch, retries, speculation, progress. The only Ray importer.

The driver keeps a few shards in flight per actor (so the next one streams while one encodes), retries a shard on
another actor when a task or an actor fails (backoff, attempt limit), re-issues slow tail shards to idle actors
(first commit wins: a worker never commits a shard that already has a done marker), and adds actors when the
cluster grows. The decisions (retry or give up, backoff, which copy commits, what to speculate) are
dispatch_policy's; this module carries them out on Ray. All state that matters lives in OUT, so a killed driver
resumes from OUT alone.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util import metrics

from .config import CPU_ALLOCATOR_ENV, JobConfig
from .dispatch_policy import DispatchPolicy, GiveUp, Retry, Running, ShardQueue
from .errors import CheckpointError, ShardError
from .plan import Shard
from .records import DoneRecord

logger = logging.getLogger(__name__)

_WAIT_S = 1.0
_PLACEMENT_LOG_S = 30.0
_RESCALE_EVERY_S = 30.0


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS / the Ray job's cluster, or start a local one."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": always a new cluster, never one that happens to run on this machine already
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def replica_cpus(nodes: list[dict[str, float]], gpus_per_replica: float, replicas: int) -> int:
    """CPUs per replica when run.cpus_per_replica is not set. With GPUs: a GPU node's CPUs shared by the replicas
    its GPUs hold (the smallest such share in the cluster), so that decoding keeps each GPU fed. Without: the
    cluster's CPUs shared by the replicas, at most one node's worth. 1 when nothing fits (e.g. GPU nodes that an
    autoscaler has not started yet: set run.cpus_per_replica there)."""
    if gpus_per_replica > 0:
        shares = [
            n.get("CPU", 0) * gpus_per_replica / n["GPU"]
            for n in nodes
            if n.get("GPU", 0) >= gpus_per_replica
        ]
    else:
        biggest = max((n.get("CPU", 0) for n in nodes), default=0)
        shares = [min(biggest, sum(n.get("CPU", 0) for n in nodes) / max(1, replicas))]
    return max(1, int(min(shares, default=1)))


@ray.remote(max_restarts=-1, max_task_retries=0)
class EncoderActor:
    """One model replica. Restarts after a crash (state is rebuilt lazily); the driver retries its shards."""

    def __init__(self, config: JobConfig, model_sha256: str, replica: str, threads: int):
        from .logs import setup_logging

        setup_logging()
        self.config, self.model_sha256, self.replica, self.threads = config, model_sha256, replica, threads
        self.worker = None
        self._setup_lock = threading.Lock()  # max_concurrency > 1: shards arriving together load one model
        self.images = metrics.Counter("vqpipe_images", "Images encoded", tag_keys=("replica",))
        self.errors = metrics.Counter(
            "vqpipe_sample_errors", "Samples recorded as errors", tag_keys=("replica",)
        )
        self.shard_seconds = metrics.Histogram(
            "vqpipe_shard_seconds",
            "Wall seconds per shard",
            boundaries=[1, 5, 15, 60, 300, 900, 3600],
            tag_keys=("replica",),
        )

    def setup(self) -> dict[str, Any]:
        """Load the model (once per actor life). Raises CheckpointError, which the driver reports as fatal."""
        with self._setup_lock:
            if self.worker is None:
                import torch

                from .worker import ShardWorker

                torch.set_num_threads(self.threads)
                self.worker = ShardWorker.from_config(
                    self.config, expected_sha256=self.model_sha256, cpus=self.threads
                )
        return {"replica": self.replica, "device": str(self.worker.encoder.device), "pid": os.getpid()}

    def process(self, shard: Shard, attempt: int) -> DoneRecord:
        self.setup()
        try:
            record = self.worker.process(shard, attempt, on_progress=self._count)
        except ShardError:
            raise
        except Exception as e:  # anything else is a bug or infrastructure: keep the type, name the shard
            raise ShardError("worker_error", f"{shard.shard_id}: {type(e).__name__}: {e}") from e
        if not record.skipped:
            # Counter.inc(0) raises ValueError: it used to fail every clean shard after its commit.
            if record.errors:
                self.errors.inc(record.errors, tags={"replica": self.replica})
            self.shard_seconds.observe(record.wall_seconds, tags={"replica": self.replica})
        return record

    def _count(self, n: int) -> None:
        self.images.inc(n, tags={"replica": self.replica})


@dataclass
class _Task:
    shard: Shard
    actor: int
    started: float
    attempt: int


class Dispatcher:
    """Hands shards to actors and collects the outcome of each; dispatch_policy decides retries and speculation.

    A stop request (SIGTERM/SIGINT, see stop.py) ends dispatching: nothing new starts, in-flight shards get
    run.stop_grace_s to commit, the rest stay pending for the next run."""

    def __init__(self, config: JobConfig, model_sha256: str, on_done, on_failed, progress, stop=None):
        self.config, self.model_sha256 = config, model_sha256
        self.on_done, self.on_failed, self.progress = on_done, on_failed, progress
        self.stop = stop
        self.actors: list[Any] = []
        # setup() ObjectRef -> index of an actor that died and is restarting
        self.recovering: dict[Any, int] = {}
        self.last_actor: dict[str, int] = {}
        self.running: dict[Any, _Task] = {}  # ObjectRef -> task
        run = config.run
        self.policy = DispatchPolicy(run.max_attempts, run.retry_backoff_s, run.speculative)
        self.abandoned: list[str] = []  # shards still running when a stop's grace period ended
        self._auto_cpus: int | None = None

    # -- actors ---------------------------------------------------------------------------------------------------

    def wanted_replicas(self) -> int:
        if self.config.run.replicas:
            return self.config.run.replicas
        return max(1, cluster_gpus() // max(1, int(self._gpus())))

    def _gpus(self) -> float:
        g = self.config.run.gpus_per_replica
        return (1.0 if cluster_gpus() else 0.0) if g is None else g

    def scale(self) -> None:
        """Start actors up to the wanted count; the first time, wait for one and surface fatal setup errors."""
        first = not self.actors
        run = self.config.run
        while len(self.actors) < self.wanted_replicas():
            idx = len(self.actors)
            actor = EncoderActor.options(
                num_cpus=self._cpus(),
                num_gpus=self._gpus(),
                max_concurrency=run.in_flight_per_replica,
                runtime_env=self._runtime_env(),
                name=None,
            ).remote(self.config, self.model_sha256, f"replica-{idx}", max(1, int(self._cpus())))
            self.actors.append(actor)
        if first:
            try:
                info = self._first_ready(self.actors[0].setup.remote())
            except RayTaskError as e:
                cause = e.as_instanceof_cause()
                if isinstance(cause, CheckpointError | RuntimeError):
                    raise CheckpointError(str(cause).splitlines()[-1]) from None
                raise
            if info is not None:
                logger.info("%d replica(s) requested; first ready on %s", len(self.actors), info["device"])

    def _cpus(self) -> float:
        """run.cpus_per_replica, or (not set) the share decided from the cluster as it is at the first scale."""
        if self.config.run.cpus_per_replica is not None:
            return self.config.run.cpus_per_replica
        if self._auto_cpus is None:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            self._auto_cpus = replica_cpus(nodes, self._gpus(), self.wanted_replicas())
            logger.info(
                "%d CPUs per replica (decode threads; set run.cpus_per_replica to choose)", self._auto_cpus
            )
        return self._auto_cpus

    def _runtime_env(self) -> dict[str, Any] | None:
        """Environment of the actor process, set before it starts (glibc reads MALLOC_* once, at start)."""
        cpu_only = self._gpus() == 0 or self.config.model.device == "cpu"
        if not (cpu_only and self.config.run.tune_cpu_allocator):
            return None
        return {"env_vars": CPU_ALLOCATOR_ENV}

    def _first_ready(self, ref) -> dict[str, Any] | None:
        """Wait for the first replica, saying why while it cannot be placed (e.g. GPUs asked, none in the
        cluster, no autoscaler); give up after run.placement_timeout_s with the numbers. None on a stop request
        (checked every _WAIT_S: loading a big checkpoint or placing a replica may take minutes)."""
        run, started = self.config.run, time.monotonic()
        last_log = started
        while True:
            left = run.placement_timeout_s - (time.monotonic() - started)
            ready, _ = ray.wait([ref], timeout=max(0.1, min(_WAIT_S, left)))
            if ready:
                return ray.get(ref)
            if self._stopping():
                return None
            now = time.monotonic()
            waited = now - started
            if waited < run.placement_timeout_s and now - last_log < _PLACEMENT_LOG_S:
                continue
            last_log = now
            need = f"{self._cpus():g} CPU + {self._gpus():g} GPU per replica"
            have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
            if waited >= run.placement_timeout_s:
                raise ShardError(
                    "no_replica",
                    f"no encoder replica could start in {waited:.0f}s: needs {need}; cluster has {have} free",
                )
            logger.warning(
                "waiting %.0fs for a replica to be placed: needs %s; cluster has %s free", waited, need, have
            )

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self, shards: list[Shard]) -> None:
        try:
            self._loop(shards)
        finally:  # the actors hold GPUs; a shared or long-lived cluster gets them back as soon as we are done
            for actor in self.actors:
                ray.kill(actor)

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.requested

    def _loop(self, shards: list[Shard]) -> None:
        queue: ShardQueue[Shard] = ShardQueue(shards)
        self.scale()
        last_scale = time.monotonic()
        while queue or self._waiting():
            if self._stopping():
                self._drain(queue)
                return
            now = time.monotonic()
            if now - last_scale > _RESCALE_EVERY_S:
                self.scale()
                last_scale = now
            self._check_recovering()
            self._assign(queue, now)
            self._speculate(queue, now)
            self._wait(queue)
            self.progress(len(self.actors) - len(self.recovering))

    def _drain(self, queue: ShardQueue) -> None:
        """After a stop request: start nothing, give running shards run.stop_grace_s to commit (a second signal
        ends the wait), and leave the rest pending: a rerun resumes them."""
        grace = self.config.run.stop_grace_s
        running = sorted({t.shard.shard_id for t in self.running.values()} - self.policy.committed)
        logger.warning(
            "%s: stopping; no new shards; waiting up to %.0fs for %d running shard(s)%s",
            self.stop.name,
            grace,
            len(running),
            " (send it again to stop waiting)" if running else "",
        )
        deadline = time.monotonic() + grace
        while self._waiting() and time.monotonic() < deadline and not self.stop.hurry:
            self._wait(queue, until=deadline)
        self.abandoned = sorted({t.shard.shard_id for t in self.running.values()} - self.policy.committed)
        if self.abandoned:
            logger.warning(
                "left %d running shard(s) behind (a rerun redoes each one that did not commit): %s",
                len(self.abandoned),
                ", ".join(self.abandoned),
            )

    def _waiting(self) -> bool:
        return self.policy.waiting_on([self._running(t) for t in self.running.values()])

    @staticmethod
    def _running(task: _Task) -> Running:
        return Running(task.shard.shard_id, task.actor, task.started)

    def _wait(self, queue: ShardQueue, until: float | None = None) -> None:
        """Block until a shard finishes, a restarting actor answers, or a retry is due; at most _WAIT_S.

        Waiting on the running shards alone spun the CPU whenever none was running (retries in backoff, every
        actor restarting after a node loss): ray.wait([]) returns at once.
        """
        now = time.monotonic()
        limits = [_WAIT_S]
        if until is not None:  # draining after a stop: no retry will start, only the deadline counts
            limits.append(until - now)
        elif (due := queue.next_retry_in(now)) is not None:
            limits.append(due)
        timeout = max(0.0, min(limits))
        refs = [*self.running, *self.recovering]
        if not refs:
            time.sleep(timeout)
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        for ref in ready:
            if ref in self.running:  # a recovering actor's answer is taken by _check_recovering
                self._collect(ref, queue)

    def _check_recovering(self) -> None:
        """An actor that died is used again once it answers a setup call after its restart."""
        if not self.recovering:
            return
        ready, _ = ray.wait(list(self.recovering), num_returns=len(self.recovering), timeout=0)
        for ref in ready:
            idx = self.recovering.pop(ref)
            try:
                ray.get(ref)
                logger.info("replica-%d is back", idx)
            except (RayActorError, RayTaskError):
                self.recovering[self.actors[idx].setup.remote()] = idx

    def _free_actor(self, avoid: int | None = None) -> int | None:
        down = set(self.recovering.values())
        load = {i: 0 for i in range(len(self.actors)) if i not in down}
        for t in self.running.values():
            if t.actor in load:
                load[t.actor] += 1
        free = [i for i, n in load.items() if n < self.config.run.in_flight_per_replica]
        preferred = [i for i in free if i != avoid] or free
        return min(preferred, key=lambda i: load[i]) if preferred else None

    def _assign(self, queue: ShardQueue, now: float) -> None:
        while (shard := queue.peek(now)) is not None:
            actor = self._free_actor(avoid=self.last_actor.get(shard.shard_id))
            if actor is None:
                return
            queue.pop()
            self._submit(shard, actor)

    def _submit(self, shard: Shard, actor: int, speculative: bool = False) -> None:
        attempt = self.policy.next_attempt(shard.shard_id, speculative)
        ref = self.actors[actor].process.remote(shard, attempt)
        self.running[ref] = _Task(shard, actor, time.monotonic(), attempt)
        self.last_actor[shard.shard_id] = actor

    def _speculate(self, queue: ShardQueue, now: float) -> None:
        """Give a copy of the slowest running shards to idle actors once nothing else is waiting."""
        tasks = {self._running(t): t for t in self.running.values()}
        slow = self.policy.to_speculate(list(tasks), not queue, now)
        for r in slow:
            actor = self._free_actor(avoid=r.actor)
            if actor is None or actor == r.actor:
                return
            logger.info(
                "%s: slow (%.0fs, median %.0fs); speculative copy on replica-%d",
                r.shard_id,
                now - r.started,
                self.policy.durations.value,
                actor,
            )
            self._submit(tasks[r].shard, actor, speculative=True)

    def _collect(self, ref, queue: ShardQueue) -> None:
        task = self.running.pop(ref)
        sid = task.shard.shard_id
        twin_running = any(t.shard.shard_id == sid for t in self.running.values())
        try:
            record = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            reason, detail = _failure(e)
            if isinstance(e, RayActorError) and task.actor not in self.recovering.values():
                logger.warning("%s: replica-%d died (%s); retrying elsewhere", sid, task.actor, detail)
                self.recovering[self.actors[task.actor].setup.remote()] = task.actor
            decision = self.policy.failed(sid, reason, twin_running)
            if isinstance(decision, GiveUp):
                info = {"reason": reason, "detail": detail, "attempts": decision.attempts}
                self.on_failed(task.shard, info)
            elif isinstance(decision, Retry):
                logger.warning(
                    "%s: attempt %d failed (%s: %s); retry in %.1fs",
                    sid,
                    task.attempt,
                    reason,
                    detail,
                    decision.backoff_s,
                )
                queue.retry_at(task.shard, time.monotonic() + decision.backoff_s)
            return
        if not self.policy.succeeded(sid, time.monotonic() - task.started):
            logger.info("%s: copy on replica-%d discarded; another attempt committed first", sid, task.actor)
            return
        # A twin still running is left to finish: its worker sees the done marker and discards its output.
        self.on_done(task.shard, record)


def _failure(e: RayActorError | RayTaskError) -> tuple[str, str]:
    if isinstance(e, RayTaskError):
        cause = e.as_instanceof_cause()
        if isinstance(cause, ShardError):
            return cause.reason, cause.detail
        return "worker_error", str(cause).strip().splitlines()[-1]
    return "actor_died", str(e).strip().splitlines()[0][:300]
