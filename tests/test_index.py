"""The ledger index: derived from done markers, rebuilt when missing or stale, never making a shard look done
without a marker. In-process on a local OUT, no Ray."""

import logging

import pytest

from vqpipe.errors import StorageError
from vqpipe.ledger import Ledger
from vqpipe.out.snapshot import Snapshot
from vqpipe.records import DoneRecord, InputRef
from vqpipe.status import read_status


def record(sid, rows=2, errors=0, reasons=None):
    return DoneRecord(
        shard_id=sid,
        input=InputRef(f"/in/{sid}.tar", {"size": 10, "mtime": 1.5}),
        samples=rows + errors,
        rows=rows,
        errors=errors,
        errors_by_reason=reasons or {},
        data_bytes=100 * rows,
    )


@pytest.fixture
def reads(monkeypatch):
    """The ids of the markers read (each a request on an object store)."""
    seen = []
    original = Ledger.read_done

    def read_done(self, shard_id):
        seen.append(shard_id)
        return original(self, shard_id)

    monkeypatch.setattr(Ledger, "read_done", read_done)
    return seen


def test_markers_are_read_once_then_answered_from_the_index(tmp_path, reads):
    ledger = Ledger(str(tmp_path / "out"), run_id="r1")
    for i in range(5):
        ledger.mark_done(f"s-{i}", record(f"s-{i}", rows=i, errors=1, reasons={"decode_error": 1}))
    first = ledger.committed(maintain=True)
    assert sorted(reads) == [f"s-{i}" for i in range(5)] and len(first) == 5
    reads.clear()
    again = ledger.committed()
    assert not reads
    assert (
        again.record("s-3")
        == first.record("s-3")
        == DoneRecord.from_json(record("s-3", 3, 1, {"decode_error": 1}).summary())
    )
    assert again.totals(["s-1", "s-4"]) == {
        "samples": 7,
        "rows": 5,
        "data_bytes": 500,
        "errors_by_reason": {"decode_error": 2},
        "ignored_by_reason": {},
    }


def test_an_index_row_never_outlives_its_marker_and_a_rewritten_marker_is_read_again(tmp_path, reads):
    ledger = Ledger(str(tmp_path / "out"), run_id="r1")
    for sid in ("a", "b"):
        ledger.mark_done(sid, record(sid))
    ledger.committed(maintain=True)
    ledger.unmark_done("a")  # e.g. --reprocess-changed, or removed by hand
    ledger.mark_done("b", record("b", rows=7))  # rewritten behind the index's back (an older vqpipe)
    reads.clear()
    now = ledger.committed(maintain=True)
    assert now.ids == {"b"} and now.record("b").rows == 7
    assert reads == ["b"]
    reads.clear()
    assert ledger.committed().record("b").rows == 7 and not reads  # consolidated: stale rows gone


def test_commits_noted_by_the_run_are_indexed_in_batches_and_trusted_while_listed(tmp_path, reads):
    ledger = Ledger(str(tmp_path / "out"), run_id="r1")
    for sid in ("a", "b", "c"):
        ledger.mark_done(sid, record(sid))
        ledger.note_committed(record(sid))
    assert not (tmp_path / "out/_vqpipe/index").exists()  # not yet due: one write per batch, not per shard
    ledger.flush_index()
    assert len(list((tmp_path / "out/_vqpipe/index").glob("seg-*.pq"))) == 1
    ledger.note_committed(record("ghost"))  # a report whose marker is not there: never counts as done
    ledger.flush_index()
    reads.clear()
    got = ledger.committed()
    assert got.ids == {"a", "b", "c"} and not reads
    ledger.committed(maintain=True)  # stamps the rows with their markers' fingerprints, drops "ghost"
    assert len(list((tmp_path / "out/_vqpipe/index").glob("seg-*.pq"))) == 1


def test_a_damaged_or_missing_index_is_rebuilt_from_the_markers(tmp_path, reads, caplog):
    ledger = Ledger(str(tmp_path / "out"), run_id="r1")
    for sid in ("a", "b"):
        ledger.mark_done(sid, record(sid))
    ledger.committed(maintain=True)
    (segment,) = (tmp_path / "out/_vqpipe/index").glob("seg-*.pq")
    segment.write_bytes(b"not parquet")
    reads.clear()
    with caplog.at_level(logging.WARNING, "vqpipe.index"):
        assert ledger.committed(maintain=True).ids == {"a", "b"}
    assert "unreadable index segment" in caplog.text and sorted(reads) == ["a", "b"]
    for p in (tmp_path / "out/_vqpipe/index").iterdir():
        p.unlink()
    reads.clear()
    st = read_status(Snapshot.open(ledger=ledger, require_run=False))
    assert (len(st.done), st.rows) == (2, 4) and sorted(reads) == ["a", "b"]


def test_a_marker_that_is_not_a_record_is_named(tmp_path):
    ledger = Ledger(str(tmp_path / "out"))
    ledger.mark_done("a", record("a"))
    (tmp_path / "out/_vqpipe/done/a.json").write_text("[1, 2]\n")
    with pytest.raises(StorageError, match=r"done/a\.json: not a done record"):
        ledger.committed()


def test_read_done_and_read_done_many_return_done_records(tmp_path):
    """Issue 12: one type for a done marker; the compaction manifest still hashes a marker as written."""
    import hashlib
    import json

    from vqpipe import storage
    from vqpipe.records import _COMMIT_IDENTITY as _IDENTITY

    ledger = Ledger(str(tmp_path / "out"))
    ledger.mark_done("a", record("a", rows=3))
    old = {"shard_id": "old", "rows": 2, "samples": 2, "input": {"url": "/in/old.tar"}}  # an older marker
    storage.write_json_atomic(ledger.done_url("old"), old)
    many = ledger.read_done_many(["a", "old"])
    assert many == {"a": ledger.read_done("a"), "old": ledger.read_done("old")}
    assert many["a"].rows == 3 and many["old"].rows == 2 and many["old"].attempt == 1  # a default filled in
    as_written = {k: old.get(k) for k in _IDENTITY}
    digest = hashlib.sha256(
        json.dumps(as_written, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert many["old"].commit_fingerprint() == digest[:24]
    rewritten = DoneRecord.from_json(many["old"].to_json())  # the same record, written back with defaults
    assert rewritten.commit_fingerprint() != many["old"].commit_fingerprint()
