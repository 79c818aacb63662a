"""Shard identity, planning against done markers (also format-1.0 ones), tar-only expansion, and status of
records outside the plan. In-process, no Ray."""

import hashlib
import json
import logging
import os

import pytest

from vqpipe import storage
from vqpipe.errors import PERMANENT_SHARD_REASONS, StorageError
from vqpipe.ledger import Ledger
from vqpipe.out.snapshot import Snapshot
from vqpipe.plan import legacy_stem, make_plan, shard_id
from vqpipe.status import read_status


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def commit(ledger, sid, url, fingerprint=None):
    """A done marker as the worker writes it (input URL with credentials masked)."""
    record = {"samples": 2, "rows": 2, "errors": 0, "errors_by_reason": {}}
    record["input"] = {"url": storage.redact(url), "fingerprint": fingerprint or {}}
    ledger.mark_done(sid, record)


def planned(inputs, ledger, **kw):
    return make_plan(storage.expand_inputs_with_info([str(i) for i in inputs]), ledger, **kw)


def test_id_depends_on_the_url_alone(tmp_path, monkeypatch):
    a = str(tmp_path / "in/day1/part-000000.tar")
    b = str(tmp_path / "in/day2/part-000000.tar")
    assert shard_id(a).startswith("part-000000-") and len(shard_id(a)) == len("part-000000-") + 8
    assert shard_id(a) != shard_id(b)
    assert legacy_stem("s3://b/x/part-1.tar.gz") == "part-1" and legacy_stem("/p/part-2.tgz") == "part-2"
    # local spellings of one file expand to one URL, hence one id
    touch(tmp_path / "in/day1/part-000000.tar")
    spellings = [tmp_path / "in/day1/part-000000.tar", f"file://{tmp_path}/in/day1/part-000000.tar"]
    monkeypatch.chdir(tmp_path / "in")
    spellings += ["day1/part-000000.tar", "./day2/../day1/part-000000.tar"]
    assert {shard_id(storage.expand_inputs([str(s)])[0]) for s in spellings} == {shard_id(a)}


def test_a_second_same_named_input_does_not_hide_the_committed_one(tmp_path):
    """Issue 10 item 1: night 2's pattern also matches a new day2/part-000000.tar."""
    ledger = Ledger(str(tmp_path / "out"))
    day1 = touch(tmp_path / "in/day1/part-000000.tar")
    first = planned([tmp_path / "in/*/part-*.tar"], ledger)
    assert [s.shard_id for s in first.todo] == [shard_id(str(day1))]
    commit(ledger, shard_id(str(day1)), str(day1))
    day2 = touch(tmp_path / "in/day2/part-000000.tar")
    second = planned([tmp_path / "in/*/part-*.tar"], ledger)
    assert [s.url for s in second.done] == [str(day1)]
    assert [s.url for s in second.todo] == [str(day2)]
    # ... and the reverse: day1 disappears, day2 keeps its id
    commit(ledger, shard_id(str(day2)), str(day2))
    day1.unlink()
    third = planned([tmp_path / "in/*/part-*.tar"], ledger)
    assert [s.shard_id for s in third.done] == [shard_id(str(day2))] and not third.todo


def test_format_1_0_plain_stem_markers_are_recognised_for_their_own_input_only(tmp_path):
    ledger = Ledger(str(tmp_path / "out"))
    day1 = touch(tmp_path / "in/day1/part-000000.tar")
    day2 = touch(tmp_path / "in/day2/part-000000.tar")
    commit(ledger, "part-000000", str(day1))  # what format 1.0 wrote for day1, alone in night 1
    plan = planned([tmp_path / "in/*/part-*.tar"], ledger)
    assert [(s.shard_id, s.url) for s in plan.done] == [("part-000000", str(day1))]  # keeps its id
    assert [(s.shard_id, s.url) for s in plan.todo] == [(shard_id(str(day2)), str(day2))]
    # a format-1.0 collision id is today's id: nothing to translate
    ledger2 = Ledger(str(tmp_path / "out2"))
    commit(ledger2, shard_id(str(day2)), str(day2))
    assert [s.url for s in planned([tmp_path / "in/*/part-*.tar"], ledger2).done] == [str(day2)]


def test_a_masked_url_must_also_match_the_fingerprint(tmp_path):
    """`key=...` in a path is masked in markers; two partitions would mask alike."""
    ledger = Ledger(str(tmp_path / "out"))
    a = touch(tmp_path / "in/key=1/part-0.tar", b"aaa")
    b = touch(tmp_path / "in/key=2/part-0.tar", b"bbbb")
    assert storage.redact(str(a)) == storage.redact(str(b))
    fp_a = storage.input_version(str(a))
    commit(ledger, "part-0", str(a), fp_a)
    plan = planned([tmp_path / "in/*/part-0.tar"], ledger)
    assert [s.url for s in plan.done] == [str(a)] and [s.url for s in plan.todo] == [str(b)]


def test_changed_input_is_reported_and_redone_under_its_id(tmp_path):
    ledger = Ledger(str(tmp_path / "out"))
    a = touch(tmp_path / "in/part-0.tar", b"old")
    commit(ledger, "part-0", str(a), storage.input_version(str(a)))  # legacy id
    touch(a, b"newer")
    plan = planned([a], ledger, reprocess_changed=True)
    assert [s.shard_id for s in plan.changed] == ["part-0"] and [s.shard_id for s in plan.todo] == ["part-0"]


def test_globs_and_directories_plan_only_tars(tmp_path, caplog):
    """Issue 10 item 8: an img2dataset folder holds parquet and stats side files beside its tars."""
    d = tmp_path / "img2dataset"
    for i in range(2):
        touch(d / f"{i:05d}.tar")
        touch(d / f"{i:05d}.parquet")
        touch(d / f"{i:05d}_stats.json")
    caplog.set_level(logging.INFO)
    for spec in (d / "*", d):
        got = storage.expand_inputs([str(spec)])
        assert [p.rsplit("/", 1)[1] for p in got] == ["00000.tar", "00001.tar"]
    assert "skipping 4 file(s) that are not tars, e.g. 00000.parquet, 00000_stats.json" in caplog.text
    with pytest.raises(StorageError, match=r"\*\.json: matches no tar files.*00000_stats\.json"):
        storage.expand_inputs([str(d / "*.json")])
    # named explicitly, a non-tar is planned: the reader fails it as not_a_tar, at once (a permanent reason)
    assert storage.expand_inputs([str(d / "00000.parquet")]) == [str(d / "00000.parquet")]
    assert {
        "not_a_tar",
        "bad_tar",
    } <= PERMANENT_SHARD_REASONS and "truncated_tar" not in PERMANENT_SHARD_REASONS


def _commit(ledger: Ledger, shard_id: str, record: dict) -> None:
    """A commit as status sees it: a data file (status reads no rows: any bytes) and the done marker."""
    storage.write_bytes_atomic(ledger.data_url(shard_id), b"rows")
    ledger.mark_done(shard_id, record)


def non_utf8_file(directory, name: bytes, data=b"x"):
    """A real file whose name holds bytes that are not UTF-8 (Python lists it with surrogate escapes)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = os.path.join(os.fsencode(directory), name)
    with open(path, "wb") as f:
        f.write(data)
    return os.fsdecode(path)


def test_an_input_whose_name_is_not_utf8_is_refused_alone(tmp_path):
    ledger = Ledger(str(tmp_path / "out"))
    good = touch(tmp_path / "in/part-1.tar")
    bad = non_utf8_file(tmp_path / "in", b"caf\xe9 \xff.tar")
    plan = planned([tmp_path / "in"], ledger)
    assert [s.url for s in plan.todo] == [str(good)] and len(plan) == 1
    assert len(plan.refused) == 1
    refused = plan.refused[0]
    assert refused.reason == "bad_input_name"
    assert refused.url == f"{tmp_path}/in/caf\\xe9 \\xff.tar" and refused.url in refused.detail
    assert refused.shard_id == f"caf_ _-{hashlib.sha1(os.fsencode(bad)).hexdigest()[:8]}"
    for text in (refused.url, refused.detail, refused.shard_id):
        text.encode("utf-8")  # valid text: it goes into failed/<id>.json, plan.json and logs
    # the ids of names that are UTF-8 are what they always were
    assert shard_id(str(good)) == f"part-1-{hashlib.sha1(str(good).encode()).hexdigest()[:8]}"


@pytest.mark.slow
def test_a_run_over_a_directory_with_a_non_utf8_name_tokenizes_the_rest(ray_session, tmp_path, capsys):
    """Issue 23 item 3: one such name used to stop the whole run with a UnicodeEncodeError traceback."""
    from shards import good_image_bytes, write_shard

    from vqpipe.cli import main

    images = [{"__key__": f"k{i}", "png": good_image_bytes(i, "png")} for i in range(3)]
    write_shard(touch(tmp_path / "in/good.tar"), images)
    bad = non_utf8_file(tmp_path / "in", b"bad\xff.tar", (tmp_path / "in/good.tar").read_bytes())
    out = tmp_path / "out"
    args = ["tokenize", str(tmp_path / "in"), "-o", str(out), "--model", "tiny", "--random-weights"]
    assert main([*args, "--batch-size", "4"]) == 1  # incomplete: one input failed
    assert main(["status", str(out), "--json"]) == 1
    status = json.loads(capsys.readouterr().out)
    bad_id = shard_id(bad)
    assert status["shards"] == {"planned": 2, "done": 1, "failed": 1, "pending": 0}
    assert status["failed_shards"] == {bad_id: "bad_input_name"}
    assert Ledger(str(out)).read_done(shard_id(str(tmp_path / "in/good.tar"))).rows == 3
    record = Ledger(str(out)).read_failed(bad_id)
    assert record.url == f"{tmp_path}/in/bad\\xff.tar" and "not UTF-8" in record.detail


def test_status_counts_the_plan_and_reports_records_outside_it(tmp_path, capsys):
    ledger = Ledger(str(tmp_path / "out"))
    _commit(ledger, "a-1", {"samples": 3, "rows": 2, "errors": 1, "errors_by_reason": {"decode_error": 1}})
    _commit(ledger, "old-1", {"samples": 5, "rows": 5, "errors": 0, "errors_by_reason": {}})
    for i in range(3):  # failures of inputs a corrected rerun no longer plans
        ledger.mark_failed(f"junk-{i}", {"reason": "not_a_tar"})
    ledger.mark_failed("b-1", {"reason": "truncated_tar"})
    ledger.write_plan({"a-1": "/in/a.tar", "b-1": "/in/b.tar", "c-1": "/in/c.tar"})
    st = read_status(Snapshot.open(ledger=ledger, require_run=False))
    d = st.to_dict()
    assert d["shards"] == {"planned": 3, "done": 1, "failed": 1, "pending": 1}
    assert (d["samples"], d["rows"], d["errors"]) == (3, 2, 1)
    assert d["failed_shards"] == {"b-1": "truncated_tar"}
    assert d["outside_plan"] == {"done": 1, "failed_shards": {f"junk-{i}": "not_a_tar" for i in range(3)}}
    assert d["active_run"] is None and not st.complete
    json.dumps(d)
    from vqpipe.cli import main

    _commit(ledger, "b-1", {"samples": 1, "rows": 1, "errors": 0, "errors_by_reason": {}})
    _commit(ledger, "c-1", {"samples": 1, "rows": 1, "errors": 0, "errors_by_reason": {}})
    assert main(["status", ledger.output]) == 0  # the corrected run's inputs are all done: complete
    text = capsys.readouterr().out
    assert "3 done, 0 failed, 0 pending (of 3 planned)" in text
    assert "outside the latest plan (earlier runs): 1 done, 3 failure record(s)" in text


@pytest.mark.slow
def test_nightly_rerun_over_a_second_same_named_shard_duplicates_nothing(ray_session, tmp_path, capsys):
    """Issue 10 item 1 end to end: night 1 (written by format 1.0: plain-stem ids) tokenized
    in/day1/part-000000.tar; night 2's pattern also matches in/day2/part-000000.tar."""
    import pyarrow.parquet as pq
    from shards import good_image_bytes, write_shard
    from test_job import job_config, tar_keys

    from vqpipe.cli import main
    from vqpipe.job import tokenize

    def write(path, n, seed):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_shard(
            path, [{"__key__": f"{seed}_{i:03d}", "png": good_image_bytes(seed + i, "png")} for i in range(n)]
        )

    day1, day2, out = (
        tmp_path / "in/day1/part-000000.tar",
        tmp_path / "in/day2/part-000000.tar",
        tmp_path / "out",
    )
    write(day1, 3, 100)
    pattern = str(tmp_path / "in/*/part-*.tar")
    assert tokenize(job_config([pattern], out)).ok
    for sub, ext in (
        ("data", "parquet"),
        ("_vqpipe/errors", "pq"),
        ("_vqpipe/done", "json"),
    ):  # as format 1.0 named them (by plain stem)
        (out / sub / f"{shard_id(str(day1))}.{ext}").rename(out / sub / f"part-000000.{ext}")
    committed = (out / "_vqpipe/done/part-000000.json").stat().st_mtime_ns

    write(day2, 2, 200)
    night2 = tokenize(job_config([pattern], out))
    assert night2.ok
    assert [s.url for s in night2.plan.todo] == [str(day2)] and [s.shard_id for s in night2.plan.done] == [
        "part-000000"
    ]
    assert (out / "_vqpipe/done/part-000000.json").stat().st_mtime_ns == committed  # not redone
    keys = [
        k
        for p in sorted((out / "data").glob("*.parquet"))
        for k in pq.read_table(p).column("key").to_pylist()
    ]
    assert sorted(keys) == sorted(tar_keys(day1) + tar_keys(day2))  # each row once
    assert main(["status", str(out)]) == 0
    assert "2 done, 0 failed, 0 pending (of 2 planned)" in capsys.readouterr().out
    # night 3: nothing new, nothing to do
    assert not tokenize(job_config([pattern], out)).plan.todo


def test_planning_reads_each_marker_once_then_only_the_index(s3):
    """Issue 16: new inputs cost no request; a committed one costs one marker read until the ledger index
    holds it, and then nothing: a plan is a listing of done/ plus the index."""
    out = s3.url("plancost/out")
    inputs = [
        (s3.url(f"plancost/in/day{d}/part-{i:06d}.tar"), {"size": 1}) for d in (1, 2) for i in range(50)
    ]
    ledger = Ledger(out, s3.storage_options)
    for url, _ in inputs[:5]:
        commit(ledger, shard_id(url), url)
    commit(ledger, "part-000007", inputs[7][0])  # a format-1.0 plain-stem marker

    def marker_reads(cost):
        return [p for m, p in cost if m == "GET" and "/done/" in p and p.endswith(".json")]

    start = len(s3.requests)
    plan = make_plan(inputs, ledger)
    cost = s3.requests[start:]
    assert len(plan.done) == 6 and len(plan.todo) == 94
    assert len(marker_reads(cost)) == 6, cost
    assert len(cost) <= 3 + 2 * 6, (
        cost
    )  # listings of done/ and index/, then per marker at most a HEAD and a GET
    ledger.committed(maintain=True)  # what a run does at its start, holding the lease
    start = len(s3.requests)
    again = make_plan(inputs, ledger)
    cost = s3.requests[start:]
    assert [s.shard_id for s in again.done] == [s.shard_id for s in plan.done]
    assert not marker_reads(cost), cost
    assert len(cost) <= 5, cost  # listings of done/ and index/, one segment (HEAD, GETs)


def test_plan_splits_new_committed_and_changed_inputs(tmp_path, monkeypatch):
    """Recorded fingerprints are compared in batches (issue 16): every committed input lands once, in order."""
    from vqpipe import plan as plan_module

    monkeypatch.setattr(plan_module, "_CHUNK", 2)
    ledger = Ledger(str(tmp_path / "out"))
    for i in range(7):
        touch(tmp_path / f"in/part-{i}.tar")
    listed = storage.expand_inputs_with_info([str(tmp_path / "in")])
    for url, fp in listed[:5]:
        commit(ledger, shard_id(url), url, fp)
    ledger.committed(maintain=True)
    changed = tmp_path / "in/part-1.tar"
    changed.write_bytes(b"longer")
    urls = [u for u, _ in listed]
    kept = planned([tmp_path / "in"], ledger)
    assert sorted(s.url for s in kept.todo) == urls[5:]
    assert [s.url for s in kept.changed] == [str(changed)]
    assert sorted(s.url for s in kept.done) == urls[:5] and kept.ids == {shard_id(u) for u in urls}
    assert [s.shard_id for s in kept.done] == sorted(s.shard_id for s in kept.done)
    redo = planned([tmp_path / "in"], ledger, reprocess_changed=True)
    assert sorted(s.url for s in redo.todo) == sorted([str(changed), *urls[5:]])
    assert sorted(s.url for s in redo.done) == [u for u in urls[:5] if u != str(changed)]
