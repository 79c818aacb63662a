"""How many encoder replicas a job runs and when it gives one up, without Ray: the pool (pool.py) asks this module
and carries out its answers, so each decision is testable in-process.

Auto (run.replicas = 0): as many replicas as the cluster's live nodes can host, each node counted on its own (a
replica lives on one node), within run.min_replicas / run.max_replicas; asked again while the job runs, so a node
that joins gets a replica and one that leaves takes its replica's place with it. run.replicas = N: exactly N.
Either way a replica that is not placed within run.placement_timeout_s is given up, and not asked for again
until the cluster's nodes change: it would only time out again. Live replicas are never given up.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

_EPS = 1e-6  # Ray keeps resources to 4 decimals: 1.0 / 0.1 must count as 10 replicas, not 9


@dataclass(frozen=True)
class Shape:
    """What one replica reserves on its node."""

    cpus: float
    gpus: float

    def describe(self) -> str:
        return f"{self.cpus:g} CPU + {self.gpus:g} GPU"


def hosts(nodes: Iterable[Mapping[str, float]], shape: Shape) -> int:
    """How many replicas of `shape` these nodes (their total or their free resources) hold at once."""
    total = 0
    for node in nodes:
        fits = [node.get(k, 0.0) / need for k, need in (("CPU", shape.cpus), ("GPU", shape.gpus)) if need > 0]
        total += int(min(fits) + _EPS) if fits else 0
    return total


def replica_cpus(nodes: Sequence[Mapping[str, float]], gpus_per_replica: float, replicas: int) -> int:
    """CPUs per replica when run.cpus_per_replica is not set. With GPUs: a GPU node's CPUs shared by the replicas
    its GPUs hold (the smallest such share in the cluster), so that decoding keeps each GPU fed. Without, for
    `replicas` = N: the cluster's CPUs shared by them, at most one node's worth; auto (0): the smallest node's
    CPUs, so that every node hosts a replica. 1 when nothing fits (e.g. GPU nodes that an autoscaler has not
    started yet: set run.cpus_per_replica there)."""
    if gpus_per_replica > 0:
        shares = [
            n.get("CPU", 0) * gpus_per_replica / n["GPU"]
            for n in nodes
            if n.get("GPU", 0) >= gpus_per_replica
        ]
    elif replicas:
        biggest = max((n.get("CPU", 0) for n in nodes), default=0)
        shares = [min(biggest, sum(n.get("CPU", 0) for n in nodes) / replicas)]
    else:
        shares = [n["CPU"] for n in nodes if n.get("CPU", 0) >= 1]
    return max(1, int(min(shares, default=1)))


class Phase(enum.Enum):
    REQUESTED = "requested"  # asked of Ray (or restarting after it died), not placed on a node yet
    LOADING = "loading"  # placed: its process answers; it is loading the model
    LIVE = "live"  # ready: the only phase that is given shards


@dataclass(frozen=True)
class Replica:
    index: int
    phase: Phase
    since: float  # when it entered this phase (monotonic seconds)


@dataclass(frozen=True)
class Drop:
    index: int
    why: str


@dataclass(frozen=True)
class Decision:
    start: int  # replicas to request
    drop: list[Drop]


class ReplicaScaler:
    """Decides, from the replicas and what the cluster can host, how many to start and which to give up."""

    def __init__(
        self, exactly: int, min_replicas: int | None, max_replicas: int | None, placement_timeout_s: float
    ) -> None:
        self.exactly, self.min_replicas, self.max_replicas = exactly, min_replicas or 1, max_replicas
        self.placement_timeout_s = placement_timeout_s
        self._held: tuple[int, int] | None = None  # (capacity when replicas were given up, how many)

    def wanted(self, capacity: int) -> int:
        """The replicas to run on a cluster that can host `capacity` of them."""
        if self.exactly:
            return self.exactly
        high = self.max_replicas if self.max_replicas is not None else capacity
        return max(self.min_replicas, min(capacity, high))

    @property
    def given_up(self) -> int:
        """Replicas given up for want of room and not asked for again (yet)."""
        return self._held[1] if self._held else 0

    def decide(self, replicas: list[Replica], capacity: int, now: float) -> Decision:
        """`capacity`: the replicas the live nodes can host in all. Requests not placed in time are given up;
        the count then follows the cluster: new requests up to the wanted count, or, when the cluster shrank,
        the replicas that do not serve yet given up (the unplaced first, newest first)."""
        timeout = self.placement_timeout_s
        expired = [r for r in replicas if r.phase is Phase.REQUESTED and now - r.since >= timeout]
        drops = [Drop(r.index, f"not placed in {timeout:.0f}s") for r in expired]
        held_at, held = self._held or (capacity, 0)
        if held_at != capacity:  # the cluster changed: ask again
            held = 0
        held += len(expired)
        self._held = (capacity, held) if held else None
        target = max(0, self.wanted(capacity) - held)
        left = [r for r in replicas if r not in expired]
        extra = len(left) - target
        if extra > 0:
            waiting = [r for r in left if r.phase is not Phase.LIVE]
            waiting.sort(key=lambda r: (r.phase is Phase.LOADING, -r.index))
            drops += [Drop(r.index, f"the cluster now hosts {capacity}") for r in waiting[:extra]]
        return Decision(start=max(0, target - len(left)), drop=drops)
