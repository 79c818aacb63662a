"""What one committed shard costs on a real S3 API (moto on 127.0.0.1): its input read (a HEAD and GETs),
then at most 5 requests: the input's HEAD after reading, the done marker's HEAD before the commit, and the
PUTs of data, errors and marker. No listing, no DELETE. In-process worker, no Ray."""

import pytest
from shards import good_image_bytes, write_shard

from vqpipe import storage
from vqpipe.config import build_config
from vqpipe.plan import Shard, shard_id
from vqpipe.worker import ShardWorker


@pytest.fixture(scope="module")
def s3_worker(s3, tmp_path_factory, one_torch_thread):
    tmp = tmp_path_factory.mktemp("requests")
    data = {}
    for i in range(2):
        samples = [{"__key__": f"k{j}", "jpg": good_image_bytes(10 * i + j), "cls": str(j)} for j in range(3)]
        write_shard(tmp / f"{i}.tar", samples)
        data[f"requests/in/part-{i}.tar"] = (tmp / f"{i}.tar").read_bytes()
    s3.seed(data)
    cfg = build_config(
        {
            "inputs": [s3.url("requests/in/*.tar")],
            "output": s3.url("requests/out"),
            "model": {"preset": "tiny", "random_weights": True},
            "encode": {"batch_size": 4},
            "storage_options": s3.storage_options,
        }
    )
    worker = ShardWorker.from_config(cfg, cpus=1)
    yield worker
    worker.close()


def requests_of(s3, fn):
    start = len(s3.requests)
    result = fn()
    return result, s3.requests[start:]


def test_a_committed_shard_costs_its_input_read_and_five_requests(s3, s3_worker, monkeypatch):
    # A shard running past 2 s also looks for a twin's commit (a HEAD at 2, 6, 14, 30 s, ... of its run):
    # a loaded test machine must not make this shard one of those.
    monkeypatch.setattr("vqpipe.worker._SUPERSEDED_CHECK_S", 3600.0)
    url = s3.url("requests/in/part-0.tar")
    record, cost = requests_of(s3, lambda: s3_worker.process(Shard(shard_id(url), url, {})))
    assert record.rows == 3 and not record.skipped
    on_input = [m for m, p in cost if "/requests/in/" in p]
    rest = sorted(
        (m, p.split("/requests/out/")[1].removeprefix("_vqpipe/").split("/")[0])
        for m, p in cost
        if "/requests/in/" not in p
    )
    assert on_input.count("HEAD") == 2 and set(on_input) == {"HEAD", "GET"}, cost  # open, and after reading
    # a look for a twin's commit (its data file), the error file, the data file (the commit), the done marker
    assert rest == [("HEAD", "data"), ("PUT", "data"), ("PUT", "done"), ("PUT", "errors")], cost
    # the version read is the one the open saw: equal to a fresh stat's fingerprint
    assert record.input.fingerprint == storage.input_version(url, s3.storage_options)


def test_a_retry_looks_for_an_earlier_commit_with_one_head(s3, s3_worker):
    url = s3.url("requests/in/part-1.tar")
    first = s3_worker.process(Shard(shard_id(url), url, {}))
    again, cost = requests_of(s3, lambda: s3_worker.process(Shard(shard_id(url), url, {}), attempt=2))
    assert again.skipped and again.rows == first.rows
    # the marker's HEAD (no listing after it), then its read (s3fs: HEAD + GET)
    assert len(cost) <= 3 and {m for m, _ in cost} == {"HEAD", "GET"}, cost
    assert all("/done/" in p and "list-type" not in p for _, p in cost), cost
    assert not storage.file_exists(s3.url("requests/out/done/nothing.json"), s3.storage_options)
