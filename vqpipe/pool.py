"""Ray: the job's encoder replicas, as many as replica_policy decides. A replica is requested (spread over the
nodes unless run.spread_replicas is off), placed once its process answers `ping`, and live once its model is
loaded (`setup`): only live replicas are given shards. One that dies is out of service until Ray has restarted
it and it answers again; one that stays unplaced is given up, with what it needs and what the cluster has free.
The processes of replicas that died with their node are killed where this driver can reach them, and every
replica is killed at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray import ObjectRef
from ray.exceptions import RayActorError, RayTaskError

from .config import CPU_ALLOCATOR_ENV, JobConfig
from .dispatch_policy import MAX_IN_FLIGHT
from .errors import CheckpointError
from .replica_policy import Drop, Phase, Replica, ReplicaScaler, Shape, hosts, replica_cpus
from .replicas import Placement, RemoteEncoderActor, kill_orphan

logger = logging.getLogger(__name__)

_WAITING_LOG_S = 30.0  # how often replicas that wait to be placed are reported


@dataclass
class _Member:
    # An EncoderActor handle. Ray types actor methods only when declared with @ray.method, so calls such as
    # `actor.process.remote(...)` are unchecked.
    actor: Any
    phase: Phase
    since: float  # monotonic seconds
    placement: Placement | None = None


class ReplicaPool:
    """The run's replicas by index (`replica-<index>`, never reused), each in its phase (replica_policy.Phase)."""

    def __init__(self, config: JobConfig, model_sha256: str):
        self.config, self.model_sha256 = config, model_sha256
        run = config.run
        self.scaler = ReplicaScaler(run.replicas, run.min_replicas, run.max_replicas, run.placement_timeout_s)
        self.members: dict[int, _Member] = {}
        self.shape: Shape | None = None  # decided from the cluster at the first scale, then kept
        self._calls: dict[
            ObjectRef[Any], tuple[int, str]
        ] = {}  # ping or setup call -> (replica, "ping"/"setup")
        self._next = 0
        self._capacity: int | None = None
        self._said_waiting = 0.0
        self._dead: list[
            tuple[int, Placement]
        ] = []  # processes of replicas that died: reaped if left running

    def live(self) -> list[int]:
        return [i for i, m in self.members.items() if m.phase is Phase.LIVE]

    def pending(self) -> int:
        """Replicas asked for that are not live: not placed yet, loading their model, or restarting."""
        return sum(m.phase is not Phase.LIVE for m in self.members.values())

    def actor(self, idx: int) -> Any:
        return self.members[idx].actor

    def calls(self) -> list[ObjectRef[Any]]:
        """The ping and setup calls not answered yet: the dispatcher waits on them with its shards."""
        return list(self._calls)

    def exhausted(self) -> str | None:
        """Why no replica is left (each was given up, unplaced) and none is asked for; None otherwise."""
        if self.members or not self.scaler.given_up or self.shape is None:
            return None
        return (
            f"no encoder replica could be placed in {self.config.run.placement_timeout_s:.0f}s: each needs "
            f"{self.shape.describe()}; the cluster has {_free()} free"
        )

    # -- following the cluster --------------------------------------------------------------------------------

    def scale(self, now: float) -> None:
        """Ask replica_policy how many replicas the cluster hosts now; request or give up replicas to match."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        shape = self.shape = self.shape or self._shape(nodes)
        capacity = hosts(nodes, shape)
        replicas = [Replica(i, m.phase, m.since) for i, m in self.members.items()]
        decision = self.scaler.decide(replicas, capacity, now)
        for drop in decision.drop:
            self._give_up(drop)
        wanted = self.scaler.wanted(capacity)
        if capacity != self._capacity and wanted > capacity:
            logger.warning(
                "%d replicas of %s wanted; the cluster can host %d now: the others wait to be placed (given "
                "up after %.0fs)",
                wanted,
                shape.describe(),
                capacity,
                self.config.run.placement_timeout_s,
            )
        self._capacity = capacity
        if decision.start:
            logger.info(
                "requesting %d replica(s) of %s (the cluster can host %d; %d live, %d pending)",
                decision.start,
                shape.describe(),
                capacity,
                len(self.live()),
                self.pending(),
            )
            for _ in range(decision.start):
                self._request(now)
        self._report_waiting(now)
        self._reap()

    def _shape(self, nodes: list[dict[str, float]]) -> Shape:
        run = self.config.run
        gpus = run.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if any(n.get("GPU", 0) for n in nodes) else 0.0
        if run.cpus_per_replica is not None:
            return Shape(run.cpus_per_replica, gpus)
        cpus = replica_cpus(nodes, gpus, run.replicas)
        logger.info("%d CPUs per replica (decode threads; set run.cpus_per_replica to choose)", cpus)
        return Shape(cpus, gpus)

    def _request(self, now: float) -> None:
        run, shape = self.config.run, self.shape
        assert shape is not None  # set by scale() before any request
        idx, self._next = self._next, self._next + 1
        options: dict[str, Any] = {
            "num_cpus": shape.cpus,
            "num_gpus": shape.gpus,
            "max_concurrency": max(run.in_flight_per_replica, MAX_IN_FLIGHT),
            "runtime_env": self._runtime_env(),
            "name": None,
        }
        if run.spread_replicas:  # Ray's default packs actors onto as few nodes as fit them
            options["scheduling_strategy"] = "SPREAD"
        threads = max(1, int(shape.cpus))
        actor = RemoteEncoderActor.options(**options).remote(
            self.config, self.model_sha256, f"replica-{idx}", threads
        )
        self.members[idx] = _Member(actor, Phase.REQUESTED, now)
        self._ask(idx)

    def _ask(self, idx: int) -> None:
        """Placed when its ping answers, live when its setup does (both queue until Ray has placed it)."""
        actor = self.members[idx].actor
        self._calls[actor.ping.remote()] = (idx, "ping")
        self._calls[actor.setup.remote()] = (idx, "setup")

    def _runtime_env(self) -> dict[str, Any] | None:
        """Environment of the actor process, set before it starts (glibc reads MALLOC_* once, at start)."""
        assert self.shape is not None
        cpu_only = self.shape.gpus == 0 or self.config.model.device == "cpu"
        if not (cpu_only and self.config.run.tune_cpu_allocator):
            return None
        return {"env_vars": CPU_ALLOCATOR_ENV}

    def _give_up(self, drop: Drop) -> None:
        member = self.members.pop(drop.index)
        for ref in [r for r, (i, _) in self._calls.items() if i == drop.index]:
            del self._calls[ref]
        ray.kill(member.actor)
        assert self.shape is not None
        logger.warning(
            "replica-%d given up: %s; it needs %s, the cluster has %s free (%d live)",
            drop.index,
            drop.why,
            self.shape.describe(),
            _free(),
            len(self.live()),
        )

    def _report_waiting(self, now: float) -> None:
        waiting = {i: now - m.since for i, m in self.members.items() if m.phase is Phase.REQUESTED}
        if not waiting or max(waiting.values()) < _WAITING_LOG_S or now - self._said_waiting < _WAITING_LOG_S:
            return
        self._said_waiting = now
        assert self.shape is not None
        logger.warning(
            "%s waiting up to %.0fs to be placed: each needs %s; the cluster has %s free (given up after %.0fs)",
            ", ".join(f"replica-{i}" for i in sorted(waiting)),
            max(waiting.values()),
            self.shape.describe(),
            _free(),
            self.config.run.placement_timeout_s,
        )

    # -- answers and deaths -----------------------------------------------------------------------------------

    def check(self, now: float) -> None:
        """Move on the replicas whose ping (placed) or setup (live) answered. A setup that fails on the checkpoint
        is fatal (CheckpointError); a replica that died while starting is asked again once Ray restarts it."""
        if not self._calls:
            return
        ready, _ = ray.wait(list(self._calls), num_returns=len(self._calls), timeout=0)
        for ref in sorted(
            ready, key=lambda r: self._calls[r][1] != "ping"
        ):  # where it runs, before it is live
            idx, which = self._calls.pop(ref)
            member = self.members.get(idx)
            if member is None:
                continue
            try:
                answer = ray.get(ref)
            except RayTaskError as e:
                cause = e.as_instanceof_cause()
                if isinstance(cause, CheckpointError | RuntimeError):
                    raise CheckpointError(str(cause).splitlines()[-1]) from None
                raise
            except RayActorError:
                if which == "setup":  # both calls fail with it: ask once; the placement clock keeps running
                    self._restarting(idx, member.since)
                continue
            if which == "ping":
                member.placement = answer
                if member.phase is Phase.REQUESTED:
                    member.phase, member.since = Phase.LOADING, now
                continue
            member.phase, member.since = Phase.LIVE, now
            where = member.placement
            node = f"{where.node_id[:12]} ({where.node_ip}), pid {where.pid}" if where else "?"
            logger.info("replica-%d started on node %s, %s (%d live)", idx, node, answer, len(self.live()))

    def lost(self, idx: int, now: float) -> bool:
        """Take live replica `idx`, which died, out of service until it answers after Ray restarted it; False
        when it is out already (several of its calls fail with it)."""
        member = self.members.get(idx)
        if member is None or member.phase is not Phase.LIVE:
            return False
        self._restarting(idx, now)
        self._reap()
        return True

    def _restarting(self, idx: int, since: float) -> None:
        member = self.members[idx]
        if member.placement is not None:
            self._dead.append((idx, member.placement))
        member.phase, member.since, member.placement = Phase.REQUESTED, since, None
        self._ask(idx)

    def _reap(self, final: bool = False) -> None:
        """Kill the processes of replicas that died with their node, where this host reaches them: when only a
        node's raylet dies, its workers live on (each also exits by itself once it notices: replicas.py). A
        replica whose node lives was killed or restarted by Ray itself; its node may yet be declared dead, so it
        is looked at again until the end (`final`)."""
        if not self._dead:
            return
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        keep = []
        for idx, p in self._dead:
            if p.node_id in alive and not final:
                keep.append((idx, p))
            # At the end the node may not be declared dead yet (its raylet died seconds ago): a process of a
            # replica that died, still running as the same process (kill_orphan checks its start time), is an
            # orphan either way (Ray kills the old process when it restarts an actor on a live node).
            elif kill_orphan(p):
                where = "dead node" if p.node_id not in alive else "node"
                logger.warning(
                    "replica-%d: killed its process %d, left running on %s %s",
                    idx,
                    p.pid,
                    where,
                    p.node_id[:12],
                )
        self._dead = keep

    def kill_all(self) -> None:
        """The actors hold GPUs; a shared or long-lived cluster gets them back as soon as the run is done. A
        process on a node that died unnoticed is reaped too."""
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for idx, member in self.members.items():  # on a node that died unnoticed
            if member.placement is not None and member.placement.node_id not in alive:
                self._dead.append((idx, member.placement))
        self._reap(final=True)  # and the replicas that died during the run: their processes may be orphans
        for member in self.members.values():
            ray.kill(member.actor)


def _free() -> dict[str, float]:
    return {k: v for k, v in sorted(ray.available_resources().items()) if k in ("CPU", "GPU")}
