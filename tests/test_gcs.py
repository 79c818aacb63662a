"""vqpipe.storage and a whole job on gs://: gcsfs against a GCS emulator on 127.0.0.1 (tests/gcsserver.py).

The same promises as on S3 (tests/test_storage.py, tests/test_s3_job.py): listings are paginated and fresh,
reads stream in range requests and survive a dropped connection, an aborted upload leaves no object (gcsfs
cancels the resumable upload session), a job commits every key exactly once, and no token leaks.
"""

from __future__ import annotations

import io
import json
import logging
import os
import traceback
import uuid
from typing import Any

import pytest
from faultproxy import fault_proxy

pytest.importorskip("gcsfs")
gcsserver = pytest.importorskip("gcsserver")  # needs gcp-storage-emulator (the test extra)

from vqpipe import storage  # noqa: E402
from vqpipe.errors import StorageError  # noqa: E402

MiB = 2**20
TOKEN = "ya29.TOKENCANARYvqpipe0000"


@pytest.fixture(scope="module")
def gcs() -> Any:
    with gcsserver.gcs_server() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


def with_token(options: dict[str, Any]) -> dict[str, Any]:
    """gcsfs options that authenticate with an OAuth access token (the canary), as a real deployment does."""
    from google.oauth2.credentials import Credentials

    return {**options, "token": Credentials(token=TOKEN)}


def test_gcs_expansion_is_one_listing_and_fresh(gcs: Any, prefix: str) -> None:
    gcs.seed({f"{prefix}/shards/part-{i:06d}.tar": b"tar" for i in range(12)})
    gcs.seed({f"{prefix}/shards/part-000000.json": b"{}", f"{prefix}/shards/sub/deep.tar": b"tar"})
    opts = gcs.storage_options
    start = len(gcs.requests)
    got = storage.expand_inputs_with_info([gcs.url(f"{prefix}/shards/part-{{000000..000011}}.tar")], opts)
    assert [u for u, _ in got] == [gcs.url(f"{prefix}/shards/part-{i:06d}.tar") for i in range(12)]
    assert len(gcs.requests) - start == 1, gcs.requests[start:]  # one listing, no per-object GET
    assert got[0][1]["size"] == 3 and got[0][1]["version"]  # the generation identifies the object version
    assert got[0][1] == storage.input_version(got[0][0], opts)

    want = [gcs.url(f"{prefix}/shards/part-{i:06d}.tar") for i in range(12)]
    assert storage.expand_inputs([gcs.url(f"{prefix}/shards/*.tar")], opts) == want
    assert storage.expand_inputs([gcs.url(f"{prefix}/shards")], opts) == want
    gcs.seed({f"{prefix}/shards/part-000012.tar": b"new"})  # written behind this process's back
    assert len(storage.expand_inputs([gcs.url(f"{prefix}/shards/*.tar")], opts)) == 13
    with pytest.raises(StorageError, match=r"2 of 15 expanded names do not exist, e\.g\. gs://"):
        storage.expand_inputs([gcs.url(f"{prefix}/shards/part-{{000000..000014}}.tar")], opts)
    with pytest.raises(StorageError, match="matches no files"):
        storage.expand_inputs([gcs.url(f"{prefix}/shards/*.parquet")], opts)


@pytest.mark.slow  # 5 MiB through a fault proxy, twice cut off
def test_gcs_reads_stream_and_survive_a_reset_mid_body(
    gcs: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage.reads, "READ_BLOCK_SIZE", 1 * MiB)
    data = os.urandom(5 * MiB)
    gcs.seed({f"{prefix}/x.tar": data})
    with fault_proxy(gcs.endpoint_url, flavor="gcs", rate=0.0) as proxy:
        opts = {**gcs.storage_options, "endpoint_url": proxy.endpoint_url}
        proxy.script = ["", "", "reset", "", "", "reset"]  # two block reads cut off half-way
        with storage.open_input(gcs.url(f"{prefix}/x.tar"), opts, backoff_s=0) as f:
            first = f.read(MiB)
            gets_after_first = sum(1 for m, _, _ in proxy.stats.log if m == "GET")
            rest = f.read()
    assert first + rest == data
    assert proxy.stats.faults["reset"] == 2
    assert gets_after_first <= 4  # metadata and a block or two (one cut off and fetched again), not all 5 MiB
    assert sum(1 for m, _, fault in proxy.stats.log if m == "GET" and not fault) >= 5  # block by block


@pytest.mark.slow  # waits out gcsfs's retry backoff (1-2 s) behind a fault proxy
@pytest.mark.parametrize("fault", ["slowdown", "internal"])
def test_gcs_transient_errors_are_retried_and_permanent_ones_not(gcs: Any, prefix: str, fault: str) -> None:
    gcs.seed({f"{prefix}/a.tar": b"abc"})
    with fault_proxy(gcs.endpoint_url, flavor="gcs", rate=0.0) as proxy:
        opts = {**gcs.storage_options, "endpoint_url": proxy.endpoint_url}
        proxy.script = [fault]  # gcsfs backs off 1-2 s before its first retry
        assert storage.read_bytes(gcs.url(f"{prefix}/a.tar"), opts) == b"abc"
        assert proxy.stats.faults[fault] == 1 and proxy.stats.requests == 2
        proxy.script = ["forbidden"]
        with pytest.raises(StorageError, match="Forbidden"):
            storage.read_bytes(gcs.url(f"{prefix}/a.tar"), opts)
        assert proxy.stats.requests == 3  # not retried
    with pytest.raises(StorageError, match="no such file"):
        storage.read_bytes(gcs.url(f"{prefix}/missing.tar"), gcs.storage_options)


def test_gcs_aborted_upload_leaves_no_object_and_no_session(gcs: Any, prefix: str) -> None:
    url = gcs.url(f"{prefix}/out/x.parquet")
    with (
        pytest.raises(RuntimeError, match="encoder died"),
        storage.atomic_write(url, gcs.storage_options, block_size=256 * 1024) as f,
    ):
        f.write(os.urandom(MiB))  # > block size: a resumable upload is open and chunks were sent
        assert gcs.resumable_sessions() == [f"{prefix}/out/x.parquet"]
        f.close()  # a writer closing its sink must not commit either
        raise RuntimeError("encoder died")
    assert gcs.keys(prefix) == set()
    assert gcs.resumable_sessions() == []  # cancelled: DELETE on the session URI
    assert [m for m, p in gcs.requests if "upload_id" in p][-1] == "DELETE"
    assert not storage.exists(url, gcs.storage_options)


def test_gcs_atomic_write_commits_on_exit(gcs: Any, prefix: str) -> None:
    data = os.urandom(MiB + 12345)
    url = gcs.url(f"{prefix}/out/big.parquet")
    with storage.atomic_write(url, gcs.storage_options, block_size=256 * 1024) as f:
        for i in range(0, len(data), 100_000):
            f.write(data[i : i + 100_000])
        assert gcs.keys(prefix) == set()  # nothing visible before the block exits
    assert storage.read_bytes(url, gcs.storage_options) == data
    storage.write_json_atomic(gcs.url(f"{prefix}/out/done/a.json"), {"ok": True}, gcs.storage_options)
    assert storage.read_json(gcs.url(f"{prefix}/out/done/a.json"), gcs.storage_options) == {"ok": True}
    assert storage.list_files(gcs.url(f"{prefix}/out"), ".parquet", gcs.storage_options) == ["big.parquet"]
    storage.remove(url, gcs.storage_options)
    storage.remove(url, gcs.storage_options)
    assert storage.list_files(gcs.url(f"{prefix}/out"), ".parquet", gcs.storage_options) == []
    assert gcs.resumable_sessions() == []


def test_gcs_token_never_appears_in_errors_or_public_options(
    gcs: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)  # every logger's warnings; vqpipe's debug lines too
    caplog.set_level(logging.DEBUG, logger="vqpipe")
    opts = with_token(gcs.storage_options)
    gcs.seed({f"{prefix}/a.tar": b"a"})
    start = len(gcs.authorizations)
    assert storage.read_bytes(gcs.url(f"{prefix}/a.tar"), opts) == b"a"
    assert f"Bearer {TOKEN}" in gcs.authorizations[start:]  # the token was really used
    failing = [
        lambda: storage.open_input(gcs.url(f"{prefix}/missing.tar"), opts),
        lambda: storage.read_bytes(gcs.url(f"{prefix}/missing.tar?access_token={TOKEN}"), opts),
        lambda: storage.expand_inputs([gcs.url(f"{prefix}/x-{{0..3}}.tar")], opts),
        lambda: storage.expand_inputs([f"gs://no-such-bucket-{prefix}/x.tar"], opts),
        lambda: storage.write_bytes_atomic(f"gs://no-such-bucket-{prefix}/x.json", b"{}", opts),
    ]
    for fn in failing:
        with pytest.raises(StorageError) as info:
            fn()
        text = "".join(traceback.format_exception(info.value))
        assert TOKEN not in text, text
    client_side = [r.getMessage() for r in caplog.records if not r.name.startswith("gcp_storage_emulator")]
    assert not [m for m in client_side if TOKEN in m]  # (the in-process emulator logs the bad URL)
    public = json.dumps(storage.public_storage_options({**opts, "token": TOKEN}))
    assert TOKEN not in public and gcs.endpoint_url in public


# ---------------------------------------------------------------------------------- whole job (Ray)


@pytest.mark.slow
def test_job_on_gcs_exactly_once_under_faults_without_leaking_the_token(
    ray_session: Any, gcs: Any, prefix: str, tmp_path: Any, caplog: Any
) -> None:
    import pyarrow.parquet as pq
    import torch
    from shards import defect_samples, write_shard

    from vqpipe.config import build_config
    from vqpipe.job import tokenize
    from vqpipe.model import build_model

    caplog.set_level(logging.INFO, logger="vqpipe")
    buf = io.BytesIO()
    torch.save(build_model("tiny", seed=7).state_dict(), buf)
    objects = {f"{prefix}/models/tiny.pth": buf.getvalue()}
    for i in range(2):
        samples, _ = defect_samples(i)
        write_shard(tmp_path / f"s{i}.tar", samples)
        objects[f"{prefix}/shards/part-{i:06d}.tar"] = (tmp_path / f"s{i}.tar").read_bytes()
    gcs.seed(objects)

    # gcsfs waits 1-2 s, then 2-3 s, ... before its retries: each injected failure costs about a second
    with fault_proxy(gcs.endpoint_url, flavor="gcs", rate=0.14, seed=5) as proxy:
        opts = with_token({**gcs.storage_options, "endpoint_url": proxy.endpoint_url})
        cfg = build_config(
            {
                "inputs": [gcs.url(f"{prefix}/shards/part-{{000000..000001}}.tar")],
                "output": gcs.url(f"{prefix}/out"),
                "model": {"preset": "tiny", "checkpoint": gcs.url(f"{prefix}/models/tiny.pth")},
                "encode": {"batch_size": 4},
                "run": {"max_error_rate": 0.6, "retry_backoff_s": 0.1, "progress_interval_s": 1},
                "storage_options": opts,
            }
        )
        summary = tokenize(cfg)
        stats = proxy.stats
    print(f"GCS job under faults: {stats.summary()}; {summary.status.rows} rows in {summary.seconds:.1f} s")
    assert summary.ok, summary.failed
    assert stats.failure_rate >= 0.10, stats.summary()

    out = gcs.keys(f"{prefix}/out/")
    ids = sorted(s.shard_id for s in summary.plan.all)
    assert [i.split("-")[:2] for i in ids] == [["part", f"{i:06d}"] for i in range(2)]
    assert {k for k in out if "/data/" in k} == {f"{prefix}/out/data/{s}.parquet" for s in ids}
    assert {k for k in out if "/done/" in k} == {f"{prefix}/out/_vqpipe/done/{s}.json" for s in ids}
    assert not [k for k in out if os.path.basename(k).startswith(storage.TMP_PREFIX)]
    assert gcs.resumable_sessions() == []
    rows = []
    for sid in ids:
        body = storage.read_bytes(gcs.url(f"{prefix}/out/data/{sid}.parquet"), gcs.storage_options)
        rows += pq.read_table(io.BytesIO(body), columns=["key"]).column("key").to_pylist()
    assert len(rows) == len(set(rows)) == summary.status.rows > 0
    for key in out:  # no token in anything vqpipe wrote, nor in any log line
        assert TOKEN.encode() not in storage.read_bytes(gcs.url(key), gcs.storage_options), key
    assert TOKEN not in caplog.text and caplog.text
    assert any(a == f"Bearer {TOKEN}" for a in gcs.authorizations)
