"""The job against a real S3 API on 127.0.0.1 (moto's server, through s3fs): shards, checkpoint and output on
s3://, a failure injected mid-upload, incremental reruns, changed inputs, and no credential anywhere."""

import io
import json
import logging

import pyarrow.parquet as pq
import pytest
import torch
from shards import defect_samples
from shards import write_shard as write_local_shard

from vqpipe.config import build_config
from vqpipe.errors import ShardError
from vqpipe.job import tokenize
from vqpipe.model import build_model
from vqpipe.plan import Shard, shard_id
from vqpipe.worker import ShardWorker

pytestmark = pytest.mark.slow

SECRET = "SECRETCANARYvqpipe1234"
KEY_ID = "AKIAVQPIPECANARY0001"


def shard_bytes(seed, tmp_path):
    samples, _ = defect_samples(seed)
    path = tmp_path / f"shard-{seed}.tar"
    write_local_shard(path, samples)
    return path.read_bytes()


@pytest.fixture
def bucket(s3, tmp_path, request):
    """A prefix of its own in the session's bucket, holding three shards and a tiny checkpoint."""
    prefix = request.node.name.replace("[", "-").replace("]", "")
    buf = io.BytesIO()
    torch.save(build_model("tiny", seed=7).state_dict(), buf)
    s3.seed(
        {f"{prefix}/shards/part-{i:06d}.tar": shard_bytes(i, tmp_path) for i in range(3)}
        | {f"{prefix}/models/tiny.pth": buf.getvalue()}
    )
    return prefix


def s3_config(s3, prefix, pattern="part-*.tar", **run):
    options = {**s3.storage_options, "key": KEY_ID, "secret": SECRET}  # moto accepts any credentials
    return build_config(
        {
            "inputs": [s3.url(f"{prefix}/shards/{pattern}")],
            "output": s3.url(f"{prefix}/out"),
            "model": {"preset": "tiny", "checkpoint": s3.url(f"{prefix}/models/tiny.pth")},
            "encode": {"batch_size": 4},
            "run": {"max_error_rate": 0.6, "retry_backoff_s": 0.1, "progress_interval_s": 1, **run},
            "storage_options": options,
        }
    )


def sid(s3, prefix, i):
    """The shard id of input part-<i>.tar under the test's prefix."""
    return shard_id(s3.url(f"{prefix}/shards/part-{i:06d}.tar"))


def objects(s3, prefix):
    client = s3.boto3_client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=f"{prefix}/")
    return {o["Key"][len(prefix) + 1 :]: o for page in pages for o in page.get("Contents", [])}


def read_keys(s3, prefix):
    client = s3.boto3_client()
    keys = []
    for name in objects(s3, prefix):
        if name.startswith("out/data/"):
            body = client.get_object(Bucket=s3.bucket, Key=f"{prefix}/{name}")["Body"].read()
            keys += pq.read_table(io.BytesIO(body), columns=["key"]).column("key").to_pylist()
    return keys


def test_shards_checkpoint_and_output_on_s3_exactly_once_without_leaking_credentials(
    ray_session, s3, bucket, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG, logger="vqpipe")
    summary = tokenize(s3_config(s3, bucket))
    assert summary.ok, summary.failed
    names = objects(s3, bucket)
    assert {n for n in names if n.startswith("out/data/")} == {
        f"out/data/{sid(s3, bucket, i)}.parquet" for i in range(3)
    }
    assert {n for n in names if n.startswith("out/_vqpipe/done/")} == {
        f"out/_vqpipe/done/{sid(s3, bucket, i)}.json" for i in range(3)
    }
    assert "out/_vqpipe/lease.json" not in names  # released at the end
    keys = read_keys(s3, bucket)
    assert len(keys) == len(set(keys)) == summary.status.rows
    client = s3.boto3_client()
    run = json.loads(client.get_object(Bucket=s3.bucket, Key=f"{bucket}/out/_vqpipe/run.json")["Body"].read())
    assert len(run["output_settings"]["model_sha256"]) == 64
    for name in names:  # no credential in any object vqpipe wrote, nor in any log line
        if name.startswith("out/"):
            body = client.get_object(Bucket=s3.bucket, Key=f"{bucket}/{name}")["Body"].read()
            assert SECRET.encode() not in body and KEY_ID.encode() not in body, name
    assert SECRET not in caplog.text and KEY_ID not in caplog.text
    assert caplog.text  # the check above ran over real log output


class FailingEncoder:
    """The real encoder, with a failure injected on its n-th call (after earlier batches reached the writer)."""

    def __init__(self, real, fail_on_call):
        self.real, self.fail_on_call, self.calls = real, fail_on_call, 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, pixels, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("injected failure after two batches were written")
        return self.real(pixels, **kwargs)


def test_failure_mid_write_leaves_nothing_and_rerun_completes(ray_session, s3, bucket):
    cfg = s3_config(s3, bucket)
    worker = ShardWorker.from_config(cfg)
    worker.encoder = FailingEncoder(worker.encoder, fail_on_call=3)
    shard = Shard("part-000000", s3.url(f"{bucket}/shards/part-000000.tar"), {})
    with pytest.raises(ShardError, match="injected") as failed:  # the batch's failure fails its shard
        worker.process(shard)
    worker.close()
    assert failed.value.reason == "worker_error" and isinstance(failed.value.__cause__, RuntimeError)
    assert worker.encoder.calls == 3
    assert not [n for n in objects(s3, bucket) if n.startswith("out/")]
    uploads = s3.boto3_client().list_multipart_uploads(Bucket=s3.bucket, Prefix=f"{bucket}/out/")
    assert not uploads.get("Uploads")

    summary = tokenize(cfg)
    assert summary.ok
    keys = read_keys(s3, bucket)
    assert len(keys) == len(set(keys)) == summary.status.rows


def test_rerun_processes_only_new_shards_and_reports_changed_ones(ray_session, s3, bucket, tmp_path, caplog):
    assert tokenize(s3_config(s3, bucket)).ok
    before = {n: o["ETag"] for n, o in objects(s3, bucket).items() if n.startswith("out/")}

    s3.seed({f"{bucket}/shards/part-000003.tar": shard_bytes(3, tmp_path)})  # a new shard arrives
    again = tokenize(s3_config(s3, bucket))
    assert again.ok
    assert [s.shard_id for s in again.plan.todo] == [sid(s3, bucket, 3)]
    after = {n: o["ETag"] for n, o in objects(s3, bucket).items() if n.startswith("out/")}
    untouched = {n for n in before if n.startswith(("out/data/", "out/_vqpipe/errors/", "out/_vqpipe/done/"))}
    assert {n: after[n] for n in untouched} == {n: before[n] for n in untouched}
    assert f"out/data/{sid(s3, bucket, 3)}.parquet" in after

    s3.seed({f"{bucket}/shards/part-000001.tar": shard_bytes(11, tmp_path)})  # an input is rewritten
    caplog.set_level(logging.WARNING, logger="vqpipe")
    reported = tokenize(s3_config(s3, bucket))
    assert reported.ok and not reported.plan.todo
    assert [s.shard_id for s in reported.plan.changed] == [sid(s3, bucket, 1)]
    assert f"{sid(s3, bucket, 1)}: input changed" in caplog.text
    redone = tokenize(s3_config(s3, bucket, reprocess_changed=True))
    assert [s.shard_id for s in redone.plan.todo] == [sid(s3, bucket, 1)]
    keys = read_keys(s3, bucket)
    assert len(keys) == len(set(keys)) == redone.status.rows
    assert any(k.startswith("000011_") for k in keys)  # the new content, not the old
