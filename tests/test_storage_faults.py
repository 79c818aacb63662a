"""vqpipe.storage, and a whole job, against an S3 API that fails: moto behind tests/faultproxy.py on 127.0.0.1.

What is retried (throttling 503 SlowDown, 500 InternalError, connection resets, mid-body drops) succeeds
without a trace; what is permanent (403, 404, no such bucket) fails at once with a clear error; a job run
with more than 10 % of its requests failing commits every key exactly once; and a store that stays down
fails the job cleanly.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from faultproxy import FaultProxy, fault_proxy
from s3server import S3Server
from shards import defect_samples, write_shard

from vqpipe import storage
from vqpipe.errors import StorageError

MiB = 2**20
SECRET = "SECRETCANARYfaults5678"

# A small client-side retry budget for tests of a store that stays down: botocore's default (5 attempts,
# random exponential backoff) times s3fs's own 5 retries of SlowDown answers take ~45 s per call.
FAST_GIVE_UP = {"config_kwargs": {"retries": {"max_attempts": 2}}}


@pytest.fixture
def proxy(s3: S3Server) -> Any:
    with fault_proxy(s3.endpoint_url, rate=0.0, seed=11) as p:
        yield p


@pytest.fixture
def prefix() -> str:
    return f"f-{uuid.uuid4().hex[:8]}"


def via(s3: S3Server, proxy: FaultProxy, **extra: Any) -> dict[str, Any]:
    """s3fs options that reach moto through the proxy."""
    client = {"endpoint_url": proxy.endpoint_url, "region_name": "us-east-1"}
    return {**s3.storage_options, "client_kwargs": client, **extra}


def uploads(s3: S3Server, prefix: str) -> list[str]:
    listed = s3.boto3_client().list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix)
    return [u["Key"] for u in listed.get("Uploads", [])]


def data_keys(s3: S3Server, out: list[str]) -> list[str]:
    """Every row's key in the data files among the object keys `out` (duplicates kept, to be counted)."""
    client = s3.boto3_client()
    rows: list[str] = []
    for key in out:
        if "/out/data/" in key:
            body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
            rows += pq.read_table(io.BytesIO(body), columns=["key"]).column("key").to_pylist()
    return rows


def keys(s3: S3Server, prefix: str) -> list[str]:
    pages = s3.boto3_client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


# ---------------------------------------------------------------- which errors vqpipe itself retries


def _s3_error(code: str, status: int) -> BaseException:
    """What s3fs raises for an S3 error answer, once botocore and s3fs have given up retrying it."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return translate_boto_error(ClientError(response, "GetObject"))  # type: ignore[arg-type]


def _gcs_error(status: int) -> BaseException:
    gcsfs_retry = pytest.importorskip("gcsfs.retry")
    return gcsfs_retry.HttpError({"code": status, "message": "Please reduce your request rate."})


def _aiohttp_connect_error() -> BaseException:
    import types

    import aiohttp

    key = types.SimpleNamespace(host="127.0.0.1", port=9, ssl=None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connect call failed"))  # type: ignore[arg-type]


def _requests_error(name: str) -> BaseException:
    import requests.exceptions

    return getattr(requests.exceptions, name)("injected")


def _transient_cases() -> list[tuple[str, BaseException, bool]]:
    import http.client

    import aiohttp
    from botocore.exceptions import EndpointConnectionError

    return [
        # dropped connections and timeouts while a body streams: no client retries those for an open file
        ("connection reset", ConnectionResetError("reset by peer"), True),
        ("incomplete read", http.client.IncompleteRead(b"partial", 10), True),
        ("timeout", TimeoutError("read timed out"), True),
        ("aiohttp payload cut", aiohttp.ClientPayloadError("Response payload is not completed"), True),
        ("aiohttp disconnect", aiohttp.ServerDisconnectedError(), True),
        # answered by the store: botocore (5 attempts) and s3fs (5 rounds for SlowDown) already retried
        # these with backoff; another round here would multiply the wait on a store that is down
        ("503 SlowDown, after client retries", _s3_error("SlowDown", 503), False),
        ("500 InternalError, after client retries", _s3_error("InternalError", 500), False),
        ("connect failed, after client retries", EndpointConnectionError(endpoint_url="http://x"), False),
        # permanent
        ("403 AccessDenied", _s3_error("AccessDenied", 403), False),
        ("404 NoSuchKey", _s3_error("NoSuchKey", 404), False),
        ("NoSuchBucket", _s3_error("NoSuchBucket", 404), False),
        ("bad argument", ValueError("bad range"), False),
        # gcsfs: HTTP errors come back after its own 6 attempts (1, 2, 4, 8, 16 s backoff)
        ("GCS 503, after client retries", _gcs_error(503), False),
        ("GCS 403", OSError("Forbidden: b/o"), False),
        ("GCS connect failed, after client retries", _aiohttp_connect_error(), False),
        ("GCS 502, after client retries", _requests_error("ProxyError"), False),
        ("GCS read timed out", _requests_error("ReadTimeout"), True),
    ]


def test_transient_error_classification() -> None:
    got = {name: storage.retries._is_transient(e) for name, e, _ in _transient_cases()}
    assert got == {name: want for name, _, want in _transient_cases()}
    assert isinstance(_s3_error("AccessDenied", 403), PermissionError)
    assert isinstance(_s3_error("NoSuchBucket", 404), FileNotFoundError)


def _s3fs_timeout_bug() -> BaseException:
    """What s3fs 2026.9's `_fetch_range` raises for a body read that timed out: it reads `args[0]` of an
    OSError whose args are empty, and the IndexError carries the timeout as its context."""
    try:
        try:
            raise TimeoutError()
        except OSError as ex:
            ex.args[0]  # noqa: B018 - the bug, reproduced
    except IndexError as e:
        return e
    raise AssertionError("unreachable")


def test_storage_failures_are_classified_and_said_in_one_line() -> None:
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    from vqpipe.storage import Failure, classify
    from vqpipe.storage.failures import describe

    cases = {
        "read timeout": (ReadTimeoutError(endpoint_url="http://x/b/k"), Failure.TIMEOUT),
        "s3fs's IndexError over a timeout": (_s3fs_timeout_bug(), Failure.TIMEOUT),
        "reset": (ConnectionResetError(104, "Connection reset by peer"), Failure.CONNECTION),
        "connect failed": (EndpointConnectionError(endpoint_url="http://x"), Failure.CONNECTION),
        "aiohttp disconnect": (_aiohttp_disconnect(), Failure.CONNECTION),
        "503 SlowDown": (_s3_error("SlowDown", 503), Failure.THROTTLED),
        "500 InternalError": (_s3_error("InternalError", 500), Failure.UNAVAILABLE),
        "403 AccessDenied": (_s3_error("AccessDenied", 403), Failure.PERMISSION),
        "404 NoSuchKey": (_s3_error("NoSuchKey", 404), Failure.NOT_FOUND),
        "GCS 429": (_gcs_error(429), Failure.THROTTLED),
        "GCS 503": (_gcs_error(503), Failure.UNAVAILABLE),
        "bad argument": (ValueError("bad range"), Failure.OTHER),
    }
    assert {name: classify(e)[0] for name, (e, _) in cases.items()} == {n: k for n, (_, k) in cases.items()}
    for e, kind in cases.values():
        line = describe(e)
        assert "\n" not in line and (kind is Failure.OTHER or line.startswith(kind.value + ": ")), line
    assert describe(_s3fs_timeout_bug()) == "timed out: TimeoutError"
    assert describe(_s3_error("SlowDown", 503)).startswith("throttled by the store: ClientError: ")
    # ... and the storage error of such a call says it too (and retries it: a timeout is transient)
    calls = iter([_s3fs_timeout_bug(), _s3fs_timeout_bug()])

    def fn() -> None:
        raise next(calls)

    with pytest.raises(StorageError, match=r"^s3://b/k: cannot read \(timed out: TimeoutError\)$"):
        storage.retries._retrying("s3://b/k", "read", fn, attempts=2, backoff_s=0)


def _aiohttp_disconnect() -> BaseException:
    import aiohttp

    return aiohttp.ServerDisconnectedError()


def test_retrying_backs_off_on_transient_errors_and_gives_up_on_permanent_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(storage.retries.time, "sleep", sleeps.append)

    def failing(errors: list[BaseException]) -> Any:
        calls = {"n": 0}

        def fn() -> str:
            calls["n"] += 1
            if errors:
                raise errors.pop(0)
            return "ok"

        return fn, calls

    fn, calls = failing([ConnectionResetError("a"), TimeoutError("b")])
    assert storage.retries._retrying("s3://b/k", "read", fn, attempts=4, backoff_s=0.5) == "ok"
    assert calls["n"] == 3 and sleeps == [0.5, 1.0]  # doubling backoff

    for permanent in (_s3_error("AccessDenied", 403), ValueError("x"), _s3_error("SlowDown", 503)):
        fn, calls = failing([permanent])
        with pytest.raises(StorageError, match=r"^s3://b/k: cannot read \("):
            storage.retries._retrying("s3://b/k", "read", fn, attempts=4, backoff_s=0.5)
        assert calls["n"] == 1
    fn, calls = failing([_s3_error("NoSuchKey", 404)])
    with pytest.raises(FileNotFoundError):  # callers turn it into their own message ("no such file")
        storage.retries._retrying("s3://b/k", "read", fn, attempts=4, backoff_s=0.5)
    fn, calls = failing([ConnectionResetError(str(i)) for i in range(4)])
    with pytest.raises(StorageError, match="ConnectionResetError: 3"):
        storage.retries._retrying("s3://b/k", "read", fn, attempts=4, backoff_s=0.5)
    assert calls["n"] == 4


# ------------------------------------------------------------------------------ retried and not retried


def retried(proxy: FaultProxy, start: int) -> bool:
    """Every request that got a fault since log entry `start` was sent again and then answered."""
    log = proxy.stats.log[start:]
    failed = {(m, p) for m, p, fault in log if fault}
    answered = {(m, p) for m, p, fault in log if not fault}
    return bool(failed) and failed <= answered


@pytest.mark.slow  # waits out the client's retry backoff behind a fault proxy
@pytest.mark.parametrize("fault", ["slowdown", "internal", "reset"])
def test_transient_faults_are_retried(s3: S3Server, proxy: FaultProxy, prefix: str, fault: str) -> None:
    data = os.urandom(200_000)
    s3.seed({f"{prefix}/a.tar": data})
    opts = via(s3, proxy)

    proxy.script = [fault, fault]  # the next two requests fail, then they get through
    start = len(proxy.stats.log)
    assert storage.read_bytes(s3.url(f"{prefix}/a.tar"), opts) == data
    assert proxy.stats.faults[fault] == 2 and retried(proxy, start)

    proxy.script = [fault, fault]
    start = len(proxy.stats.log)
    storage.write_bytes_atomic(s3.url(f"{prefix}/out/b.json"), b"{}", opts)
    assert proxy.stats.faults[fault] == 4 and retried(proxy, start)
    assert keys(s3, f"{prefix}/out/") == [f"{prefix}/out/b.json"]

    proxy.script = [fault]
    start = len(proxy.stats.log)
    assert storage.list_files(s3.url(f"{prefix}/out"), ".json", opts) == ["b.json"]
    assert proxy.stats.faults[fault] == 5 and retried(proxy, start)


@pytest.mark.slow  # 4 MiB through a fault proxy, twice cut off
def test_a_mid_body_reset_on_a_streamed_shard_is_resumed(
    s3: S3Server, proxy: FaultProxy, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage.reads, "READ_BLOCK_SIZE", 1 * MiB)
    data = os.urandom(4 * MiB)
    s3.seed({f"{prefix}/x.tar": data})
    proxy.script = ["", "", "reset", "", "reset"]  # HEAD, first block, then two blocks cut off half-way
    with storage.open_input(s3.url(f"{prefix}/x.tar"), via(s3, proxy), backoff_s=0) as f:
        assert f.read() == data
    assert proxy.stats.faults["reset"] == 2


def test_permanent_errors_are_not_retried(s3: S3Server, proxy: FaultProxy, prefix: str) -> None:
    s3.seed({f"{prefix}/a.tar": b"a"})
    opts = via(s3, proxy)
    cases = [
        (["forbidden"], lambda: storage.read_bytes(s3.url(f"{prefix}/a.tar"), opts), "PermissionError"),
        (
            ["forbidden"],
            lambda: storage.input_version(s3.url(f"{prefix}/a.tar"), opts),
            "PermissionError",
        ),
        ([], lambda: storage.read_bytes(s3.url(f"{prefix}/missing.tar"), opts), "no such file"),
        ([], lambda: storage.expand_inputs([s3.url(f"{prefix}/{{a,b}}.tar")], opts), "1 of 2 expanded"),
        ([], lambda: storage.read_bytes(f"s3://no-such-bucket-{prefix}/a.tar", opts), "no such file"),
        (
            [],
            lambda: storage.write_bytes_atomic(f"s3://no-such-bucket-{prefix}/a.json", b"{}", opts),
            "cannot write",
        ),
    ]
    for script, fn, message in cases:
        proxy.script = list(script)
        start = len(proxy.stats.log)
        with pytest.raises(StorageError, match=message):
            fn()
        seen = Counter((method, path) for method, path, _ in proxy.stats.log[start:])
        assert seen and max(seen.values()) == 1, seen  # no request was sent twice


# ------------------------------------------------------------------------- atomic writes under faults


@pytest.mark.slow  # 44 MiB of multipart uploads through a fault proxy failing 30 % of requests
def test_multipart_writes_commit_or_vanish_under_faults(
    s3: S3Server, proxy: FaultProxy, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage.retries, "RETRY_BACKOFF_S", 0.0)
    proxy.rate = 0.3
    opts = via(s3, proxy)
    written = {}
    for i in range(2):
        data = os.urandom(11 * MiB)
        url = s3.url(f"{prefix}/out/part-{i}.parquet")
        with storage.atomic_write(url, opts, block_size=5 * MiB) as f:  # 3 parts: 5 + 5 + 1 MiB
            for j in range(0, len(data), MiB):
                f.write(data[j : j + MiB])
        written[f"{prefix}/out/part-{i}.parquet"] = data
        with (
            pytest.raises(RuntimeError, match="writer died"),
            storage.atomic_write(s3.url(f"{prefix}/out/dead-{i}.parquet"), opts, block_size=5 * MiB) as f,
        ):
            f.write(os.urandom(11 * MiB))  # two parts uploaded, then the writer fails
            raise RuntimeError("writer died")
    proxy.rate = 0.0
    print(f"multipart writes under faults: {proxy.stats.summary()}")
    client = s3.boto3_client()
    assert keys(s3, f"{prefix}/") == sorted(written)
    for key, data in written.items():
        assert client.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == data
    assert uploads(s3, prefix) == []  # every aborted upload was aborted, none left billed and invisible
    multipart_faults = [r for r in proxy.stats.log if r[2] and "upload" in r[1].lower()]
    assert proxy.stats.failure_rate >= 0.10 and multipart_faults, proxy.stats.summary()


# --------------------------------------------------------------------------------------- store down


@pytest.mark.slow  # the client's own retries (s3fs: 5 rounds) take ~3 s per call even with botocore at 2
@pytest.mark.parametrize("how", ["503 forever", "connection refused"])
def test_a_store_that_stays_down_fails_cleanly(
    s3: S3Server, proxy: FaultProxy, prefix: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage.retries, "RETRY_BACKOFF_S", 0.0)
    s3.seed({f"{prefix}/a.tar": b"a"})
    opts = via(s3, proxy, **FAST_GIVE_UP)
    if how == "503 forever":
        proxy.down = True
    else:
        opts["client_kwargs"] = {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"}
    url = s3.url(f"{prefix}/a.tar")
    for fn in (
        lambda: storage.expand_inputs([url], opts),
        lambda: storage.write_bytes_atomic(s3.url(f"{prefix}/out/x.json"), b"{}", opts),
    ):
        with pytest.raises(
            StorageError, match=r"Service Unavailable|reduce your request rate|connect"
        ) as info:
            fn()
        assert str(info.value).startswith(f"s3://{s3.bucket}/{prefix}/"), info.value
    assert keys(s3, f"{prefix}/out/") == [] and uploads(s3, prefix) == []


# ------------------------------------------------------------------------------ a store that never answers

DEADLINE_S = 3.0  # the calls that are answered must fit in it on a loaded machine
QUICK = {
    "vqpipe_deadline_s": DEADLINE_S,
    "config_kwargs": {"read_timeout": 1, "retries": {"max_attempts": 2}},
}


def _bounded(fn: Any, limit_s: float) -> tuple[StorageError, float]:
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        fn()
    return info.value, time.monotonic() - started


@pytest.mark.slow  # waits out a deadline per call
@pytest.mark.timeout(120)  # before the deadline existed these calls hung for ever
def test_a_store_that_reads_a_put_and_never_answers_fails_each_write_within_the_deadline(
    s3: S3Server, proxy: FaultProxy, prefix: str
) -> None:
    """s3fs sends PUTs with `Expect: 100-continue`; a store that reads the headers and never replies left
    `Lease.acquire` and data-file uploads waiting for ever (aiohttp's read timeout starts after the body)."""
    from vqpipe.lease import Lease

    opts = via(s3, proxy, **QUICK)
    out = s3.url(f"{prefix}/out")
    # The client is set up (botocore loads its models: seconds on a loaded machine) before the clock runs.
    assert (
        storage.read_versioned(storage.join(out, "_vqpipe", "lease.json"), {**opts, "vqpipe_deadline_s": 60})
        is None
    )
    proxy.down, proxy.down_as, proxy.down_methods = True, "silent", ("PUT",)
    writes = {
        "the lease": (
            storage.join(out, "_vqpipe", "lease.json"),
            lambda: Lease(out, opts, ttl_s=30).acquire(),
        ),
        "a data file": (
            s3.url(f"{prefix}/out/data/part-0.parquet"),
            lambda: storage.write_bytes_atomic(
                s3.url(f"{prefix}/out/data/part-0.parquet"), b"x" * 4096, opts
            ),
        ),
        "a multipart data file": (
            s3.url(f"{prefix}/out/data/part-1.parquet"),
            lambda: _multipart(s3, prefix, opts),
        ),
    }
    for what, (url, write) in writes.items():
        silent = proxy.stats.faults["silent"]
        error, took = _bounded(write, DEADLINE_S)
        print(f"silent store, {what}: {error} after {took:.1f}s")
        assert proxy.stats.faults["silent"] > silent, what  # the PUT did go out, and got no answer
        assert str(error).startswith(f"{url}: cannot write (timed out: no answer within 3s"), error
        assert took < DEADLINE_S + 5, (what, took)  # the deadline plus a read timeout at most
    proxy.down = False
    assert keys(s3, f"{prefix}/out/") == [] and uploads(s3, prefix) == []  # nothing half-written left


def _multipart(s3: S3Server, prefix: str, opts: dict[str, Any]) -> None:
    with storage.atomic_write(s3.url(f"{prefix}/out/data/part-1.parquet"), opts, block_size=5 * MiB) as f:
        f.write(os.urandom(6 * MiB))  # the first part's upload (a PUT) is what never gets an answer


@pytest.mark.slow  # waits out client timeouts and a deadline
@pytest.mark.timeout(120)
def test_a_read_that_stalls_mid_body_says_it_timed_out(s3: S3Server, proxy: FaultProxy, prefix: str) -> None:
    """A body that stops half-way: s3fs 2026.9 reported it as `IndexError: tuple index out of range` after
    ~4 minutes. Now: the deadline plus one read timeout, and the message says what happened."""
    data = os.urandom(2 * MiB)
    s3.seed({f"{prefix}/x.tar": data})
    url = s3.url(f"{prefix}/x.tar")
    with storage.open_input(url, via(s3, proxy, **QUICK)) as f:
        proxy.down, proxy.down_as = True, "stall"  # from the first range request on
        error, took = _bounded(f.read, DEADLINE_S)
    print(f"stalled body: {error} after {took:.1f}s")
    assert proxy.stats.faults["stall"] >= 1
    assert str(error).startswith(f"{url}: read failed at byte 0 (timed out: no answer within 3s"), error
    assert "IndexError" not in str(error)
    assert took < DEADLINE_S + 5, took


@pytest.mark.slow  # a `vqpipe tokenize` subprocess
@pytest.mark.timeout(180)
def test_a_driver_stalled_on_a_silent_store_exits_on_sigterm(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Any
) -> None:
    """SIGTERM (`timeout`'s, a pod's) used to be ignored while `Lease.acquire` waited on an unanswered PUT: the
    process needed SIGKILL. The deadline here is long on purpose: only the signal can end the wait soon."""
    samples, _ = defect_samples(0)
    write_shard(tmp_path / "shard.tar", samples)
    s3.seed({f"{prefix}/shards/part-000000.tar": (tmp_path / "shard.tar").read_bytes()})
    settings = {
        "inputs": [s3.url(f"{prefix}/shards/part-*.tar")],
        "output": s3.url(f"{prefix}/out"),
        "model": {"preset": "tiny", "random_weights": True},
        "storage_options": via(s3, proxy, vqpipe_deadline_s=600),
    }
    config = tmp_path / "job.yaml"  # YAML is a superset of JSON
    config.write_text(json.dumps(settings))
    proxy.down, proxy.down_as, proxy.down_methods = True, "silent", ("PUT",)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vqpipe.cli", "tokenize", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        waited = time.monotonic() + 90
        while proxy.stats.faults["silent"] == 0:  # the lease's PUT went out and hangs
            assert proc.poll() is None and time.monotonic() < waited, (
                proc.stderr.read() if proc.stderr else ""
            )
            time.sleep(0.05)
        time.sleep(0.5)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, log = proc.communicate(timeout=30)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"SIGTERM while the lease's PUT hung: exit {proc.returncode} after {took:.1f}s")
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert took < 10, took
    assert "SIGTERM: interrupted; rerun to resume" in log and "Traceback" not in log, log[-3000:]
    assert keys(s3, f"{prefix}/out/") == []


# ---------------------------------------------------------------------------------- whole job (Ray)


def _seed_job(s3: S3Server, prefix: str, tmp_path: Any, n: int = 3) -> None:
    buf = io.BytesIO()
    from vqpipe.model import build_model

    torch.save(build_model("tiny", seed=7).state_dict(), buf)
    objects = {f"{prefix}/models/tiny.pth": buf.getvalue()}
    for i in range(n):
        samples, _ = defect_samples(i)
        path = tmp_path / f"shard-{i}.tar"
        write_shard(path, samples)
        objects[f"{prefix}/shards/part-{i:06d}.tar"] = path.read_bytes()
    s3.seed(objects)


def _job_settings(s3: S3Server, prefix: str, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "inputs": [s3.url(f"{prefix}/shards/part-*.tar")],
        "output": s3.url(f"{prefix}/out"),
        "model": {"preset": "tiny", "checkpoint": s3.url(f"{prefix}/models/tiny.pth")},
        "encode": {"batch_size": 4},
        "run": {"max_error_rate": 0.6, "retry_backoff_s": 0.1, "progress_interval_s": 1, "max_attempts": 4},
        "storage_options": {**options, "secret": SECRET},
    }


@pytest.mark.slow
def test_job_completes_exactly_once_with_a_tenth_of_requests_failing(
    ray_session: Any, s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Any, caplog: Any
) -> None:
    from vqpipe.config import build_config
    from vqpipe.job import tokenize

    caplog.set_level(logging.INFO, logger="vqpipe")
    _seed_job(s3, prefix, tmp_path)
    proxy.rate = 0.2  # of which 6/7 fail (503, 500, reset) and 1/7 are only slow
    summary = tokenize(build_config(_job_settings(s3, prefix, via(s3, proxy))))
    stats = proxy.stats
    proxy.rate = 0.0
    print(f"S3 job under faults: {stats.summary()}; {summary.status.rows} rows in {summary.seconds:.1f} s")
    assert summary.ok, summary.failed
    assert stats.failure_rate >= 0.10 and stats.requests >= 50, stats.summary()

    out = keys(s3, f"{prefix}/out/")
    shard_ids = sorted(s.shard_id for s in summary.plan.all)
    assert [i.split("-")[:2] for i in shard_ids] == [["part", f"{i:06d}"] for i in range(3)]
    assert [k for k in out if "/out/data/" in k] == [f"{prefix}/out/data/{s}.parquet" for s in shard_ids]
    assert [k for k in out if "/out/_vqpipe/done/" in k] == [
        f"{prefix}/out/_vqpipe/done/{s}.json" for s in shard_ids
    ]
    assert not [k for k in out if os.path.basename(k).startswith(storage.TMP_PREFIX)]
    assert uploads(s3, prefix) == []
    client = s3.boto3_client()
    rows = data_keys(s3, out)
    assert len(rows) == len(set(rows)) == summary.status.rows > 0  # every key once, none twice
    run = client.get_object(Bucket=s3.bucket, Key=f"{prefix}/out/_vqpipe/run.json")["Body"].read()
    assert SECRET.encode() not in run and SECRET not in caplog.text


@pytest.mark.slow
def test_job_fails_cleanly_when_the_store_is_down(
    s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Any, capsys: Any, caplog: Any
) -> None:
    from vqpipe import cli

    _seed_job(s3, prefix, tmp_path, n=1)
    proxy.down = True
    config = tmp_path / "job.yaml"  # YAML is a superset of JSON
    settings = _job_settings(s3, prefix, via(s3, proxy, **FAST_GIVE_UP))
    config.write_text(json.dumps(settings))
    caplog.set_level(logging.ERROR, logger="vqpipe")
    vqpipe_logger = logging.getLogger("vqpipe")
    handlers, level = list(vqpipe_logger.handlers), vqpipe_logger.level
    try:
        code = cli.main(["tokenize", "--config", str(config)])
    finally:  # the CLI adds a stderr handler bound to this test's captured stderr: later tests must not use it
        vqpipe_logger.handlers[:] = handlers
        vqpipe_logger.setLevel(level)
    err = capsys.readouterr().err + caplog.text
    assert code != 0
    # One error line naming the store (its format is Ray's once an earlier test imported Ray in this process).
    assert "ERROR" in err and f" -- s3://{s3.bucket}/{prefix}/" in err, err
    assert "Service Unavailable" in err or "reduce your request rate" in err, err
    assert "Traceback" not in err and SECRET not in err
    assert keys(s3, f"{prefix}/out/") == [] and uploads(s3, prefix) == []
    assert proxy.stats.requests >= 2  # it did try, through the client's retries


@pytest.mark.slow
def test_store_going_down_mid_job_fails_it_and_a_rerun_completes_exactly_once(
    ray_session: Any, s3: S3Server, proxy: FaultProxy, prefix: str, tmp_path: Any
) -> None:
    from vqpipe.config import build_config
    from vqpipe.errors import VqpipeError
    from vqpipe.job import tokenize

    _seed_job(s3, prefix, tmp_path)
    settings = _job_settings(s3, prefix, via(s3, proxy, **FAST_GIVE_UP))
    settings["run"]["max_attempts"] = 2
    # The run cannot release its lease while the store is down, and the rerun comes from this same live
    # process: a short lease lets the rerun take it over once it expires (a new process would at once).
    settings["run"]["lease_ttl_s"] = 8
    settings["run"]["wait_for_lease_s"] = 30
    proxy.down_after = 30  # past the model, the run record and the plan: while shards are being written
    try:
        summary = tokenize(build_config(settings))
    except VqpipeError as e:  # the driver could not even record the failure
        print(f"store down mid-job: the job raised {e}")
        assert f"s3://{s3.bucket}/{prefix}/" in str(e), e
    else:
        print(f"store down mid-job: failed shards {summary.failed}")
        assert not summary.ok and summary.failed, summary
    assert proxy.stats.requests > 30 and proxy.stats.faults["slowdown"] > 0
    out = keys(s3, f"{prefix}/out/")
    done = {os.path.basename(k)[: -len(".json")] for k in out if "/out/_vqpipe/done/" in k}
    data = {os.path.basename(k)[: -len(".parquet")] for k in out if "/out/data/" in k}
    assert done <= data and len(done) < 3, out  # a done marker only ever follows its data
    print(f"committed before the outage: {sorted(done)}; unfinished uploads: {uploads(s3, prefix)}")

    proxy.down_after, proxy.down = None, False  # the store is back: the rerun finishes the job
    summary = tokenize(build_config(settings))
    assert summary.ok, summary.failed
    out = keys(s3, f"{prefix}/out/")
    assert len([k for k in out if "/out/_vqpipe/done/" in k]) == 3
    assert not [k for k in out if os.path.basename(k).startswith(storage.TMP_PREFIX)]
    assert uploads(s3, prefix) == []  # uploads the outage kept from being aborted are cleaned up
    rows = data_keys(s3, out)
    assert len(rows) == len(set(rows)) == summary.status.rows > 0
