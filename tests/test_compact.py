"""`vqpipe compact` and reading compacted OUTs: the same committed rows, each exactly once, from TokenDataset, DuckDB
and pyarrow, before and after compaction, with shards committed after it and shards committed again after it;
data/ itself holds every row once after a compaction, and fails readers while one is unfinished. OUTs are written
by vqpipe's own writer and ledger (tests/tokens.py), no Ray."""

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokens import write_out
from torch.utils.data import DataLoader

from vqpipe.cli import EXIT_BUSY, EXIT_OK, main
from vqpipe.compact import CompactOptions, arrow_dataset, compact, duckdb_sql, read_sources
from vqpipe.data import TokenDataset
from vqpipe.errors import LeaseError, StorageError
from vqpipe.lease import Lease
from vqpipe.ledger import Ledger
from vqpipe.manifest import read_manifest
from vqpipe.out.layout import INCOMPLETE_NAME

ROWS = {"a": 11, "b": 0, "c": 6, "d": 20, "e": 3, "f": 9}
ALL = ("codes", "label", "var_input", "meta")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    d = tmp_path_factory.mktemp("template")
    return d, write_out(d, ROWS, rows_per_group=4, uncommitted={"g": 5})


@pytest.fixture
def out(template, tmp_path):
    """A fresh copy of the template OUT for each test (tests change it)."""
    d = tmp_path / "out"
    shutil.copytree(template[0], d)
    return d, dict(template[1])


def rows_of(d, **kw):
    """key -> (label, codes, var_input, meta) of every row an epoch yields, counting repeats."""
    got, count = {}, Counter()
    for r in TokenDataset(str(d), columns=ALL, **kw):
        count[r["key"]] += 1
        got[r["key"]] = (r["label"], r["codes"].numpy(), r["var_input"].numpy(), r["meta"])
    return got, count


def check_rows(d, expected, **kw):
    got, count = rows_of(d, **kw)
    assert set(count) == set(expected) and set(count.values()) == {1}
    for k, (label, codes, vi, meta) in got.items():
        want = expected[k]
        assert label == (-1 if want["label"] is None else want["label"])
        assert np.array_equal(codes, want["codes"]) and np.array_equal(vi, want["var_input"])
        assert meta == want["meta"]


def run(d, **kw):
    return compact(CompactOptions(str(d), **kw))


def manifest_of(d):
    return read_manifest(Ledger(str(d)).layout)


def data_names(d):
    return sorted(p.name for p in (d / "data").iterdir())


def root_keys(d):
    """The keys pyarrow reads from data/ as a directory: what any reader of the directory sees."""
    return Counter(pq.read_table(d / "data", columns=["key"])["key"].to_pylist())


def test_compaction_writes_the_same_rows_with_a_manifest(out):
    d, expected = out
    data_schema = pq.read_schema(d / "data" / "a.parquet")
    res = run(d, target_rows=20, row_group_rows=8)
    manifest = manifest_of(d)
    assert [p.file for p in manifest.parts] == [p.file for p in res.new_parts]
    assert [p.file for p in manifest.parts] == [f"data/compacted-00000{i}.parquet" for i in range(3)]
    # shard-id order, a shard never split, a file closed before it would pass 20 rows
    assert [[e.id for e in p.shards] for p in manifest.parts] == [["a", "b", "c"], ["d"], ["e", "f"]]
    assert res.shards == 6 and res.rows == 49 and res.already_compacted == 0
    # the rows moved: data/ holds the compacted files only (g's temporary, a killed write, is cleaned up)
    assert data_names(d) == [f"compacted-00000{i}.parquet" for i in range(3)] and res.removed_sources == 6
    assert root_keys(d) == Counter(list(expected))  # every row once for a reader of the directory
    assert len(list((d / "_vqpipe" / "errors").iterdir())) == 7  # error files stay: they account for samples
    for part in manifest.parts:
        f = pq.ParquetFile(d / part.file)
        assert f.metadata.num_rows == part.rows == sum(e.rows for e in part.shards)
        assert f.schema_arrow.remove_metadata().equals(data_schema.remove_metadata())
        meta = json.loads(f.schema_arrow.metadata[b"vqpipe"])
        assert meta["shard"] is None and meta["compacted"]["shards"] == [e.id for e in part.shards]
        assert meta["patch_nums"] == json.loads(data_schema.metadata[b"vqpipe"])["patch_nums"]
        sizes = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
        assert all(s == 8 for s in sizes[:-1]) and 0 < sizes[-1] <= 8
        keys = f.read(columns=["key"])["key"].to_pylist()
        for e in part.shards:  # each entry's range holds exactly that shard's rows, in its file order
            assert keys[e.offset : e.offset + e.rows] == [f"{e.id}/{i:05d}" for i in range(e.rows)]
    check_rows(d, expected)


@pytest.mark.parametrize("world,num_workers", [(1, 0), (2, 2), (3, 1)])
def test_ranks_and_workers_read_every_row_once_from_compacted_files(out, world, num_workers):
    d, expected = out
    run(d, target_rows=16, row_group_rows=4)
    seen = Counter()
    lengths = set()
    for rank in range(world):
        ds = TokenDataset(str(d), rank=rank, world_size=world, drop_last=True, seed=3, shuffle_buffer=5)
        keys = [k for b in DataLoader(ds, batch_size=4, num_workers=num_workers) for k in b["key"]]
        lengths.add(len(keys))
        seen.update(keys)
    assert lengths == {len(expected) // world} and max(seen.values()) == 1
    assert set(seen) <= set(expected) and len(expected) - len(seen) < world


def test_a_shard_committed_after_compaction_is_read_from_data_then_compacted_incrementally(out):
    d, expected = out
    run(d, target_rows=100)
    first = (d / "data" / "compacted-000000.parquet").read_bytes()
    expected.update(write_out(d, {"h": 7}))  # a later tokenize run commits one more shard
    check_rows(d, expected)
    assert root_keys(d) == Counter(list(expected))
    srcs = read_sources(str(d))
    assert [s.id for s in srcs if s.file_rows is None] == ["h"]
    res = run(d, target_rows=100)
    assert [p.file for p in res.new_parts] == ["data/compacted-000001.parquet"] and res.already_compacted == 6
    assert [e.id for e in res.new_parts[0].shards] == ["h"]
    assert (d / "data" / "compacted-000000.parquet").read_bytes() == first  # never rewritten
    assert run(d).new_parts == []  # nothing new: nothing written
    check_rows(d, expected)
    assert root_keys(d) == Counter(list(expected))


def test_a_shard_committed_again_after_compaction_is_read_from_its_new_data(out):
    d, expected = out
    run(d, target_rows=100)
    # c is tokenized again (e.g. --reprocess-changed): new rows, a new commit (a new `started`)
    new = write_out(d, {"c": 6})
    ledger = Ledger(str(d))
    ledger.mark_done("c", {**ledger.read_done("c").to_json(), "started": 1234.5})
    expected.update(new)
    check_rows(d, expected)
    (src,) = [s for s in read_sources(str(d)) if s.file_rows is not None]
    assert src.ranges == ((0, 11), (17, 49)) and "c" not in src.shards  # c's old rows: not counted
    res = run(d, target_rows=100)  # the old file is rewritten without them, c's new rows packed
    assert res.rewritten_parts == 1 and sorted(e.id for p in res.new_parts for e in p.shards) == list(
        "abcdef"
    )
    assert [p.file for p in manifest_of(d).parts] == [p.file for p in res.new_parts]
    assert "compacted-000000.parquet" not in data_names(d)
    check_rows(d, expected)
    check_rows(d, expected, shuffle=False)
    assert root_keys(d) == Counter(list(expected))


def test_an_out_grown_after_compaction_reads_every_row_once_at_the_root(out):
    d, expected = out
    run(d, target_rows=30)
    expected.update(write_out(d, {"h": 4}))
    assert root_keys(d) == Counter(list(expected)) and data_names(d)[-1] == "h.parquet"
    check_rows(d, expected)
    res = run(d)
    assert res.removed_sources == 1 and not (d / "data" / "h.parquet").exists()
    check_rows(d, expected)
    assert root_keys(d) == Counter(list(expected))


def test_resume_is_exact_on_a_compacted_out_and_a_state_from_before_is_refused(out):
    d, _ = out

    def dataset():
        ds = TokenDataset(str(d), world_size=2, rank=1, seed=7, shuffle_buffer=6)
        ds.set_epoch(1)
        return ds

    before = dataset().state_dict()
    run(d, target_rows=20, row_group_rows=4)
    full = [k for b in DataLoader(dataset(), batch_size=4) for k in b["key"]]
    ds = dataset()
    batches = iter(DataLoader(ds, batch_size=4))
    seen = next(batches)["key"] + next(batches)["key"]
    resumed = dataset()
    resumed.load_state_dict(json.loads(json.dumps(ds.state_dict())))
    assert seen + [k for b in DataLoader(resumed, batch_size=4) for k in b["key"]] == full
    with pytest.raises(ValueError, match="vqpipe compact"):
        dataset().load_state_dict(before)
    # format 2 moves the rows: the data files an epoch begun before compaction read are gone, and say so
    with pytest.raises(StorageError, match=r"a\.parquet.*no such file"):
        TokenDataset(str(d), world_size=2, rank=1, seed=7, shuffle_buffer=6, compacted=False)


def test_files_of_different_settings_are_not_mixed(out):
    d, expected = out
    expected.update(write_out(d, {"ca": 4, "k": 5}, batch=2))  # other file metadata (batch_size), interleaved
    res = run(d)
    assert [[e.id for e in p.shards] for p in res.new_parts] == [["a", "b", "c", "d", "e", "f"], ["ca", "k"]]
    assert {
        json.loads(pq.read_schema(d / p.file).metadata[b"vqpipe"])["batch_size"] for p in res.new_parts
    } == {2, 4}
    check_rows(d, expected)


def test_an_interrupted_compaction_fails_directory_readers_and_the_next_one_finishes_it(out):
    d, expected = out
    run(d, target_rows=20)  # a, b, c / d / e, f
    expected.update(write_out(d, {"h": 4}))
    # killed after writing a file and before its manifest: the marker, a file no manifest lists, a temporary
    (d / "data" / INCOMPLETE_NAME).write_text("moving")
    shutil.copy(d / "data" / "h.parquet", d / "data" / "compacted-000003.parquet")
    (d / "data" / ".tmp-compacted-000004.parquet.1-2").write_bytes(b"half")
    assert len(manifest_of(d).parts) == 3
    check_rows(d, expected)  # vqpipe's readers follow the manifest
    with pytest.raises(Exception, match=INCOMPLETE_NAME):  # any reader of the directory fails, naming it
        pq.read_table(d / "data")
    assert main(["status", str(d)]) == 1  # and status says what to do
    run(d)
    assert data_names(d) == [f"compacted-00000{i}.parquet" for i in (0, 1, 2, 3)]
    assert [e.id for e in manifest_of(d).parts[-1].shards] == ["h"]
    check_rows(d, expected)
    assert root_keys(d) == Counter(list(expected))


def test_compaction_waits_for_or_refuses_a_live_run(out):
    d, _ = out
    with Lease(str(d)) as lease:
        lease.acquire()
        with pytest.raises(LeaseError, match="in use"):
            run(d)
        assert main(["compact", str(d)]) == EXIT_BUSY
    assert manifest_of(d).parts == () and "compacted-000000.parquet" not in data_names(d)
    assert main(["compact", str(d), "--target-rows", "20"]) == EXIT_OK
    assert len(manifest_of(d).parts) == 3


def test_duckdb_and_pyarrow_read_compacted_and_data_files_once(out, capsys):
    duckdb = pytest.importorskip("duckdb")
    d, expected = out
    run(d, target_rows=20)
    expected.update(write_out(d, {"h": 7}))  # read from data/
    new_c = write_out(d, {"c": 6})  # committed again: its old rows in part-000000 must not count
    ledger = Ledger(str(d))
    ledger.mark_done("c", {**ledger.read_done("c").to_json(), "started": 99.0})
    expected.update(new_c)
    srcs = read_sources(str(d))
    sql = duckdb_sql(srcs)
    assert "file_row_number" in sql  # part-000000 is read by ranges
    (n,) = duckdb.sql(f"SELECT count(*) FROM ({sql})").fetchall()[0]
    assert n == len(expected)
    assert main(["compact", str(d), "--sql"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == sql
    rows = duckdb.sql(f"SELECT key, codes FROM ({sql})").fetchall()
    assert sorted(k for k, _ in rows) == sorted(expected)
    for k, codes in rows:
        assert list(codes) == expected[k]["codes"].tolist()
    table = arrow_dataset(srcs).to_table(columns=["key", "codes"])
    assert sorted(table["key"].to_pylist()) == sorted(expected)
    assert Counter(table["key"].to_pylist()) == Counter(k for k, _ in rows)


def test_sql_over_a_compacted_out_is_a_glob_of_data(out):
    duckdb = pytest.importorskip("duckdb")
    d, expected = out
    run(d, target_rows=20)
    (n,) = duckdb.sql(f"SELECT count(*) FROM '{d}/data/*.parquet'").fetchall()[0]
    assert n == len(expected)
    srcs = read_sources(str(d))
    assert all(s.ranges is None and s.file_rows is not None for s in srcs)
    assert arrow_dataset(srcs).count_rows() == len(expected)
    assert pq.read_table(d / "data").num_rows == len(expected)  # the directory reads as a dataset


@pytest.mark.slow
def test_compaction_on_s3(s3):
    url = s3.url("tokens-compact/out")
    opts = s3.storage_options
    expected = write_out(url, {"a": 10, "b": 0, "c": 7}, storage_options=opts)
    compact(CompactOptions(url, target_rows=12, row_group_rows=4, storage_options=opts))
    expected.update(write_out(url, {"d": 5}, storage_options=opts))
    res = compact(CompactOptions(url, storage_options=opts))
    assert [e.id for e in res.new_parts[0].shards] == ["d"] and res.removed_sources == 1
    keys = [k for b in DataLoader(TokenDataset(url, storage_options=opts), batch_size=4) for k in b["key"]]
    assert sorted(keys) == sorted(expected)
    srcs = read_sources(url, opts)
    assert [s.id for s in srcs] == [f"data/compacted-00000{i}.parquet" for i in range(3)]


@pytest.mark.slow
def test_bench_compact_prints_its_table(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    cmd = [
        sys.executable,
        "benchmarks/bench_compact.py",
        "--shards",
        "12",
        "--rows",
        "3",
        "--target-rows",
        "20",
    ]
    cmd += ["--repeats", "1", "--json", str(tmp_path / "r.json")]
    run = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| DuckDB count(*) |" in run.stdout and "| TokenDataset: build + epoch |" in run.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["compacted_files"] == 2 and set(results["results"]) == {
        "DuckDB count(*)",
        "DuckDB full codes scan",
        "pyarrow.dataset count_rows",
        "TokenDataset: build + epoch",
        "TokenDataset: epoch of a built dataset",
    }


def test_other_columns_are_copied_and_read(tmp_path):
    """Columns are copied generically: a later format's `view` column survives compaction."""
    import pyarrow as pa

    d = tmp_path / "o"
    write_out(d, {"a": 5, "b": 3})
    views = {}
    for sid in ("a", "b"):
        path = d / "data" / f"{sid}.parquet"
        f = pq.ParquetFile(path)
        t = f.read()
        v = [{"flip": i % 2 == 1, "crop": [i, 0, 64, 64]} for i in range(t.num_rows)]
        views.update(zip(t["key"].to_pylist(), v))
        t = t.append_column("view", pa.array(v)).replace_schema_metadata(f.schema_arrow.metadata)
        pq.write_table(t, path)
    run(d)
    assert len(manifest_of(d).parts) == 1
    items = list(TokenDataset(str(d), columns=("codes", "view")))
    assert {it["key"]: it["view"] for it in items} == views and len(items) == 8


def test_not_an_out_is_a_usage_error(tmp_path):
    assert main(["compact", str(tmp_path)]) == 2
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a lease


def test_a_compaction_that_fails_midway_commits_nothing_and_the_next_one_recovers(out, monkeypatch):
    import vqpipe.compact

    d, expected = out
    monkeypatch.setattr(vqpipe.compact, "_FOOTER_CHUNK", 2)  # footers read as the files are written
    good = (d / "data" / "f.parquet").read_bytes()
    (d / "data" / "f.parquet").write_bytes(b"not parquet")
    with pytest.raises(StorageError, match="f.parquet: not a readable Parquet file"):
        run(d, target_rows=20)
    assert "compacted-000000.parquet" in data_names(d) and INCOMPLETE_NAME in data_names(d)
    assert manifest_of(d).parts == ()  # never listed: no reader of vqpipe's uses them
    (d / "data" / "f.parquet").write_bytes(good)
    check_rows(d, expected)
    res = run(d, target_rows=20)
    assert [p.file for p in res.new_parts] == [f"data/compacted-00000{i}.parquet" for i in (0, 1, 2)]
    check_rows(d, expected)
    assert root_keys(d) == Counter(list(expected))
