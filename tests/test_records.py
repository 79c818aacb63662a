"""Typed records: the JSON written is what the README's "Output format" documents, and every version written
so far reads back (missing keys take defaults, unknown keys are kept). In-process, no Ray."""

import json
import re
from pathlib import Path

import pytest

from vqpipe.records import RECORD_VERSION, DoneRecord, FailedRecord, InputRef, RunEnd, RunRecord

# A marker as vqpipe 1.1 wrote it before records were typed (keys as the README lists them).
MARKER_1_1 = {
    "shard_id": "part-000000-1a2b3c4d",
    "input": {"url": "s3://b/in/part-000000.tar", "fingerprint": {"size": 10240, "etag": "abc", "mtime": 17}},
    "samples": 5,
    "images": 4,
    "rows": 4,
    "views": ["center"],
    "errors": 1,
    "errors_by_reason": {"decode_error": 1},
    "members": 11,
    "ignored_members": 1,
    "ignored_by_reason": {"no_extension": 1},
    "input_bytes": 9000,
    "data_bytes": 7000,
    "error_bytes": 900,
    "seconds": {"decode": 0.5, "encode": 1.25},
    "precision": "exact",
    "decode": "cpu",
    "agreement_with_exact": None,
    "wall_seconds": 2.5,
    "started": 1.7e9,
    "attempt": 2,
    "host": "node-1",
    "peak_rss_bytes": 123456,
    "decode_threads": 4,
    "allocator_env": {"MALLOC_ARENA_MAX": "2"},
    "pid": 42,
    "vqpipe_version": "1.1.0",
}


def test_a_1_1_marker_reads_and_writes_back_the_same_keys_plus_the_version():
    rec = DoneRecord.from_json(MARKER_1_1)
    assert rec.input == InputRef("s3://b/in/part-000000.tar", {"size": 10240, "etag": "abc", "mtime": 17})
    assert (rec.rows, rec.errors_by_reason, rec.attempt) == (4, {"decode_error": 1}, 2)
    assert rec.record_version == 0 and not rec.extra  # written before records had a version
    assert rec.to_json() == {**MARKER_1_1, "record_version": 0}
    fresh = DoneRecord(shard_id="x", rows=3).to_json()
    assert set(fresh) == set(MARKER_1_1) | {"record_version"} and fresh["record_version"] == RECORD_VERSION
    json.dumps(fresh)  # plain JSON types only


def test_a_1_0_marker_without_member_counts_reads_with_defaults():
    old = {
        k: v for k, v in MARKER_1_1.items() if k not in ("members", "ignored_members", "ignored_by_reason")
    }
    rec = DoneRecord.from_json(old)
    assert rec.members is None and rec.ignored_members == 0 and rec.ignored_by_reason == {}
    assert rec.rows == 4


def test_a_marker_from_before_views_reads_images_as_unknown_and_the_center_view():
    old = {k: v for k, v in MARKER_1_1.items() if k not in ("images", "views")}
    rec = DoneRecord.from_json(old)
    assert rec.images is None and rec.views == ["center"] and rec.rows == 4


def test_unknown_keys_of_a_newer_version_are_kept_and_the_skip_flag_is_never_written():
    newer = {**MARKER_1_1, "record_version": RECORD_VERSION + 1, "view": {"crop": "center"}}
    rec = DoneRecord.from_json(newer)
    assert rec.extra == {"view": {"crop": "center"}}
    rec.skipped = True
    assert rec.to_json() == newer


def test_records_that_are_not_objects_are_refused_with_the_type_named():
    with pytest.raises(ValueError, match="DoneRecord is a JSON object, not list"):
        DoneRecord.from_json([1, 2])


def test_failed_and_run_records_round_trip():
    failed = {"shard_id": "a-1", "url": "/in/a.tar", "reason": "not_a_tar", "detail": "x", "attempts": 3}
    assert FailedRecord.from_json(failed).to_json() == {**failed, "record_version": 0}
    assert FailedRecord.from_json({"reason": "not_a_tar"}).attempts == 0  # hand-made or partial records read
    # since the next run decides on them: the failure's kind and the version of the input that failed
    new = {**failed, "kind": "input", "fingerprint": {"size": 10, "mtime": 2.5}, "record_version": 1}
    assert FailedRecord.from_json(new).to_json() == new and FailedRecord.from_json(new).kind == "input"
    run = {
        "fingerprint": "f",
        "output_settings": {"preset": "tiny"},
        "config": {},
        "versions": {},
        "started": 1.0,
    }
    old = RunRecord.from_json(run)
    assert old.legacy_stem_ids  # an OUT begun before the key existed may hold plain-stem ids
    assert "previous_fingerprints" not in old.to_json()
    old.previous_fingerprints = ["e"]
    assert RunRecord.from_json(old.to_json()) == old
    assert "ended" not in old.to_json()  # a run that has not ended (or was killed) says nothing
    old.ended = RunEnd("no_capacity", 75, 0, 0, "no encoder replica could be placed in 2s", 3.0)
    assert RunRecord.from_json(json.loads(json.dumps(old.to_json()))) == old


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rows", -4, "rows is -4, not a count"),  # dropped shards from a TokenDataset; status counted them
        ("rows", "5", "rows is '5', not a count"),
        ("rows", 2.0, "rows is 2.0, not a count"),
        ("samples", True, "samples is True, not a count"),
        ("errors", None, "errors is None, not a count"),
        ("images", -1, "images is -1, not a count"),
        ("errors_by_reason", {"decode_error": -1}, "errors_by_reason['decode_error'] is -1, not a count"),
        ("ignored_by_reason", ["x"], "ignored_by_reason is ['x'], not an object of counts by reason"),
        ("views", [], "views is [], not a list of view names"),
        ("seconds", {"encode": float("nan")}, "seconds['encode'] is nan, not a number of seconds"),
        ("wall_seconds", -1.0, "wall_seconds is -1.0, not a number of seconds"),
        ("shard_id", 7, "shard_id is 7, not a string"),
        ("input", {"url": 7}, "input.url is 7, not a string"),
    ],
)
def test_markers_with_values_of_the_wrong_type_or_range_are_refused_naming_field_and_value(
    field, value, message
):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        DoneRecord.from_json({**MARKER_1_1, field: value})


def test_failure_records_with_values_of_the_wrong_type_are_refused():
    with pytest.raises(ValueError, match=r"^attempts is -1, not a count"):
        FailedRecord.from_json({"reason": "not_a_tar", "attempts": -1})
    with pytest.raises(ValueError, match=r"^reason is \['not_a_tar'\], not a string"):
        FailedRecord.from_json({"reason": ["not_a_tar"]})


def test_status_names_the_marker_a_hand_edit_broke(tmp_path, caplog):
    from tokens import write_out

    from vqpipe.cli import main
    from vqpipe.ledger import Ledger

    write_out(tmp_path, {"a": 4, "b": 6})
    ledger = Ledger(str(tmp_path))
    assert main(["status", str(tmp_path)]) == 0
    marker = Path(ledger.done_url("b"))
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "rows": -4}))
    assert main(["status", str(tmp_path)]) == 2  # was 0, with all rows counted
    assert f"{marker}: not a done record (rows is -4, not a count" in caplog.text
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "rows": 6}))
    ledger.mark_failed("c", {"reason": "not_a_tar"})
    assert main(["status", str(tmp_path)]) == 1
    failed = Path(ledger.failed_url("c"))
    failed.write_text(json.dumps({"reason": "not_a_tar", "attempts": "3"}))
    assert main(["status", str(tmp_path)]) == 2
    assert f"{failed}: not a failure record (attempts is '3', not a count" in caplog.text
