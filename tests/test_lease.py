"""The run lease on OUT: one holder at a time, on a local disk and on S3 (moto); no Ray needed."""

import dataclasses
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from vqpipe import lease as lease_module
from vqpipe import storage
from vqpipe.errors import LeaseError
from vqpipe.lease import Lease, LeaseRecord, _pid_namespace, read_lease


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out"), None
    s3 = request.getfixturevalue("s3")
    return s3.url(f"lease-{tmp_path.name}/out"), s3.storage_options


def stale_record(run_id="old", host="elsewhere", pid=4242, namespace=None, age_s=1000.0, ttl_s=120.0):
    now = time.time()
    return LeaseRecord(run_id, host, pid, namespace, now - age_s, now - age_s, now - age_s + ttl_s)


def put_record(output, options, record):
    storage.write_bytes_atomic(storage.join(output, "_vqpipe", "lease.json"), record.to_bytes(), options)


def test_concurrent_start_lets_exactly_one_run_in(out):
    output, options = out
    runs = [Lease(output, options, ttl_s=30, run_id=f"run{i}") for i in range(6)]
    barrier = threading.Barrier(len(runs))
    outcome: dict[str, str] = {}

    def start(lease: Lease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            outcome[lease.run_id] = "held"
        except LeaseError as e:
            outcome[lease.run_id] = str(e)

    threads = [threading.Thread(target=start, args=(lease,)) for lease in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r, o in outcome.items() if o == "held"]
    assert len(winners) == 1, outcome
    for run_id, message in outcome.items():
        if run_id != winners[0]:  # every refusal names the holder, its host and pid
            assert f"run {winners[0]} on host {socket.gethostname()} (pid {os.getpid()})" in message
            assert "last heartbeat" in message and "--wait-for-lease" in message
    assert read_lease(output, options).run_id == winners[0]
    for lease in runs:
        lease.release()
    assert read_lease(output, options) is None


@pytest.mark.slow  # sleeps past the lease's TTL (~2.5 s of waiting)
def test_heartbeat_keeps_a_live_holder_and_a_waiter_gets_in_after_release(out):
    output, options = out
    holder = Lease(output, options, ttl_s=1.5, run_id="holder")
    holder.acquire()
    time.sleep(2.0)  # longer than the TTL: only the heartbeat keeps the lease live
    assert read_lease(output, options).heartbeat > time.time() - 1.5
    with pytest.raises(LeaseError, match="in use by run holder"):
        Lease(output, options, ttl_s=1.5, run_id="second").acquire(wait_s=0)
    threading.Timer(0.3, holder.release).start()
    waiter = Lease(output, options, ttl_s=1.5, run_id="waiter")
    t0 = time.monotonic()
    waiter.acquire(wait_s=10, poll_s=0.05)
    assert 0.2 < time.monotonic() - t0 < 5
    assert read_lease(output, options).run_id == "waiter"
    holder.check()  # released cleanly: not "lost"
    waiter.release()


def test_an_expired_holder_is_taken_over_and_notices_it_lost(out, caplog):
    output, options = out
    put_record(output, options, stale_record())
    with Lease(output, options, ttl_s=30, run_id="new") as lease:
        lease.acquire()
        assert read_lease(output, options).run_id == "new"
    assert "took over the lease" in caplog.text and "run old on host elsewhere (pid 4242)" in caplog.text

    # A holder stalled past its expiry (here: a TTL shorter than its heartbeat gap) must not renew over the
    # run that took over: it finds itself lost and check() stops it.
    stalled = Lease(output, options, ttl_s=0.4, run_id="stalled")
    stalled._stop.set()  # no heartbeat: it stalls
    stalled.acquire()
    time.sleep(0.5)
    taker = Lease(output, options, ttl_s=30, run_id="taker")
    taker.acquire()
    stalled.renew()
    with pytest.raises(LeaseError, match="lost its lease"):
        stalled.check()
    stalled.release()  # does not remove the new holder's lease
    assert read_lease(output, options).run_id == "taker"
    taker.release()


def test_a_holder_whose_lease_was_taken_stops_at_its_next_heartbeat(tmp_path):
    output = str(tmp_path / "out")
    lease = Lease(output, ttl_s=2.0, run_id="victim")
    lease.acquire()
    put_record(output, None, stale_record(run_id="intruder", age_s=0, ttl_s=60))  # e.g. a clock far off
    deadline = time.monotonic() + 5
    while lease.held and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(LeaseError, match="taken by run intruder"):
        lease.check()
    lease.release()
    assert read_lease(output).run_id == "intruder"


def test_a_live_holder_on_another_host_is_not_taken_over(tmp_path):
    output = str(tmp_path / "out")
    put_record(output, None, stale_record(host="other-node", age_s=5, ttl_s=120))
    with pytest.raises(LeaseError, match=r"run old on host other-node \(pid 4242\).*last heartbeat 5s ago"):
        Lease(output, ttl_s=120).acquire(wait_s=0.2, poll_s=0.05)


def test_a_lease_whose_write_landed_but_whose_answer_was_lost_is_ours(out):
    """A reset after the store applied our conditional create makes the client's retry fail its precondition:
    the record there is our own, so the run holds the lease instead of refusing itself."""
    output, options = out
    put_record(output, options, stale_record(run_id="me", host="other-node", age_s=1, ttl_s=120))
    lease = Lease(output, options, ttl_s=120, run_id="me")
    lease.acquire(wait_s=0)
    with lease:
        assert lease.held
        lease.renew()  # the adopted version is the current one: a conditional renewal goes through
        lease.check()
        assert read_lease(output, options).host == socket.gethostname()
    assert read_lease(output, options) is None


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    """A driver killed with SIGKILL on this host (its pid is gone) need not be waited for."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    output = str(tmp_path / "out")
    record = stale_record(host=socket.gethostname(), pid=proc.pid, namespace=_pid_namespace(), age_s=1)
    put_record(output, None, record)
    with Lease(output, ttl_s=120, run_id="next") as lease:
        lease.acquire()
        assert read_lease(output).run_id == "next"
    # ... but a live process with that record is (this test's own pid; a recent heartbeat: an old one is gone
    # whatever its process, see the next tests)
    put_record(
        output,
        None,
        stale_record(host=socket.gethostname(), pid=os.getpid(), namespace=_pid_namespace(), age_s=1),
    )
    with pytest.raises(LeaseError, match="in use by run old"):
        Lease(output, ttl_s=120).acquire()


def claimed(heartbeat_age_s: float, expires_in_s: float, **fields: object) -> LeaseRecord:
    """A record of another host's run, its times as a file could claim them."""
    now = time.time()
    record = LeaseRecord(
        "old", "elsewhere", 4242, None, now - 3600, now - heartbeat_age_s, now + expires_in_s
    )
    return dataclasses.replace(record, **fields)  # type: ignore[arg-type]


def test_a_lease_claiming_a_far_expiry_is_gone_once_its_heartbeat_is_older_than_our_ttl(out, caplog):
    """10 years ahead blocked OUT for 10 years: the reader judges the heartbeat by its own TTL instead."""
    output, options = out
    put_record(output, options, claimed(heartbeat_age_s=200, expires_in_s=10 * 365 * 86400))
    with Lease(output, options, ttl_s=120, run_id="new") as lease:
        lease.acquire()
        assert read_lease(output, options).run_id == "new"
    assert "heartbeat is older than this run's lease TTL (120s)" in caplog.text
    # A recent heartbeat is still honoured, whatever the expiry: that run may be alive.
    put_record(output, options, claimed(heartbeat_age_s=5, expires_in_s=10 * 365 * 86400))
    with pytest.raises(LeaseError, match="in use by run old"):
        Lease(output, options, ttl_s=120).acquire()


@pytest.mark.parametrize(
    "fields, problem",
    [
        ({"expires": math.nan}, "expires is nan, not a time"),
        ({"heartbeat": math.inf, "expires": math.inf}, "heartbeat is inf, not a time"),
        ({"started": -math.inf}, "started is -inf, not a time"),
        (
            {"heartbeat": time.time() + 10 * 365 * 86400, "expires": time.time() + 10 * 365 * 86400 + 120},
            r"its heartbeat is 3153\d+s ahead of this host's clock",
        ),
    ],
)
def test_a_lease_with_times_that_are_not_times_is_taken_over_naming_the_file(
    tmp_path, caplog, fields, problem
):
    """NaN blocked OUT for ever ("expired nans ago"): such a file is no lease."""
    output = str(tmp_path / "out")
    record = claimed(heartbeat_age_s=1, expires_in_s=60, **fields)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_vqpipe").mkdir(parents=True)
    (tmp_path / "out" / "_vqpipe" / "lease.json").write_bytes(
        record.to_bytes()
    )  # json writes NaN and Infinity
    with Lease(output, ttl_s=120, run_id="new") as lease:
        lease.acquire()
        assert read_lease(output).run_id == "new"
    assert re.search(
        f"{re.escape(str(tmp_path / 'out' / '_vqpipe' / 'lease.json'))}: not a valid lease, {problem}",
        caplog.text,
    )
    assert "nans ago" not in caplog.text


def test_a_dead_holder_whose_clock_ran_ahead_is_taken_over_by_a_waiter(tmp_path, caplog):
    """Its heartbeat lies in the future, so its age never passes the TTL in time: a reader that waits sees the
    file unchanged for longer than its TTL and takes it over. One that does not wait refuses, saying so."""
    output = str(tmp_path / "out")
    put_record(output, None, claimed(heartbeat_age_s=-300, expires_in_s=420))  # 5 minutes ahead, then died
    with pytest.raises(LeaseError, match=r"heartbeat 300s ahead of this host's clock.*--wait-for-lease"):
        Lease(output, ttl_s=0.5).acquire()
    started = time.monotonic()
    with Lease(output, ttl_s=0.5, run_id="new") as lease:
        lease.acquire(wait_s=30, poll_s=0.05)
        assert read_lease(output).run_id == "new"
    assert time.monotonic() - started < 5
    assert re.search(r"stayed unchanged for \d+s, longer than this run's lease TTL \(0.5s\)", caplog.text)


def test_a_holder_renews_often_enough_for_a_reader_with_a_shorter_ttl(tmp_path, monkeypatch):
    """Readers judge a heartbeat by their own TTL: a holder with a long TTL renews at least every
    MAX_HEARTBEAT_INTERVAL_S, or a reader with a short one would take a live lease for gone."""
    monkeypatch.setattr(lease_module, "MAX_HEARTBEAT_INTERVAL_S", 0.1)
    output = str(tmp_path / "out")
    with Lease(output, ttl_s=3600, run_id="long") as holder:
        holder.acquire()
        first = read_lease(output).heartbeat
        time.sleep(0.5)
        assert read_lease(output).heartbeat > first
        with pytest.raises(LeaseError, match="in use by run long"):
            Lease(output, ttl_s=0.4).acquire()


@pytest.mark.slow  # waits for a 4 s lease to expire
def test_a_second_run_refuses_without_touching_a_live_upload_then_cleans_up_after_a_dead_one(s3, caplog):
    """Night 2 starts while night 1 uploads a data file (a multipart upload, as any var256 shard over 16 MiB
    is): it must not abort that upload nor touch OUT. Once night 1's lease expires (it died), the next run
    takes over and only then removes what night 1 left unfinished."""
    from vqpipe.config import build_config
    from vqpipe.job import tokenize

    output, options = s3.url("night/out"), s3.storage_options
    s3.seed({"night/in/part-000000.tar": b"x"})
    night1 = Lease(output, options, ttl_s=4.0, run_id="night1")  # beats every second, even on a busy machine
    night1.acquire()
    upload = storage.atomic_write(
        f"{output}/data/part-000000-0123abcd.parquet", options, block_size=5 * 2**20
    )
    f = upload.__enter__()
    f.write(os.urandom(6 * 2**20))  # one part sent: the multipart upload is live
    client = s3.boto3_client()

    def live_uploads():
        return client.list_multipart_uploads(Bucket=s3.bucket, Prefix="night/out/").get("Uploads", [])

    assert len(live_uploads()) == 1
    cfg = build_config(
        {
            "inputs": [s3.url("night/in/*.tar")],
            "output": output,
            "model": {"preset": "tiny", "random_weights": True},
            "run": {"wait_for_lease_s": 0.3},
            "storage_options": options,
        }
    )
    with pytest.raises(LeaseError, match="in use by run night1"):
        tokenize(cfg)
    assert len(live_uploads()) == 1
    assert not storage.exists(f"{output}/_vqpipe/run.json", options)  # the refused run wrote nothing
    f.write(b"tail")
    upload.__exit__(None, None, None)  # night 1 finishes its upload: nothing was aborted under it
    assert storage.exists(f"{output}/data/part-000000-0123abcd.parquet", options)

    # Night 1 dies (no release, no heartbeat) in the middle of another upload.
    night1._stop.set()
    night1._thread.join()
    dying = storage.atomic_write(f"{output}/data/part-000001-4567cdef.parquet", options, block_size=5 * 2**20)
    dying.__enter__().write(os.urandom(6 * 2**20))
    time.sleep(max(0.0, night1.record.expires - time.time()) + 0.1)
    night3 = Lease(output, options, ttl_s=30)
    night3.acquire()
    assert "took over the lease" in caplog.text and "run night1" in caplog.text
    from vqpipe.ledger import Ledger

    Ledger(output, options).remove_temporaries()  # what a run does once it holds the lease
    assert live_uploads() == []
    night3.release()
    with caplog.at_level(logging.ERROR):  # night 1's writer, long dead, gives up (nothing committed)
        assert dying.__exit__(RuntimeError, RuntimeError("killed"), None) is False
    assert not storage.exists(f"{output}/data/part-000001-4567cdef.parquet", options)


def test_cli_exits_3_naming_the_holder(tmp_path, caplog):
    from vqpipe.cli import EXIT_BUSY, main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part-0.tar").write_bytes(b"x")
    out = str(tmp_path / "out")
    with Lease(out, ttl_s=30, run_id="nightly-1") as holder:
        holder.acquire()
        with storage.atomic_write(f"{out}/data/part-0-01234567.parquet") as f:  # the holder, mid-write
            f.write(b"rows")
            args = ["tokenize", str(tmp_path / "in"), "-o", out, "--model", "tiny", "--random-weights"]
            assert main([*args, "--wait-for-lease", "0.2"]) == EXIT_BUSY == 3
            f.write(b" more rows")  # its temporary file was left alone
    assert "is in use by run nightly-1 on host" in caplog.text
    assert (tmp_path / "out/data/part-0-01234567.parquet").read_bytes() == b"rows more rows"
    # the refused run wrote nothing (the holder's lease file, now released, was all of _vqpipe/)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_vqpipe", "data"]
    assert list((tmp_path / "out" / "_vqpipe").iterdir()) == []


def test_conditional_writes_on_a_store_without_them_are_checked_and_said_to_be_best_effort(caplog):
    url = f"memory://lease-{time.time_ns()}/out/_vqpipe/lease.json"
    v1 = storage.write_if(url, b"one", if_version=None)
    with pytest.raises(storage.WriteConflict, match="already exists"):
        storage.write_if(url, b"two", if_version=None)
    v2 = storage.write_if(url, b"two", if_version=v1)
    with pytest.raises(storage.WriteConflict, match="changed meanwhile"):
        storage.write_if(url, b"three", if_version=v1)
    with pytest.raises(storage.WriteConflict):
        storage.remove_if(url, if_version=v1)
    storage.remove_if(url, if_version=v2)
    assert storage.read_versioned(url) is None
    assert "memory:// has no conditional writes here: the run lease is best effort" in caplog.text or (
        "memory" in storage._warned_unconditional  # said once per process, maybe by an earlier test
    )


def test_the_holder_reports_its_replicas_live_and_pending_for_status(tmp_path, capsys):
    """`vqpipe status` shows a run's pending replicas (not placed yet) apart from the live ones; it reads
    them from the lease, which the driver renews with what it last reported."""
    from vqpipe.cli import main

    out = str(tmp_path / "out")
    with Lease(out, ttl_s=30, run_id="night") as lease:
        lease.acquire()
        assert read_lease(out).replicas_live is None  # nothing reported yet: nothing shown
        lease.report(live=1, pending=1)
        lease.renew()
        assert main(["status", out, "--json"]) == 1
        active = json.loads(capsys.readouterr().out)["active_run"]
        assert (active["replicas_live"], active["replicas_pending"]) == (1, 1)
        assert active["description"].endswith(", 1 replicas live, 1 pending")
    older = stale_record().to_bytes().replace(b'  "replicas_live": null,\n', b"")
    assert LeaseRecord.from_bytes(older).replicas_live is None  # written before the keys existed
