"""Ray: joining the cluster, and the dispatch loop that hands shards to the live encoder replicas (pool.py) and
collects their outcomes: retries, speculation, progress. Ray is imported here, in pool.py, replicas.py and
driver_metrics.py only.

The driver keeps a few shards in flight per live actor (so the next one streams while one encodes; small shards
go several per call, see dispatch_policy.InFlight), retries a shard on another actor when a task or an actor
fails (backoff, attempt limit), re-issues slow tail shards to idle actors (first commit wins: a worker never
commits a shard that already has a done marker), and lets the pool follow the cluster every few seconds. The
decisions (retry or give up, backoff, which copy commits, what to speculate; how many replicas) are
dispatch_policy's and replica_policy's; this module carries them out on Ray. All state that matters lives in
OUT, so a killed driver resumes from OUT alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray import ObjectRef
from ray.exceptions import RayActorError, RayTaskError

from .config import JobConfig
from .dispatch_policy import DispatchPolicy, GiveUp, InFlight, Retry, Running, ShardQueue
from .errors import STORAGE_ERROR, CapacityError, ShardError, StorageError
from .plan import Shard
from .pool import ReplicaPool
from .progress import Tick
from .records import DoneRecord
from .replicas import ShardOutcome
from .stop import StopRequest

logger = logging.getLogger(__name__)

_WAIT_S = 1.0
_RESCALE_EVERY_S = 5.0  # how often the pool looks at the cluster (a GCS call): nodes joined or left, timeouts


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS / the Ray job's cluster, or start a local one."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": always a new cluster, never one that happens to run on this machine already
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


@dataclass
class _Task:
    """One call on an actor: a bundle of shards (one, unless they are small), each with its attempt number."""

    shards: list[Shard]
    attempts: list[int]
    actor: int
    started: float


class Dispatcher:
    """Hands shards to actors and collects the outcome of each; dispatch_policy decides retries and speculation.

    A stop request (SIGTERM/SIGINT, see stop.py) ends dispatching: nothing new starts, in-flight shards get
    run.stop_grace_s to commit, the rest stay pending for the next run."""

    def __init__(
        self,
        config: JobConfig,
        model_sha256: str,
        on_done: Callable[[Shard, DoneRecord], None],
        on_failed: Callable[[Shard, dict[str, Any]], None],
        progress: Callable[[Tick], None],
        stop: StopRequest | None = None,
    ):
        self.config = config
        self.on_done, self.on_failed, self.progress = on_done, on_failed, progress
        self.stop = stop
        self.pool = ReplicaPool(config, model_sha256)
        self.last_actor: dict[str, int] = {}
        self.running: dict[ObjectRef[list[ShardOutcome]], _Task] = {}
        run = config.run
        self.policy = DispatchPolicy(run.max_attempts, run.retry_backoff_s, run.speculative)
        self.in_flight = InFlight(run.in_flight_per_replica, config.encode.batch_size)
        self.abandoned: list[str] = []  # shards still running when a stop's grace period ended
        self.retries = 0

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self, shards: list[Shard]) -> None:
        try:
            self._loop(shards)
        finally:
            self.pool.kill_all()

    def _loop(self, shards: list[Shard]) -> None:
        queue: ShardQueue[Shard] = ShardQueue(shards)
        last_scale = time.monotonic()
        self.pool.scale(last_scale)
        while queue or self._waiting():
            if self.stop is not None and self.stop.requested:
                self._drain(queue, self.stop)
                return
            now = time.monotonic()
            if now - last_scale > _RESCALE_EVERY_S:
                self.pool.scale(now)
                last_scale = now
            self.pool.check(now)
            if (why := self.pool.exhausted()) is not None:
                raise CapacityError(why)
            self._assign(queue, now)
            self._speculate(queue, now)
            self._wait(queue)
            running = sum(len(t.shards) for t in self.running.values())
            live = len(self.pool.live())
            self.progress(Tick(live, self.pool.pending(), len(queue), running, self.retries))

    def _drain(self, queue: ShardQueue[Shard], stop: StopRequest) -> None:
        """After a stop request: start nothing, give running shards run.stop_grace_s to commit (a second signal
        ends the wait), and leave the rest pending: a rerun resumes them."""
        grace = self.config.run.stop_grace_s
        running = sorted(self._running_ids() - self.policy.committed)
        logger.warning(
            "%s: stopping; no new shards; waiting up to %.0fs for %d running shard(s)%s",
            stop.name,
            grace,
            len(running),
            " (send it again to stop waiting)" if running else "",
        )
        deadline = time.monotonic() + grace
        while self._waiting() and time.monotonic() < deadline and not stop.hurry:
            self._wait(queue, until=deadline)
        self.abandoned = sorted(self._running_ids() - self.policy.committed)
        if self.abandoned:
            logger.warning(
                "left %d running shard(s) behind (a rerun redoes each one that did not commit): %s",
                len(self.abandoned),
                ", ".join(self.abandoned),
            )

    def _running_ids(self) -> set[str]:
        return {s.shard_id for t in self.running.values() for s in t.shards}

    def _waiting(self) -> bool:
        return self.policy.waiting_on([r for t in self.running.values() for r, _ in self._copies(t)])

    @staticmethod
    def _copies(task: _Task) -> list[tuple[Running, Shard]]:
        """The running copy of each shard of a task, as the policy sees it."""
        return [(Running(s.shard_id, task.actor, task.started), s) for s in task.shards]

    def _wait(self, queue: ShardQueue[Shard], until: float | None = None) -> None:
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
        refs = [*self.running, *self.pool.calls()]
        if not refs:
            time.sleep(timeout)
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        for ref in ready:
            if ref in self.running:  # a replica's ping or setup answer is taken by pool.check
                self._collect(ref, queue)

    def _free_actor(self, avoid: int | None = None) -> tuple[int, int] | None:
        """The least loaded live actor with room for another shard (not `avoid` when another has room), and how
        many more shards it may take."""
        load = dict.fromkeys(self.pool.live(), 0)
        for t in self.running.values():
            if t.actor in load:
                load[t.actor] += len(t.shards)
        free = [i for i, n in load.items() if n < self.in_flight.limit]
        preferred = [i for i in free if i != avoid] or free
        if not preferred:
            return None
        actor = min(preferred, key=lambda i: load[i])
        return actor, self.in_flight.limit - load[actor]

    def _assign(self, queue: ShardQueue[Shard], now: float) -> None:
        while (shard := queue.peek(now)) is not None:
            free = self._free_actor(avoid=self.last_actor.get(shard.shard_id))
            if free is None:
                return
            actor, room = free
            bundle = [queue.pop()]
            while len(bundle) < min(room, self.in_flight.bundle) and queue.peek(now) is not None:
                bundle.append(queue.pop())
            self._submit(bundle, actor)

    def _submit(self, shards: list[Shard], actor: int, speculative: bool = False) -> None:
        attempts = [self.policy.next_attempt(s.shard_id, speculative) for s in shards]
        ref = self.pool.actor(actor).process.remote(shards, attempts, self.in_flight.limit, speculative)
        self.running[ref] = _Task(shards, attempts, actor, time.monotonic())
        for s in shards:
            self.last_actor[s.shard_id] = actor

    def _speculate(self, queue: ShardQueue[Shard], now: float) -> None:
        """Give a copy of the slowest running shards to idle actors once nothing else is waiting."""
        copies = dict(c for t in self.running.values() for c in self._copies(t))
        slow = self.policy.to_speculate(list(copies), not queue, now)
        for r in slow:
            free = self._free_actor(avoid=r.actor)
            if free is None or free[0] == r.actor:
                return
            actor = free[0]
            logger.info(
                "%s: slow (%.0fs, median %.0fs); speculative copy on replica-%d",
                r.shard_id,
                now - r.started,
                self.policy.durations.value,
                actor,
            )
            self._submit([copies[r]], actor, speculative=True)

    def _collect(self, ref: ObjectRef[list[ShardOutcome]], queue: ShardQueue[Shard]) -> None:
        task = self.running.pop(ref)
        try:
            outcomes = ray.get(ref)
        except (RayActorError, RayTaskError) as e:  # the whole bundle failed with its actor (or a bug)
            reason, detail = _failure(e)
            if isinstance(e, RayActorError):
                # Said for each call it took down, whether the pool's own check noticed the death first or not.
                self.pool.lost(task.actor, time.monotonic())
                ids = ", ".join(s.shard_id for s in task.shards)
                logger.warning("%s: replica-%d died (%s); retrying elsewhere", ids, task.actor, detail)
            outcomes = [ShardOutcome(s.shard_id, reason=reason, detail=detail) for s in task.shards]
        for shard, attempt, outcome in zip(task.shards, task.attempts, outcomes, strict=True):
            if outcome.record is None:
                self._failed(shard, attempt, outcome, queue)
            else:
                self._done(shard, task, outcome.record)

    def _failed(self, shard: Shard, attempt: int, outcome: ShardOutcome, queue: ShardQueue[Shard]) -> None:
        sid = shard.shard_id
        twin_running = sid in self._running_ids()
        decision = self.policy.failed(sid, outcome.reason, twin_running)
        if isinstance(decision, GiveUp):
            info = {"reason": outcome.reason, "detail": outcome.detail, "attempts": decision.attempts}
            self.on_failed(shard, info)
        elif isinstance(decision, Retry):
            self.retries += 1
            logger.warning(
                "%s: attempt %d failed (%s: %s); retry in %.1fs",
                sid,
                attempt,
                outcome.reason,
                outcome.detail,
                decision.backoff_s,
            )
            queue.retry_at(shard, time.monotonic() + decision.backoff_s)

    def _done(self, shard: Shard, task: _Task, record: DoneRecord) -> None:
        shape = self.in_flight.limit, self.in_flight.bundle
        self.in_flight.shard_done(record.samples)
        if (self.in_flight.limit, self.in_flight.bundle) != shape:
            logger.info(
                "shards average %.1f samples: up to %d in flight per replica, %d per call",
                self.in_flight.samples_per_shard,
                self.in_flight.limit,
                self.in_flight.bundle,
            )
        if not self.policy.succeeded(shard.shard_id, time.monotonic() - task.started):
            logger.info(
                "%s: copy on replica-%d discarded; another attempt committed first",
                shard.shard_id,
                task.actor,
            )
            return
        # A twin still running is left to finish: its worker sees the done marker and discards its output.
        self.on_done(shard, record)


def _failure(e: RayActorError | RayTaskError) -> tuple[str, str]:
    if isinstance(e, RayTaskError):
        cause = e.as_instanceof_cause()
        if isinstance(cause, ShardError):
            return cause.reason, cause.detail
        if isinstance(cause, StorageError):
            return STORAGE_ERROR, str(cause).strip().splitlines()[-1]
        return "worker_error", str(cause).strip().splitlines()[-1]
    return "actor_died", str(e).strip().splitlines()[0][:300]
