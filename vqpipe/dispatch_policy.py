"""The dispatcher's decisions, without Ray: the queue of waiting shards, which attempt a submission is, whether a failure is retried (and
after what backoff) or final, which finished copy commits a shard, and which running shards get a speculative
copy; across runs, which failed shards the next run leaves alone and how many failures still let a run pass.
cluster.py owns the actors and asks this module what to do; every decision is testable in-process.

Each event costs O(log N) at most: shard durations feed a running median (two heaps) instead of being sorted
on every loop of the tail, and retries in backoff wait in a heap instead of being scanned on every loop.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from . import errors
from .records import FailedRecord, FailureKind

T = TypeVar("T")

SPECULATE_AFTER = 2.0  # a running shard is slow when it has taken this many times the median shard time
SPECULATE_MIN_DONE = 3  # need a few finished shards before "slow" means anything


class RunningMedian:
    """The median of the values added so far: O(log n) to add, O(1) to read (a max-heap of the lower half and a
    min-heap of the upper half, kept within one element of each other)."""

    def __init__(self) -> None:
        self._low: list[float] = []  # negated: heapq is a min-heap
        self._high: list[float] = []

    def __len__(self) -> int:
        return len(self._low) + len(self._high)

    def add(self, x: float) -> None:
        if self._low and x > -self._low[0]:
            heapq.heappush(self._high, x)
        else:
            heapq.heappush(self._low, -x)
        if len(self._low) > len(self._high) + 1:
            heapq.heappush(self._high, -heapq.heappop(self._low))
        elif len(self._high) > len(self._low):
            heapq.heappush(self._low, -heapq.heappop(self._high))

    @property
    def value(self) -> float:
        """The upper median of an even count (as `sorted(xs)[len(xs) // 2]`); 0 when empty."""
        if not self:
            return 0.0
        if len(self._high) == len(self._low):
            return self._high[0]
        return -self._low[0]


class ShardQueue(Generic[T]):
    """Shards waiting to run: first come, first served, with retries held back until their backoff ends.
    O(log n) to add or release a retry, O(1) otherwise; the driver used to scan the whole queue on every loop
    for the next retry due."""

    def __init__(self, items: Iterable[T] = ()) -> None:
        self._ready: deque[T] = deque(items)
        self._later: list[tuple[float, int, T]] = []  # heap of (not_before, arrival, item)
        self._arrival = itertools.count()

    def __len__(self) -> int:
        return len(self._ready) + len(self._later)

    def retry_at(self, item: T, not_before: float) -> None:
        heapq.heappush(self._later, (not_before, next(self._arrival), item))

    def peek(self, now: float) -> T | None:
        """The next item that may run now (retries whose backoff ended join the back of the line), or None."""
        while self._later and self._later[0][0] <= now:
            self._ready.append(heapq.heappop(self._later)[2])
        return self._ready[0] if self._ready else None

    def pop(self) -> T:
        """Remove the item `peek` returned."""
        return self._ready.popleft()

    def next_retry_in(self, now: float) -> float | None:
        """Seconds until the next held-back retry may run (None when none is held back)."""
        return max(0.0, self._later[0][0] - now) if self._later else None


@dataclass(frozen=True)
class Retry:
    backoff_s: float


@dataclass(frozen=True)
class GiveUp:
    attempts: int


@dataclass(frozen=True)
class Ignore:
    """A failed copy of a shard that another copy committed, or that a still-running copy may commit."""


@dataclass(frozen=True)
class Running:
    """What the policy needs to know about one running copy of a shard."""

    shard_id: str
    actor: int
    started: float


@dataclass
class DispatchPolicy:
    max_attempts: int
    retry_backoff_s: float
    speculative: bool = True
    speculate_after: float = SPECULATE_AFTER
    speculate_min_done: int = SPECULATE_MIN_DONE
    attempts: dict[str, int] = field(default_factory=dict)
    committed: set[str] = field(default_factory=set)
    speculated: set[str] = field(default_factory=set)  # shards that already had their one speculative copy
    durations: RunningMedian = field(default_factory=RunningMedian)

    def next_attempt(self, shard_id: str, speculative: bool = False) -> int:
        """The attempt number of a new submission. A speculative copy shares the running attempt's number:
        it is not a retry."""
        attempt = self.attempts.get(shard_id, 0) + (0 if speculative else 1)
        self.attempts[shard_id] = max(attempt, 1)
        if speculative:
            self.speculated.add(shard_id)
        return self.attempts[shard_id]

    def succeeded(self, shard_id: str, seconds: float) -> bool:
        """True for the copy that commits the shard; False for a copy that finished after another one."""
        if shard_id in self.committed:
            return False
        self.committed.add(shard_id)
        self.durations.add(seconds)
        return True

    def failed(self, shard_id: str, reason: str, twin_running: bool) -> Retry | GiveUp | Ignore:
        if shard_id in self.committed or twin_running:
            return Ignore()
        attempts = self.attempts.get(shard_id, 1)
        if attempts >= self.max_attempts or reason in errors.PERMANENT_SHARD_REASONS:
            return GiveUp(attempts)
        return Retry(self.retry_backoff_s * 2 ** (attempts - 1))

    def to_speculate(self, running: list[Running], queue_empty: bool, now: float) -> list[Running]:
        """Running copies worth a speculative twin, oldest first: only once nothing waits in the queue, only
        shards that have not committed (a committed shard's copy that is still running finds the done marker
        and discards its output: copying it again would only be discarded again), that run alone, that had
        no copy yet, and that have taken `speculate_after` times the median shard time."""
        if not (self.speculative and queue_empty) or len(self.durations) < self.speculate_min_done:
            return []
        limit = self.speculate_after * self.durations.value
        copies: dict[str, int] = {}
        for r in running:
            copies[r.shard_id] = copies.get(r.shard_id, 0) + 1
        slow = [
            r
            for r in running
            if copies[r.shard_id] == 1
            and r.shard_id not in self.committed
            and r.shard_id not in self.speculated
            and now - r.started > limit
        ]
        return sorted(slow, key=lambda r: r.started)

    def waiting_on(self, running: list[Running]) -> bool:
        """True while a running copy may still commit a shard; losing copies are not waited for."""
        return any(r.shard_id not in self.committed for r in running)


def keep_failed(record: FailedRecord, fingerprint: Mapping[str, Any], retry_failed: bool = False) -> bool:
    """Whether a shard that failed in an earlier run stays failed without a retry: it failed for what its input
    holds (kind "input": not a tar, bad or truncated tar) and the input is the version that failed (its size,
    mtime or ETag as recorded). Retrying it would fail the same way, every night. A changed input, any other
    reason, and a record from before vqpipe kept the input's version are retried; so is all of it with
    `retry_failed` (e.g. after --allow-unterminated-tar)."""
    if retry_failed or record.kind != "input":
        return False
    before = record.fingerprint
    keys = [k for k in ("size", "etag", "mtime") if k in before and k in fingerprint]
    return bool(keys) and all(before[k] == fingerprint[k] for k in keys)


def failure_kind(reason: str) -> FailureKind:
    """The kind of a shard failure reason, as a failure record keeps it (records.FailureKind)."""
    return "input" if reason in errors.INPUT_SHARD_REASONS else "transient"


def failure_allowance(planned: int, max_shards: int | None, max_fraction: float | None) -> int:
    """How many failed shards still let a run exit 0: the smaller of the limits given (run.max_failed_shards,
    run.max_failed_fraction of the planned shards, rounded down); 0 when neither is given."""
    limits = [max_shards] if max_shards is not None else []
    if max_fraction is not None:
        limits.append(math.floor(max_fraction * planned + 1e-9))
    return min(limits, default=0)


MAX_IN_FLIGHT = 32  # shards one actor may hold at once when they are small


class InFlight:
    """How many shards each actor holds: run.in_flight_per_replica, raised while the shards seen so far are small
    so that an actor holds about two batches of images (its encoder loop batches across shards: 2-image shards
    with 2 in flight could only fill batches of 4), up to MAX_IN_FLIGHT. Small shards hold little memory.
    Small shards also travel in bundles (`bundle`), several per call."""

    def __init__(self, configured: int, batch_size: int) -> None:
        self.configured, self.batch_size = configured, batch_size
        self._samples, self._shards = 0, 0

    def shard_done(self, samples: int) -> None:
        self._samples += samples
        self._shards += 1

    @property
    def samples_per_shard(self) -> float | None:
        """The mean over the shards finished so far (at least 1: a shard costs as much as an image); None before
        the first."""
        return max(1.0, self._samples / self._shards) if self._shards else None

    @property
    def limit(self) -> int:
        per_shard = self.samples_per_shard
        if per_shard is None:
            return self.configured
        return max(self.configured, min(MAX_IN_FLIGHT, math.ceil(2 * self.batch_size / per_shard)))

    @property
    def bundle(self) -> int:
        """Shards per call on an actor: as many as make one batch, so that Ray's cost per call (scheduling,
        arguments, result) is paid per batch of images rather than per shard; 1 for shards of a batch or more,
        and until a shard has finished. Half the limit at most: a second bundle streams while one finishes."""
        per_shard = self.samples_per_shard
        if per_shard is None:
            return 1
        return max(1, min(self.limit // 2, int(self.batch_size // per_shard)))
