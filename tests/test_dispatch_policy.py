"""The dispatcher's retry, commit and speculation decisions, in-process (no Ray)."""

import random
import statistics

import pytest

from vqpipe import errors
from vqpipe.dispatch_policy import (
    MAX_IN_FLIGHT,
    DispatchPolicy,
    GiveUp,
    Ignore,
    InFlight,
    Retry,
    Running,
    RunningMedian,
    ShardQueue,
    failure_allowance,
    failure_kind,
    keep_failed,
)
from vqpipe.records import FailedRecord


def policy(**kw) -> DispatchPolicy:
    return DispatchPolicy(**{"max_attempts": 3, "retry_backoff_s": 2.0, **kw})


def finish(p: DispatchPolicy, *durations: float) -> None:
    """Commit other shards that took `durations` seconds."""
    for d in durations:
        sid = f"done-{len(p.committed)}"
        p.next_attempt(sid)
        assert p.succeeded(sid, d)


def test_running_median_matches_the_sorted_definition():
    rng = random.Random(0)
    m, seen = RunningMedian(), []
    assert m.value == 0.0
    for _ in range(500):
        x = rng.choice([rng.random(), rng.randint(0, 5)])  # ties included
        m.add(x)
        seen.append(x)
        assert m.value == sorted(seen)[len(seen) // 2]
    assert len(m) == 500
    assert abs(m.value - statistics.median(seen)) < 0.05


def test_a_committed_shard_still_running_elsewhere_is_never_copied_again():
    """Seen at the end of a 10-shard run: the shard committed on one replica while its first copy kept running;
    that copy then ran "alone" and slow, so every loop copied it again and the copy was discarded at once."""
    p = policy()
    finish(p, 1.0, 1.0, 1.0)  # median 1 s
    p.next_attempt("n-1")  # original on replica-0, started at t=0
    original = Running("n-1", actor=0, started=0.0)
    (copy,) = p.to_speculate([original], queue_empty=True, now=3.0)
    assert copy == original
    assert p.next_attempt("n-1", speculative=True) == 1  # a copy is not a retry
    assert p.succeeded("n-1", 0.5)  # the copy on replica-1 commits; the original still runs
    for now in (3.1, 3.2, 10.0, 100.0):
        assert p.to_speculate([original], queue_empty=True, now=now) == []
    assert not p.waiting_on([original])  # and the job does not wait for it
    assert not p.succeeded("n-1", 90.0)  # should it finish after all, it does not commit twice


def test_a_shard_gets_one_speculative_copy_at_most():
    p = policy()
    finish(p, 1.0, 1.0, 1.0)
    p.next_attempt("n-1")
    original = Running("n-1", 0, 0.0)
    assert p.to_speculate([original], True, now=5.0) == [original]
    p.next_attempt("n-1", speculative=True)
    copy = Running("n-1", 1, 5.0)
    assert p.to_speculate([original, copy], True, now=50.0) == []
    # The copy failed (its actor died); the original runs on, alone and slow: no second copy.
    assert p.failed("n-1", "actor_died", twin_running=True) == Ignore()
    assert p.to_speculate([original], True, now=60.0) == []
    assert p.waiting_on([original])


def test_speculation_waits_for_an_empty_queue_and_enough_history_and_picks_the_oldest_slow_shards():
    p = policy()
    running = [Running("a", 0, 4.0), Running("b", 1, 0.0), Running("c", 2, 9.5)]
    finish(p, 1.0, 1.0)
    assert p.to_speculate(running, True, now=10.0) == []  # two finished shards: "slow" means nothing yet
    finish(p, 1.0, 1.0, 3.0)  # median 1 s
    assert p.to_speculate(running, False, now=10.0) == []  # shards still queued: no copies
    assert p.to_speculate(running, True, now=10.0) == [running[1], running[0]]  # c ran only 0.5 s
    assert policy(speculative=False).to_speculate(running, True, now=10.0) == []


def test_failures_retry_with_exponential_backoff_then_give_up():
    p = policy()
    decisions = []
    for _ in range(3):
        p.next_attempt("bad")
        decisions.append(p.failed("bad", "truncated_tar", twin_running=False))
    assert decisions == [Retry(2.0), Retry(4.0), GiveUp(3)]


def test_a_failure_is_ignored_when_another_copy_committed_or_still_runs():
    p = policy()
    p.next_attempt("s")
    assert p.failed("s", "worker_error", twin_running=True) == Ignore()
    assert p.succeeded("s", 1.0)
    assert p.failed("s", "worker_error", twin_running=False) == Ignore()


def test_a_permanent_reason_is_not_retried():
    assert {"not_a_tar", "bad_tar"} <= errors.PERMANENT_SHARD_REASONS
    p = policy()
    p.next_attempt("s")
    assert p.failed("s", "not_a_tar", twin_running=False) == GiveUp(1)
    p.next_attempt("t")
    assert p.failed("t", "worker_error", twin_running=False) == Retry(2.0)


LOCAL = {"size": 1000, "mtime": 17.5}


def failed_before(reason, fingerprint=LOCAL, kind=None):
    return FailedRecord("s", "/in/s.tar", reason, "", 3, kind or failure_kind(reason), dict(fingerprint))


def test_an_input_that_failed_for_what_it_holds_and_is_unchanged_is_not_retried_by_the_next_run():
    """A truncated tar was retried 3 times on every nightly rerun and kept the job at exit 1 for ever."""
    for reason in ("truncated_tar", "not_a_tar", "bad_tar"):
        assert failure_kind(reason) == "input"
        assert keep_failed(failed_before(reason), dict(LOCAL))
        assert not keep_failed(failed_before(reason), dict(LOCAL), retry_failed=True)  # asked to
        assert not keep_failed(failed_before(reason), {**LOCAL, "size": 2000})  # a copy that grew
        assert not keep_failed(failed_before(reason), {**LOCAL, "mtime": 18.0})  # rewritten
    s3 = {"size": 10, "etag": '"abc"'}
    assert keep_failed(failed_before("bad_tar", s3), {"size": 10, "etag": '"abc"', "mtime": 3.0})
    assert not keep_failed(failed_before("bad_tar", s3), {"size": 10, "etag": '"abd"'})


@pytest.mark.parametrize("reason", ["worker_error", "actor_died", "input_changed", "too_many_errors"])
def test_any_other_failure_is_retried_by_the_next_run(reason):
    assert failure_kind(reason) == "transient"
    assert not keep_failed(failed_before(reason), dict(LOCAL))


def test_a_record_that_lacks_the_kind_or_the_inputs_version_is_retried():
    """Written by a vqpipe from before: nothing says the input is the one that failed."""
    assert not keep_failed(FailedRecord.from_json({"reason": "truncated_tar"}), dict(LOCAL))
    assert not keep_failed(failed_before("truncated_tar", fingerprint={}), dict(LOCAL))


def test_the_failure_allowance_is_the_smaller_of_the_limits_given():
    assert failure_allowance(100, None, None) == 0
    assert failure_allowance(100, 3, None) == 3
    assert failure_allowance(100, None, 0.05) == 5
    assert failure_allowance(99, None, 0.05) == 4  # rounded down: at most 5 % of the shards
    assert failure_allowance(100, 3, 0.05) == 3 and failure_allowance(20, 3, 0.05) == 1
    assert failure_allowance(10, None, 0.3) == 3  # 0.3 * 10 is 2.999... in floating point


@pytest.mark.parametrize("n", [10, 100_000])
def test_the_tail_loop_costs_the_same_however_many_shards_finished(n):
    """Issue 16: the median was a full sort on every loop of the tail. Now a read is O(1): count heap
    operations instead of timing (a timed test would be flaky on a shared 2-core machine)."""
    p = policy()
    for i in range(n):
        p.durations.add(float(i % 7))
    running = [Running("slow", 0, 0.0)]
    calls = 0
    real = RunningMedian.value.fget

    def counted(self):
        nonlocal calls
        calls += 1
        return real(self)

    try:
        RunningMedian.value = property(counted)
        for now in range(1000):
            p.to_speculate(running, True, now=float(now) / 1000)
    finally:
        RunningMedian.value = property(real)
    assert calls == 1000  # one O(1) read per loop, not a sort of n durations


def test_the_queue_serves_in_order_and_holds_retries_back_until_their_backoff_ends():
    q = ShardQueue(["a", "b"])
    q.retry_at("r2", not_before=20.0)
    q.retry_at("r1", not_before=10.0)
    assert len(q) == 4 and q.next_retry_in(now=0.0) == 10.0
    assert q.peek(now=0.0) == "a" and q.pop() == "a"
    assert q.peek(now=12.0) == "b"  # r1 is due now: it joins the back of the line
    assert q.pop() == "b" and q.peek(now=12.0) == "r1" and q.pop() == "r1"
    assert q.peek(now=19.0) is None and q.next_retry_in(now=19.0) == 1.0
    assert q.peek(now=25.0) == "r2" and q.pop() == "r2"
    assert len(q) == 0 and q.peek(now=99.0) is None and q.next_retry_in(now=99.0) is None


def test_small_shards_raise_the_shards_in_flight_to_two_batches_of_images():
    flight = InFlight(configured=2, batch_size=16)
    assert flight.limit == 2  # nothing known yet
    for _ in range(3):
        flight.shard_done(256)
    assert flight.limit == 2  # big shards: as configured
    small = InFlight(configured=2, batch_size=16)
    small.shard_done(2)
    small.shard_done(2)
    assert small.limit == 16  # 16 shards x 2 images = two batches
    tiny = InFlight(configured=2, batch_size=64)
    tiny.shard_done(0)  # e.g. a shard whose every sample is an error counts as one image
    assert tiny.limit == MAX_IN_FLIGHT


def test_small_shards_travel_in_bundles_of_about_one_batch():
    flight = InFlight(configured=2, batch_size=16)
    assert flight.bundle == 1  # nothing known yet: one shard per call
    flight.shard_done(256)
    assert (flight.limit, flight.bundle) == (2, 1)  # big shards: one per call
    small = InFlight(configured=2, batch_size=16)
    small.shard_done(2)
    assert (small.limit, small.bundle) == (16, 8)  # one batch per call, two calls in flight
    medium = InFlight(configured=2, batch_size=16)
    medium.shard_done(5)
    assert (medium.limit, medium.bundle) == (7, 3)  # 3 x 5 images: never more than a batch per call
    ones = InFlight(configured=2, batch_size=64)
    ones.shard_done(1)
    assert (ones.limit, ones.bundle) == (MAX_IN_FLIGHT, MAX_IN_FLIGHT // 2)  # half the limit at most
    configured = InFlight(configured=1, batch_size=16)
    configured.shard_done(16)
    assert configured.bundle == 1 and configured.samples_per_shard == 16
