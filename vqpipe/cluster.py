"""Ray: joining the cluster, and the dispatch loop that hands shards to the encoder replicas (replicas.py) and
collects their outcomes: retries, speculation, progress. Ray is imported here and in replicas.py only.

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray import ObjectRef
from ray.exceptions import RayActorError, RayTaskError

from .config import JobConfig
from .dispatch_policy import DispatchPolicy, GiveUp, InFlight, Retry, Running, ShardQueue
from .errors import ShardError
from .plan import Shard
from .records import DoneRecord
from .replicas import ReplicaPool
from .stop import StopRequest

logger = logging.getLogger(__name__)

_WAIT_S = 1.0
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

    def __init__(
        self,
        config: JobConfig,
        model_sha256: str,
        on_done: Callable[[Shard, DoneRecord], None],
        on_failed: Callable[[Shard, dict[str, Any]], None],
        progress: Callable[[int], None],
        stop: StopRequest | None = None,
    ):
        self.config = config
        self.on_done, self.on_failed, self.progress = on_done, on_failed, progress
        self.stop = stop
        self.pool = ReplicaPool(config, model_sha256, self._stopping)
        self.last_actor: dict[str, int] = {}
        self.running: dict[ObjectRef[DoneRecord], _Task] = {}
        run = config.run
        self.policy = DispatchPolicy(run.max_attempts, run.retry_backoff_s, run.speculative)
        self.in_flight = InFlight(run.in_flight_per_replica, config.encode.batch_size)
        self.abandoned: list[str] = []  # shards still running when a stop's grace period ended

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self, shards: list[Shard]) -> None:
        try:
            self._loop(shards)
        finally:
            self.pool.kill_all()

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.requested

    def _loop(self, shards: list[Shard]) -> None:
        queue: ShardQueue[Shard] = ShardQueue(shards)
        self.pool.scale()
        last_scale = time.monotonic()
        while queue or self._waiting():
            if self.stop is not None and self.stop.requested:
                self._drain(queue, self.stop)
                return
            now = time.monotonic()
            if now - last_scale > _RESCALE_EVERY_S:
                self.pool.scale()
                last_scale = now
            self.pool.check_recovering()
            self._assign(queue, now)
            self._speculate(queue, now)
            self._wait(queue)
            self.progress(len(self.pool.in_service()))

    def _drain(self, queue: ShardQueue[Shard], stop: StopRequest) -> None:
        """After a stop request: start nothing, give running shards run.stop_grace_s to commit (a second signal
        ends the wait), and leave the rest pending: a rerun resumes them."""
        grace = self.config.run.stop_grace_s
        running = sorted({t.shard.shard_id for t in self.running.values()} - self.policy.committed)
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
        refs = [*self.running, *self.pool.recovering]
        if not refs:
            time.sleep(timeout)
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        for ref in ready:
            if ref in self.running:  # a recovering actor's answer is taken by pool.check_recovering
                self._collect(ref, queue)

    def _free_actor(self, avoid: int | None = None) -> int | None:
        load = dict.fromkeys(self.pool.in_service(), 0)
        for t in self.running.values():
            if t.actor in load:
                load[t.actor] += 1
        free = [i for i, n in load.items() if n < self.in_flight.limit]
        preferred = [i for i in free if i != avoid] or free
        return min(preferred, key=lambda i: load[i]) if preferred else None

    def _assign(self, queue: ShardQueue[Shard], now: float) -> None:
        while (shard := queue.peek(now)) is not None:
            actor = self._free_actor(avoid=self.last_actor.get(shard.shard_id))
            if actor is None:
                return
            queue.pop()
            self._submit(shard, actor)

    def _submit(self, shard: Shard, actor: int, speculative: bool = False) -> None:
        attempt = self.policy.next_attempt(shard.shard_id, speculative)
        ref = self.pool.actors[actor].process.remote(shard, attempt, self.in_flight.limit, speculative)
        self.running[ref] = _Task(shard, actor, time.monotonic(), attempt)
        self.last_actor[shard.shard_id] = actor

    def _speculate(self, queue: ShardQueue[Shard], now: float) -> None:
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

    def _collect(self, ref: ObjectRef[DoneRecord], queue: ShardQueue[Shard]) -> None:
        task = self.running.pop(ref)
        sid = task.shard.shard_id
        twin_running = any(t.shard.shard_id == sid for t in self.running.values())
        try:
            record = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            reason, detail = _failure(e)
            if isinstance(e, RayActorError) and self.pool.lost(task.actor):
                logger.warning("%s: replica-%d died (%s); retrying elsewhere", sid, task.actor, detail)
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
        self.in_flight.shard_done(record.samples)
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
