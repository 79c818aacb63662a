"""Batches across shards (vqpipe.batcher) and the replica's per-shard guarantees with several shards in flight:
rows, errors and commits stay per shard, a failing or superseded shard leaves the others' rows untouched, and
small shards encoded together give the codes of one big shard of the same images. In-process, tiny model."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest
from shards import corrupt_jpeg_bytes, good_image_bytes, write_shard, write_truncated_tar

from vqpipe import storage
from vqpipe import worker as worker_module
from vqpipe.batcher import Decoded, EncodedBatch, EncoderLoop
from vqpipe.config import build_config
from vqpipe.errors import ShardError, StorageError
from vqpipe.plan import Shard
from vqpipe.records import DoneRecord
from vqpipe.worker import ShardWorker

BATCH = 4


def _images(n: int, start: int = 0) -> list[dict]:
    return [
        {"__key__": f"k{start + i:03d}", "jpg": good_image_bytes(start + i), "cls": str(i)} for i in range(n)
    ]


def _worker(out, views: str = "center", precision: str = "exact", **run) -> ShardWorker:
    cfg = build_config(
        {
            "inputs": [str(out)],
            "output": str(out),
            "model": {"preset": "tiny", "random_weights": True, "device": "cpu", "precision": precision},
            "encode": {"batch_size": BATCH, "var_input": True, "views": views},
            "run": {"max_error_rate": 0.5, **run},
        }
    )
    return ShardWorker.from_config(cfg, cpus=1)


def _shard(path) -> Shard:
    return Shard(path.stem, str(path), storage.input_version(str(path)))


def _process_all(w: ShardWorker, shards: list[Shard], **kwargs) -> dict[str, DoneRecord | BaseException]:
    """Every shard at once on one worker, as an actor with that many shards in flight runs them."""

    def one(shard):
        try:
            return w.process(shard, **kwargs)
        except ShardError as e:
            return e

    with ThreadPoolExecutor(len(shards)) as pool:
        return dict(zip([s.shard_id for s in shards], pool.map(one, shards)))


def _big_and_small_shards(tmp_path, images: list[dict], per_small: int) -> list[Shard]:
    """The same images as one shard `big.tar` and as shards of `per_small`; returns the small ones."""
    write_shard(tmp_path / "big.tar", images)
    small = []
    for i in range(0, len(images), per_small):
        write_shard(tmp_path / f"small{i:02d}.tar", images[i : i + per_small])
        small.append(_shard(tmp_path / f"small{i:02d}.tar"))
    return small


def _rows(w: ShardWorker, shard_id: str) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(w.ledger.data_url(shard_id)).to_pylist()}


# -- the loop alone ---------------------------------------------------------------------------------------------


def _sum_encoder(batch_sizes: list[int]):
    """Codes = each image's pixel sum: tells rows apart, so routing mistakes show."""

    def encode(batch):
        batch_sizes.append(len(batch))
        pixels = np.stack([item.pixels for _, item in batch])
        return EncodedBatch(
            batch, pixels.reshape(len(batch), -1).sum(1, keepdims=True), None, {"encode": 0.0}
        )

    return encode


def test_images_of_several_shards_fill_one_batch_and_each_shard_gets_its_own_rows_in_order():
    sizes: list[int] = []
    loop = EncoderLoop(_sum_encoder(sizes), batch_size=BATCH, max_wait_s=30)
    got: dict[str, list] = {"a": [], "b": [], "c": []}
    try:
        feeds = {
            sid: loop.open(
                sid, lambda items, codes, _, sid=sid: got[sid].extend(zip(items, codes)), None, _no_time
            )
            for sid in got
        }
        for sid, feed in feeds.items():
            for i in range(2):
                feed.put(Decoded(f"{sid}{i}", None, None, "center", pixels=np.full((1,), ord(sid) * 10 + i)))
        for feed in feeds.values():
            feed.close_input()
        assert all(feed.wait(timeout=30) for feed in feeds.values())
    finally:
        loop.close()
    # a full batch across a and b; c's two images run once no shard is reading any more (not after 30 s)
    assert sizes == [4, 2]
    for sid, rows in got.items():
        assert [(item.key, int(code[0])) for item, code in rows] == [
            (f"{sid}{i}", ord(sid) * 10 + i) for i in range(2)
        ]


def _no_time(stage: str, seconds: float) -> None:
    pass


def test_a_cancelled_shard_is_dropped_and_the_others_in_its_batch_are_written():
    sizes: list[int] = []
    loop = EncoderLoop(_sum_encoder(sizes), batch_size=BATCH, max_wait_s=30)
    got: dict[str, list] = {"keep": [], "drop": []}
    try:
        keep = loop.open("keep", lambda items, *_: got["keep"].extend(items), None, _no_time)
        drop = loop.open("drop", lambda items, *_: got["drop"].extend(items), None, _no_time)
        keep.put(Decoded("k0", None, None, "center", pixels=np.zeros(1)))
        drop.put(Decoded("d0", None, None, "center", pixels=np.zeros(1)))
        drop.cancel()  # e.g. its input turned out truncated, or another attempt committed it
        keep.put(Decoded("k1", None, None, "center", pixels=np.zeros(1)))
        keep.close_input()
        assert keep.wait(timeout=30)
    finally:
        loop.close()
    assert [i.key for i in got["keep"]] == ["k0", "k1"] and got["drop"] == []


def test_a_shard_whose_writer_fails_fails_alone():
    loop = EncoderLoop(_sum_encoder([]), batch_size=BATCH, max_wait_s=30)
    got: list = []

    def broken(items, *_):
        raise OSError("disk full")

    try:
        bad = loop.open("bad", broken, None, _no_time)
        good = loop.open("good", lambda items, *_: got.extend(items), None, _no_time)
        for feed in (bad, good):
            feed.put(Decoded(feed.shard_id, None, None, "center", pixels=np.zeros(1)))
            feed.close_input()
        with pytest.raises(OSError, match="disk full"):
            bad.wait(timeout=30)
        assert good.wait(timeout=30)
    finally:
        loop.close()
    assert [i.key for i in got] == ["good"]


def test_a_shard_waiting_on_a_stopped_loop_fails_instead_of_hanging():
    loop = EncoderLoop(_sum_encoder([]), batch_size=BATCH, max_wait_s=30)
    feed = loop.open("orphan", lambda *_: None, None, _no_time)
    loop.close()  # e.g. the replica shutting down, or a bug that killed the loop's thread
    feed.put(Decoded("k0", None, None, "center", pixels=np.zeros(1)))
    with pytest.raises(ShardError, match="encoder loop has stopped") as e:
        feed.wait(timeout=0.1)
    assert e.value.reason == "worker_error"


# -- the replica: several shards in flight ----------------------------------------------------------------------


def test_small_shards_in_flight_give_the_rows_of_one_big_shard(tmp_path):
    """Same 12 images as one shard and as 6 shards of 2 in flight together: the same codes and var_input
    (CPU, exact: batch composition changes no code here; docs/scale.md has the measurement)."""
    small = _big_and_small_shards(tmp_path, _images(12), per_small=2)
    big_w, small_w = _worker(tmp_path / "big_out"), _worker(tmp_path / "small_out")
    try:
        big = big_w.process(_shard(tmp_path / "big.tar"))
        records = _process_all(small_w, small)
        expected = _rows(big_w, "big")
        got = {}
        for s in small:
            assert records[s.shard_id].rows == 2 and small_w.ledger.is_done(s.shard_id)
            got.update(_rows(small_w, s.shard_id))
    finally:
        big_w.close()
        small_w.close()
    assert big.rows == 12 and set(got) == set(expected)
    for key, row in expected.items():
        assert got[key]["codes"] == row["codes"] and got[key]["label"] == row["label"]
        assert got[key]["var_input"] == row["var_input"]


def test_each_shard_keeps_its_rows_errors_and_failure_with_others_in_flight(tmp_path):
    write_shard(tmp_path / "clean.tar", _images(5))
    broken = _images(3, start=10) + [{"__key__": "bad", "jpg": corrupt_jpeg_bytes(1)}]
    write_shard(tmp_path / "some_errors.tar", broken)
    # more than half of its samples fail: the shard fails (run.max_error_rate), the others do not notice
    write_shard(
        tmp_path / "mostly_bad.tar", [{"__key__": f"b{i}", "jpg": corrupt_jpeg_bytes(i)} for i in range(3)]
    )
    write_truncated_tar(tmp_path / "truncated.tar", _images(6, start=20))
    shards = [_shard(tmp_path / f"{n}.tar") for n in ("clean", "some_errors", "mostly_bad", "truncated")]
    w = _worker(tmp_path / "out", min_errors_to_fail=1)  # the rate alone: 3 bad samples of 3 fail it
    try:
        results = _process_all(w, shards)
        assert results["clean"].rows == 5 and results["clean"].errors == 0
        assert set(_rows(w, "clean")) == {f"k{i:03d}" for i in range(5)}
        assert results["some_errors"].rows == 3 and results["some_errors"].errors_by_reason == {
            "decode_error": 1
        }
        assert set(_rows(w, "some_errors")) == {"k010", "k011", "k012"}
        assert (
            isinstance(results["mostly_bad"], ShardError)
            and results["mostly_bad"].reason == "too_many_errors"
        )
        assert isinstance(results["truncated"], ShardError)
        for failed in ("mostly_bad", "truncated"):  # nothing of a failed shard is committed
            assert not w.ledger.is_done(failed)
            assert not storage.exists(w.ledger.data_url(failed))
        # the replica goes on: the failed shard's images left nothing behind in the shared loop
        assert w.process(_shard(tmp_path / "clean.tar"), attempt=2).skipped
    finally:
        w.close()


def test_a_shard_committed_elsewhere_stops_and_the_shard_beside_it_commits(tmp_path, monkeypatch):
    monkeypatch.setattr(worker_module, "_SUPERSEDED_CHECK_S", 0.0)  # look for a twin's marker at every image
    write_shard(tmp_path / "twin.tar", _images(24))
    write_shard(tmp_path / "other.tar", _images(6, start=50))
    w = _worker(tmp_path / "out")
    twin_marker = DoneRecord(shard_id="twin", rows=24, host="the other attempt")
    marked = threading.Event()

    def commit_twin_meanwhile(n: int) -> None:  # the first rows written: another attempt commits now
        if not marked.is_set():
            marked.set()
            storage.write_bytes_atomic(
                w.ledger.data_url("twin"), b"the other attempt's data file"
            )  # the commit
            w.ledger.mark_done("twin", twin_marker)

    try:
        twin = threading.Thread(
            target=lambda: results.update(
                twin=w.process(_shard(tmp_path / "twin.tar"), on_progress=commit_twin_meanwhile)
            )
        )
        results: dict = {}
        twin.start()
        results["other"] = w.process(_shard(tmp_path / "other.tar"))
        twin.join(timeout=60)
    finally:
        w.close()
    assert results["twin"] == twin_marker and results["twin"].skipped
    # this attempt committed nothing: the data file is the other attempt's
    assert storage.read_bytes(w.ledger.data_url("twin")) == b"the other attempt's data file"
    assert results["other"].rows == 6 and len(_rows(w, "other")) == 6


def test_views_of_images_in_flight_stay_with_their_image_and_progress_counts_images(
    tmp_path, one_torch_thread
):
    """3 views per image and batches of 4 crops: batches cut through images and mix shards. Each shard still
    gets its rows grouped by image in canonical view order, progress counts images (never 0), and the codes are
    those of one shard holding every image."""
    views = "center,tl,tl+hflip"
    small = _big_and_small_shards(tmp_path, _images(6), per_small=3)
    big_w, small_w = _worker(tmp_path / "big_out", views), _worker(tmp_path / "small_out", views)
    progress: dict[str, list[int]] = {s.shard_id: [] for s in small}
    try:
        big_w.process(_shard(tmp_path / "big.tar"))
        with ThreadPoolExecutor(len(small)) as pool:
            futures = {
                s.shard_id: pool.submit(small_w.process, s, on_progress=progress[s.shard_id].append)
                for s in small
            }
            records = {sid: f.result() for sid, f in futures.items()}
        expected = pq.read_table(big_w.ledger.data_url("big")).to_pylist()
        got = {s.shard_id: pq.read_table(small_w.ledger.data_url(s.shard_id)).to_pylist() for s in small}
    finally:
        big_w.close()
        small_w.close()
    for sid, rows in got.items():
        assert records[sid].images == 3 and records[sid].rows == 9
        assert sum(progress[sid]) == 3 and 0 not in progress[sid]
        assert [r["view"] for r in rows] == ["center", "tl", "tl+hflip"] * 3
        assert (
            [r["key"] for r in rows[::3]] == [r["key"] for r in rows[1::3]] == [r["key"] for r in rows[2::3]]
        )
    assert sorted((r["key"], r["view"], r["codes"]) for rows in got.values() for r in rows) == sorted(
        (r["key"], r["view"], r["codes"]) for r in expected
    )


def test_each_shard_in_a_non_exact_mode_gets_an_agreement_sample_of_its_own_crops(tmp_path, one_torch_thread):
    shards = []
    for i in range(3):
        write_shard(tmp_path / f"s{i}.tar", _images(3, start=10 * i))
        shards.append(_shard(tmp_path / f"s{i}.tar"))
    w = _worker(tmp_path / "out", precision="bf16")
    try:
        records = _process_all(w, shards)
    finally:
        w.close()
    for record in records.values():
        assert isinstance(record, DoneRecord) and record.rows == 3
        agreement = record.agreement_with_exact
        assert agreement is not None and agreement["mode"] == "bf16" and agreement["decode"] == "pil"
        # measured on the crops, in the first batch holding this shard's, of the shards new in that batch
        assert 1 <= agreement["images"] <= BATCH and 0.5 < agreement["overall"] <= 1.0


def test_a_speculative_copy_that_starts_after_the_original_committed_does_nothing(tmp_path):
    w = _worker(tmp_path / "out")
    original = DoneRecord(shard_id="s", rows=3, host="the original")
    w.ledger.mark_done("s", original)
    gone = Shard("s", str(tmp_path / "moved-away.tar"), None)  # the copy must not even open its input
    try:
        copy = w.process(gone, look_first=True)  # attempt 1: a copy shares the original's attempt number
        with pytest.raises(StorageError):  # what the same call does when it does not look first
            w.process(gone)
    finally:
        w.close()
    assert copy == original and copy.skipped
    assert not storage.exists(w.ledger.data_url("s")) and not list((tmp_path / "out").rglob(".tmp-*"))
