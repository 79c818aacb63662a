"""EncoderActor as a plain class (no Ray): one call carries a bundle of shards, each committing or failing on
its own. The Ray side (actors dying with a bundle, retries) is in test_cluster.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from faultproxy import fault_proxy
from shards import good_image_bytes, write_not_a_tar, write_shard

from vqpipe import storage
from vqpipe.config import build_config
from vqpipe.encode import build_encoder
from vqpipe.ledger import Ledger
from vqpipe.plan import Shard, make_plan
from vqpipe.replicas import EncoderActor, ShardOutcome


def run_bundle(
    shards: Path, out: Path, in_flight: int | None = None
) -> tuple[list[Shard], list[ShardOutcome], EncoderActor]:
    """Plan every tar in `shards` and hand them all to one EncoderActor (tiny preset, batches of 4) in one call."""
    cfg = build_config(
        {
            "inputs": [str(shards)],
            "output": str(out),
            "model": {"preset": "tiny", "random_weights": True, "device": "cpu"},
            "encode": {"batch_size": 4},
        }
    )
    todo = make_plan(storage.expand_inputs_with_info([str(shards)], None), Ledger(str(out)), None, False).todo
    actor = EncoderActor(cfg, build_encoder(cfg)[1], "replica-0", threads=1)
    try:
        return todo, actor.process(todo, [1] * len(todo), in_flight=in_flight), actor
    finally:
        if actor.worker is not None:
            actor.worker.close()


def test_a_bundle_commits_each_good_shard_and_fails_only_the_bad_one(tmp_path, one_torch_thread):
    shards = tmp_path / "shards"
    shards.mkdir()
    sizes = {"a": 2, "c": 3, "d": 1}
    for name, n in sizes.items():
        samples = [{"__key__": f"{name}{i}", "jpg": good_image_bytes(i)} for i in range(n)]
        write_shard(shards / f"{name}.tar", samples)
    write_not_a_tar(shards / "b.tar")
    out = tmp_path / "out"
    todo, outcomes, _ = run_bundle(shards, out, in_flight=4)
    ledger = Ledger(str(out))
    assert [s.url.rsplit("/", 1)[1] for s in todo] == ["a.tar", "b.tar", "c.tar", "d.tar"]

    assert [o.shard_id for o in outcomes] == [s.shard_id for s in todo]  # one outcome per shard, in order
    bad = outcomes[1]
    assert bad.record is None and bad.reason == "not_a_tar" and todo[1].shard_id in bad.detail
    assert (
        not ledger.is_done(todo[1].shard_id) and not (out / "data" / f"{todo[1].shard_id}.parquet").exists()
    )
    for shard, outcome, name in zip([todo[0], *todo[2:]], [outcomes[0], *outcomes[2:]], "acd", strict=True):
        assert outcome.record is not None and not outcome.reason
        assert outcome.record.samples == outcome.record.rows == sizes[name]
        marker = json.loads((out / "_vqpipe" / "done" / f"{shard.shard_id}.json").read_text())
        assert marker["samples"] == sizes[name]
        keys = pq.read_table(out / "data" / f"{shard.shard_id}.parquet").column("key").to_pylist()
        assert sorted(keys) == [f"{name}{i}" for i in range(sizes[name])]


def test_a_single_shard_is_run_on_the_calling_thread_and_its_failure_is_an_outcome(
    tmp_path, one_torch_thread
):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_not_a_tar(shards / "b.tar")
    _, [outcome], actor = run_bundle(shards, tmp_path / "out")
    assert outcome.record is None and outcome.reason == "not_a_tar"
    assert actor._bundle_pool is None  # no pool started for one shard


def _actor(shards: Path, out: str, storage_options: dict | None = None) -> tuple[list[Shard], EncoderActor]:
    cfg = build_config(
        {
            "inputs": [str(shards)],
            "output": out,
            "model": {"preset": "tiny", "random_weights": True, "device": "cpu"},
            "encode": {"batch_size": 4},
            "storage_options": storage_options or {},
        }
    )
    todo = make_plan(
        storage.expand_inputs_with_info([str(shards)], None), Ledger(out, storage_options), None, False
    )
    return todo.todo, EncoderActor(cfg, build_encoder(cfg)[1], "replica-0", threads=1)


def test_a_shard_the_store_fails_is_a_storage_error_in_one_line(tmp_path, one_torch_thread, caplog):
    """Not a `worker_error` with a traceback per attempt: the store failed, and the detail says how."""
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "a.tar", [{"__key__": "a0", "jpg": good_image_bytes(0)}])
    todo, actor = _actor(shards, str(tmp_path / "out"))
    (shards / "a.tar").unlink()  # gone between planning and reading
    [outcome] = actor.process(todo, [1])
    assert outcome.record is None and outcome.reason == "storage_error", outcome
    assert outcome.detail == f"{todo[0].shard_id}: {shards / 'a.tar'}: no such file"
    assert "Traceback" not in caplog.text and "storage error" in caplog.text


@pytest.mark.slow  # waits out the storage deadline
@pytest.mark.timeout(120)  # before the deadline, the data file's upload held its shard for ever
def test_a_data_upload_the_store_never_answers_fails_the_attempt_within_the_deadline(
    tmp_path, one_torch_thread, s3
):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "a.tar", [{"__key__": f"a{i}", "jpg": good_image_bytes(i)} for i in range(3)])
    with fault_proxy(s3.endpoint_url, rate=0.0) as proxy:
        options = {
            **s3.storage_options,
            "client_kwargs": {"endpoint_url": proxy.endpoint_url, "region_name": "us-east-1"},
            "vqpipe_deadline_s": 2,
        }
        todo, actor = _actor(shards, s3.url(f"{tmp_path.name}/out"), options)
        proxy.down, proxy.down_as, proxy.down_methods = True, "silent", ("PUT",)
        started = time.monotonic()
        [outcome] = actor.process(todo, [1])
        took = time.monotonic() - started
    print(f"silent data upload: {outcome.reason} after {took:.1f}s: {outcome.detail}")
    assert outcome.reason == "storage_error" and "timed out: no answer within 2s" in outcome.detail, outcome
    # the first PUT of a commit is the error file (the data file, the commit itself, comes after it)
    assert f"{todo[0].shard_id}.pq: cannot write" in outcome.detail
    assert proxy.stats.faults["silent"] >= 1 and took < 30, took
