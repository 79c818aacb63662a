"""out/snapshot.py, the one owner of "which rows of an OUT are committed and where", without Ray: commits from
markers and from data files whose marker a crash lost, the index instead of marker reads, damage named up front,
full-read verification and repair, the dataset card, and format-1.1 OUTs (the committed fixture) read as they are
and moved by `vqpipe migrate`."""

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokens import write_out

from vqpipe.cli import main
from vqpipe.compact import CompactOptions, compact
from vqpipe.data import TokenDataset
from vqpipe.errors import ConfigError, StorageError
from vqpipe.ledger import Ledger
from vqpipe.out.card import CARD_NAME
from vqpipe.out.snapshot import Snapshot
from vqpipe.out.verify import forget_damaged, verify
from vqpipe.output_reader import OutputReader

FIXTURE = Path(__file__).parent / "data" / "format-1.1" / "out"
FIXTURE_KEYS = [f"p0/{i:03d}" for i in range(5)] + [f"p1/{i:03d}" for i in range(4)]
FIXTURE_KEYS += [f"p2/{i:03d}" for i in range(3)] + [f"p4/{i:03d}" for i in range(3)]


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    return d, write_out(d, {"a": 7, "b": 0, "c": 5}, rows_per_group=2, uncommitted={"x": 3})


def keys_of(d, **kw):
    return Counter(k for b in TokenDataset(str(d), batch_size=4, **kw) for k in b["key"])


def test_committed_shards_and_their_files(out):
    d, expected = out
    snap = Snapshot.open(str(d))
    assert snap.shard_ids == ["a", "b", "c"] and snap.rows() == [7, 0, 5] and snap.total_rows == 12
    assert [s.id for s in snap.sources()] == ["a", "b", "c"] and not snap.incomplete
    assert snap.unexpected() == [] and snap.missing() == []  # x left only a temporary (a dot name)
    assert keys_of(d) == Counter(list(expected))


def test_a_data_file_whose_marker_a_crash_lost_is_a_commit_and_the_lease_holder_writes_it_again(out):
    d, expected = out
    marker = d / "_vqpipe" / "done" / "c.json"
    written = json.loads(marker.read_text())
    marker.unlink()  # the kill came between the data file (the commit) and its marker
    snap = Snapshot.open(str(d))
    assert snap.shard_ids == ["a", "b", "c"] and not marker.exists()  # a reader writes nothing
    assert snap.committed.record("c").rows == 5
    assert keys_of(d) == Counter(list(expected))
    Snapshot.open(str(d), maintain=True)  # what a run (or compaction) does at its start, under the lease
    again = json.loads(marker.read_text())
    assert {k: again[k] for k in ("shard_id", "rows", "samples", "data_bytes", "error_bytes")} == {
        k: written[k] for k in ("shard_id", "rows", "samples", "data_bytes", "error_bytes")
    }


def test_a_file_vqpipe_did_not_commit_is_not_read_and_is_named(out):
    d, expected = out
    pq.write_table(pq.read_table(d / "data" / "a.parquet"), d / "data" / "stray.parquet")  # no commit record
    snap = Snapshot.open(str(d))
    assert "stray" not in snap.shard_ids and snap.unexpected() == ["stray.parquet"]
    assert keys_of(d) == Counter(list(expected))


def test_planning_an_epoch_reads_no_marker_once_the_index_is_made(out, monkeypatch):
    d, _ = out
    Snapshot.open(str(d), maintain=True)  # a run's start: markers read once, indexed
    reads = []
    real = Ledger.read_done
    monkeypatch.setattr(Ledger, "read_done", lambda self, i: reads.append(i) or real(self, i))
    ds = TokenDataset(str(d), shuffle=False)
    assert reads == [] and len(ds) == 12


def test_a_missing_data_file_is_named_before_any_row_is_read(out, capsys):
    d, _ = out
    (d / "data" / "c.parquet").unlink()
    with pytest.raises(
        StorageError, match=r"data/c\.parquet: no such file \(rows of c\).*--verify.*--repair"
    ):
        TokenDataset(str(d))
    assert main(["status", str(d)]) == 1
    assert "damaged: " in capsys.readouterr().out


def flip_a_bit_in_codes(path: Path) -> None:
    """One bit of a codes page, as bit rot would: the file still opens; without checksums its rows would read."""
    f = pq.ParquetFile(path)
    col = f.schema_arrow.get_field_index("codes")
    chunk = f.metadata.row_group(0).column(col)
    start = chunk.data_page_offset + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[start] ^= 0x10
    path.write_bytes(bytes(data))


def test_verify_finds_bit_rot_truncation_and_loss_and_repair_forgets_those_shards(out, capsys):
    d, expected = out
    flip_a_bit_in_codes(d / "data" / "a.parquet")
    with pytest.raises(StorageError, match=r"a\.parquet"):  # checksums verified on read: never silent
        list(TokenDataset(str(d), shuffle=False))
    data = (d / "data" / "c.parquet").read_bytes()
    (d / "data" / "c.parquet").write_bytes(data[: len(data) // 2])
    snap = Snapshot.open(str(d))
    found = {Path(x.url).name: x.problem for x in verify(snap)}
    assert found == {"a.parquet": "unreadable", "c.parquet": "unreadable"}
    assert main(["status", str(d), "--verify"]) == 1
    text = capsys.readouterr().out
    assert "damaged: " in text and "a.parquet" in text and "c.parquet" in text
    assert sorted(forget_damaged(snap, verify(snap))) == ["a", "c"]
    after = Snapshot.open(str(d))
    assert after.shard_ids == ["b"] and verify(after) == []  # uncommitted: the next run tokenizes them again


def test_status_verify_passes_on_a_sound_out(out):
    d, _ = out
    assert verify(Snapshot.open(str(d))) == []


def test_the_format_1_1_fixture_is_read_as_it_is(tmp_path):
    d = tmp_path / "old"
    shutil.copytree(FIXTURE, d)
    snap = Snapshot.open(str(d))
    assert snap.layout.version == 1
    # shard 5 lost its marker in a 1.x run: never committed there; shards 0-2 were compacted, sources kept
    assert [i.split("-")[1] for i in snap.shard_ids] == ["000000", "000001", "000002", "000004"]
    assert sorted(s.id for s in snap.sources()) == [
        "compacted/part-000000.parquet",
        "compacted/part-000001.parquet",
        "compacted/part-000002.parquet",
        "part-000004-2873cbbb",
    ]
    assert sorted(keys_of(d)) == FIXTURE_KEYS and set(keys_of(d).values()) == {1}
    ds = TokenDataset(str(d), columns=("codes", "label", "var_input"), shuffle=False)
    rows = {r["key"]: r for r in ds}
    assert rows["p0/000"]["codes"].shape == (30,) and rows["p0/000"]["var_input"].shape == (29, 8)
    reader = OutputReader.open(str(d))
    assert sorted(r.key for r in reader.find_keys(["p0/001", "p4/002", "p5/000"])) == ["p0/001", "p4/002"]
    assert reader.errors_by_reason() == {"decode_error": 1}
    assert main(["status", str(d)]) == 1  # shard 3 failed
    with pytest.raises(ConfigError, match="format-1.x"):
        compact(CompactOptions(str(d)))


def test_migrate_moves_the_fixture_to_format_2_where_every_reader_of_the_root_is_exact(tmp_path, capsys):
    d = tmp_path / "old"
    shutil.copytree(FIXTURE, d)
    before = {r["key"]: r["codes"].numpy() for r in TokenDataset(str(d), shuffle=False)}
    assert main(["migrate", str(d)]) == 0
    assert "migrated to format 2: 4 committed shard(s), 3 compacted file(s)" in capsys.readouterr().out
    assert sorted(p.name for p in d.iterdir()) == [CARD_NAME, "_vqpipe", "data"]
    assert sorted(p.name for p in (d / "data").iterdir()) == [
        "compacted-000000.parquet",
        "compacted-000001.parquet",
        "compacted-000002.parquet",
        "part-000004-2873cbbb.parquet",
    ]
    after = {r["key"]: r["codes"].numpy() for r in TokenDataset(str(d), shuffle=False)}
    assert sorted(after) == sorted(before) == FIXTURE_KEYS
    assert all(np.array_equal(after[k], before[k]) for k in before)
    table = pq.read_table(d)  # the root itself: pyarrow skips _vqpipe/ and the card
    assert sorted(table["key"].to_pylist()) == FIXTURE_KEYS
    assert main(["status", str(d), "--verify"]) == 1  # complete but for shard 3, which failed
    assert main(["migrate", str(d)]) == 2  # once is enough


def test_tokenize_into_a_format_1_out_asks_for_migrate_before_touching_it(tmp_path, caplog):
    d = tmp_path / "old"
    shutil.copytree(FIXTURE, d)
    before = sorted(p.relative_to(d) for p in d.rglob("*"))
    shard = tmp_path / "in.tar"
    shard.write_bytes(b"")
    args = ["tokenize", str(shard), "-o", str(d), "--model", "tiny", "--random-weights"]
    assert main(args) == 2
    assert "vqpipe migrate" in caplog.text
    assert sorted(p.relative_to(d) for p in d.rglob("*")) == before
