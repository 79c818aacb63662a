"""Ray: the encoder replicas. `EncoderActor` wraps one ShardWorker (one model replica); `ReplicaPool` starts them up
to the wanted count, sizes and places them, and takes a crashed one out of service until Ray has restarted it.

Ray is imported here and in cluster.py (the dispatch loop) only. Which shard goes where is the dispatcher's business.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray import ObjectRef
from ray.exceptions import RayActorError, RayTaskError
from ray.util import metrics

from .config import CPU_ALLOCATOR_ENV, JobConfig
from .dispatch_policy import MAX_IN_FLIGHT
from .errors import STORAGE_ERROR, CheckpointError, ShardError, StorageError
from .plan import Shard
from .records import DoneRecord

if TYPE_CHECKING:
    from .worker import ShardWorker

logger = logging.getLogger(__name__)

_WAIT_S = 1.0
_PLACEMENT_LOG_S = 30.0


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


@dataclass(frozen=True)
class ShardOutcome:
    """One shard's part of a replica's answer to a task: its done record, or the reason it failed. Each shard of
    a bundle commits or fails on its own; only a dead actor fails them together (Ray raises for the task)."""

    shard_id: str
    record: DoneRecord | None = None
    reason: str = ""
    detail: str = ""


class EncoderActor:
    """One model replica. Restarts after a crash (state is rebuilt lazily); the driver retries its shards."""

    def __init__(self, config: JobConfig, model_sha256: str, replica: str, threads: int):
        from .logs import setup_logging

        setup_logging()
        self.config, self.model_sha256, self.replica, self.threads = config, model_sha256, replica, threads
        # shards the driver sends at once; it says so when it changes (dispatch_policy.InFlight)
        self.slots = config.run.in_flight_per_replica
        self.worker: ShardWorker | None = None
        self._setup_lock = threading.Lock()  # max_concurrency > 1: shards arriving together load one model
        self._bundle_pool: ThreadPoolExecutor | None = None
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

    def _loaded(self) -> ShardWorker:
        """The worker, its model loaded once per actor life."""
        with self._setup_lock:
            if self.worker is None:
                import torch

                from .worker import ShardWorker

                torch.set_num_threads(self.threads)
                self.worker = ShardWorker.from_config(
                    self.config, expected_sha256=self.model_sha256, cpus=self.threads, slots=self.slots
                )
            return self.worker

    def setup(self) -> dict[str, Any]:
        """Load the model (once per actor life). Raises CheckpointError, which the driver reports as fatal."""
        worker = self._loaded()
        return {"replica": self.replica, "device": str(worker.encoder.device), "pid": os.getpid()}

    def process(
        self,
        shards: list[Shard],
        attempts: list[int],
        in_flight: int | None = None,
        speculative: bool = False,
    ) -> list[ShardOutcome]:
        """Tokenize a bundle of shards at once (several small shards per call: Ray's per-call cost is paid per
        bundle, not per shard), each committing or failing on its own; one outcome per shard, in order.
        `in_flight`: how many shards the driver now keeps on this actor (its encoder loop waits for them);
        `speculative`: a copy of a running shard, which looks for the original's commit before it starts."""
        worker = self._loaded()
        if in_flight is not None:
            self.slots = worker.loop.slots = in_flight
        if len(shards) == 1:
            return [self._one(worker, shards[0], attempts[0], speculative)]
        with self._setup_lock:
            if self._bundle_pool is None:  # the shards of a bundle run together, each on its own thread
                threads = max(self.config.run.in_flight_per_replica, MAX_IN_FLIGHT)  # as max_concurrency
                self._bundle_pool = ThreadPoolExecutor(threads, thread_name_prefix="shard")
        futures = [
            self._bundle_pool.submit(self._one, worker, shard, attempt, speculative)
            for shard, attempt in zip(shards, attempts, strict=True)
        ]
        return [f.result() for f in futures]

    def _one(self, worker: ShardWorker, shard: Shard, attempt: int, speculative: bool) -> ShardOutcome:
        try:
            record = worker.process(shard, attempt, on_progress=self._count, look_first=speculative)
        except ShardError as e:
            return ShardOutcome(shard.shard_id, reason=e.reason, detail=e.detail)
        except StorageError as e:  # the store failed, not this code: one line saying what happened, retried
            logger.warning("%s: storage error: %s", shard.shard_id, e)
            return ShardOutcome(shard.shard_id, reason=STORAGE_ERROR, detail=f"{shard.shard_id}: {e}")
        except Exception as e:  # anything else is a bug or infrastructure: keep the type, name the shard
            logger.exception("%s: worker error", shard.shard_id)
            detail = f"{shard.shard_id}: {type(e).__name__}: {e}"
            return ShardOutcome(shard.shard_id, reason="worker_error", detail=detail)
        if not record.skipped:
            # Counter.inc(0) raises ValueError: it used to fail every clean shard after its commit.
            if record.errors:
                self.errors.inc(record.errors, tags={"replica": self.replica})
            self.shard_seconds.observe(record.wall_seconds, tags={"replica": self.replica})
        return ShardOutcome(shard.shard_id, record)

    def _count(self, n: int) -> None:
        self.images.inc(n, tags={"replica": self.replica})


# ray.remote called, not used as a class decorator: mypy cannot see a decorator change a class into Ray's
# ActorClass. The Ray actor keeps the class's name, EncoderActor.
_EncoderActorClass = ray.remote(max_restarts=-1, max_task_retries=0)(EncoderActor)


class ReplicaPool:
    """The run's encoder actors, by index: started up to the wanted count (more when the cluster grows), and
    out of service from their crash (a node lost, a process killed) until they answer again after Ray restarts
    them."""

    def __init__(self, config: JobConfig, model_sha256: str, stopping: Callable[[], bool]):
        self.config, self.model_sha256, self.stopping = config, model_sha256, stopping
        # EncoderActor handles. Ray types actor methods only when declared with @ray.method, so calls such as
        # `actor.process.remote(...)` are unchecked.
        self.actors: list[Any] = []
        # setup() ObjectRef -> index of an actor that died and is restarting
        self.recovering: dict[ObjectRef[Any], int] = {}
        self._auto_cpus: int | None = None

    def in_service(self) -> list[int]:
        """Indices of the actors that are not restarting."""
        down = set(self.recovering.values())
        return [i for i in range(len(self.actors)) if i not in down]

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
            actor = _EncoderActorClass.options(
                num_cpus=self._cpus(),
                num_gpus=self._gpus(),
                max_concurrency=max(run.in_flight_per_replica, MAX_IN_FLIGHT),
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

    def _first_ready(self, ref: ObjectRef[dict[str, Any]]) -> dict[str, Any] | None:
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
            if self.stopping():
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

    def lost(self, idx: int) -> bool:
        """Take actor `idx`, which died, out of service until it answers after its restart; False when it is
        out already (several of its shards fail with it)."""
        if idx in self.recovering.values():
            return False
        self.recovering[self.actors[idx].setup.remote()] = idx
        return True

    def check_recovering(self) -> None:
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

    def kill_all(self) -> None:
        """The actors hold GPUs; a shared or long-lived cluster gets them back as soon as the run is done."""
        for actor in self.actors:
            ray.kill(actor)
