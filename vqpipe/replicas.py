"""Ray: one encoder replica. `EncoderActor` wraps one ShardWorker (one model replica): where it runs, loading
the model, a bundle of shards per call with one outcome per shard, its metrics, and its exit when its node's
raylet dies. How many run, and where, is the pool's business (pool.py); which shard goes where, the dispatcher's.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray
from ray.util import metrics

from .config import JobConfig
from .dispatch_policy import MAX_IN_FLIGHT
from .errors import STORAGE_ERROR, ShardError, StorageError
from .lease import _pid_namespace  # a process is "on this host" only if host name and pid namespace agree
from .plan import Shard
from .records import DoneRecord

if TYPE_CHECKING:
    from .worker import ShardWorker

logger = logging.getLogger(__name__)

_ORPHAN_CHECK_S = 1.0  # how often a replica looks whether its node's raylet is still its parent


def publish_zero(counter: metrics.Counter, tags: dict[str, str]) -> None:
    """Export `counter` at 0 for `tags` now, not at its first increment: an alert on it then reads 0 instead of
    "no data". Ray's `Counter.inc` refuses 0; `_record`, which `inc` calls, takes it (Ray 2.60; a scrape in
    tests/test_cluster.py would see the series missing if that changed)."""
    counter._record(0, tags=tags)


@dataclass(frozen=True)
class Placement:
    """Where a replica's process runs: for the log line, and to find the process again if its node dies."""

    node_id: str
    node_ip: str
    host: str
    pid: int
    start_ticks: str  # the process's start time (/proc/<pid>/stat): a pid reused later has another
    pid_namespace: str | None

    @staticmethod
    def here() -> Placement:
        ctx = ray.get_runtime_context()
        return Placement(
            ctx.get_node_id(), ray.util.get_node_ip_address(), socket.gethostname(), os.getpid(), _start_ticks(),
            _pid_namespace(),
        )  # fmt: skip


def _start_ticks(pid: int | str = "self") -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def kill_orphan(p: Placement) -> bool:
    """SIGKILL the process `p` names if this host can reach it (same host and pid namespace) and it is still that
    process (same start time); True if it was killed."""
    if p.host != socket.gethostname() or p.pid_namespace is None or p.pid_namespace != _pid_namespace():
        return False
    if not p.start_ticks or _start_ticks(p.pid) != p.start_ticks:
        return False
    try:
        os.kill(p.pid, signal.SIGKILL)
    except OSError:
        return False
    return True


def _exit_with_raylet(replica: str) -> None:
    """A Ray worker is a child of its node's raylet. When only the raylet dies (SIGKILL, the OOM killer), Ray
    declares the node dead and restarts the actor elsewhere, but this process lives on as an orphan: it went on
    committing shards that were being retried elsewhere, and outlived the job. It exits once its parent is gone
    (a worker that was not started by the raylet itself has nothing to watch)."""
    parent = os.getppid()
    if os.environ.get("RAY_RAYLET_PID") != str(parent):
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_ORPHAN_CHECK_S)
        logger.error("%s: its node's raylet (pid %d) is gone; exiting", replica, parent)
        os._exit(1)

    threading.Thread(target=watch, name="raylet-watch", daemon=True).start()


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
        _exit_with_raylet(replica)
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
        publish_zero(self.errors, {"replica": replica})

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

    def ping(self) -> Placement:
        """Answers as soon as the actor is placed and its process runs (setup may still be loading the model)."""
        return Placement.here()

    def setup(self) -> str:
        """Load the model (once per actor life); its device. Raises CheckpointError, which the driver reports as
        fatal."""
        return str(self._loaded().encoder.device)

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
RemoteEncoderActor = ray.remote(max_restarts=-1, max_task_retries=0)(EncoderActor)
