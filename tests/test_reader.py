"""vqpipe.reader and the worker's accounting: every tar member is in a sample or counted as ignored, nothing a
sample contains fails its shard, a tar without its end-of-archive marker is refused, and the done marker
names the version of the input that was read. Real tars from Python's tarfile and from GNU tar."""

from __future__ import annotations

import bz2
import dataclasses
import errno
import gzip
import io
import lzma
import os
import struct
import subprocess
import tarfile
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
from shards import _tar_bytes, corrupt_jpeg_bytes, defect_samples, good_image_bytes

from vqpipe import reader, storage
from vqpipe.cli import main
from vqpipe.config import RunConfig
from vqpipe.errors import ShardError
from vqpipe.out.snapshot import Snapshot
from vqpipe.plan import Shard
from vqpipe.reader import ReadStats, iter_samples
from vqpipe.schema import ERROR_SCHEMA
from vqpipe.status import read_status
from vqpipe.writer import ShardWriter

JPG = good_image_bytes(1, "jpg", (16, 12))
PNG = good_image_bytes(2, "png", (12, 16))


def read_all(data: bytes, **kwargs) -> tuple[list[reader.RawSample], ReadStats]:
    stats = ReadStats()
    return list(iter_samples(io.BytesIO(data), "shard", stats, **kwargs)), stats


def outcome(samples) -> dict[str, str | None]:
    return {s.key: (s.error.reason if s.error else None) for s in samples}


def tar_of(
    members: list[tuple[str | bytes, bytes | None]], fmt=tarfile.GNU_FORMAT, links: list[tarfile.TarInfo] = ()
) -> bytes:
    """(name, bytes) regular members, then `links` (link TarInfos); bytes None: a directory. Names as bytes may
    be any bytes (not UTF-8)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members:
            if isinstance(name, bytes):
                name = name.decode("utf-8", "surrogateescape")
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for link in links:
            tar.addfile(link)
    return buf.getvalue()


@pytest.fixture(scope="module")
def worker(tiny_worker):
    return tiny_worker  # conftest.py: shared with the fuzz (tests/test_reader_fuzz.py)


def process(worker, path, shard_id=None, **kwargs) -> dict:
    shard_id = shard_id or path.name.split(".")[0]
    return worker.process(Shard(shard_id, str(path), storage.input_version(str(path))), **kwargs).to_json()


def error_table(worker, shard_id):
    return pq.read_table(worker.ledger.errors_url(shard_id)).to_pylist()


# -- one sample never fails its shard ---------------------------------------------------------------------------


def test_labels_outside_int64_are_a_sample_error_and_the_extremes_are_kept():
    data = tar_of(
        [
            ("a.jpg", JPG),
            ("a.cls", str(2**63).encode()),
            ("b.jpg", JPG),
            ("b.cls", str(2**63 - 1).encode()),
            ("c.jpg", JPG),
            ("c.cls", str(-(2**63)).encode()),
            ("d.jpg", JPG),
            ("d.cls", str(-(2**63) - 1).encode()),
        ]
    )
    samples, _ = read_all(data)
    assert outcome(samples) == {"a": "bad_metadata", "b": None, "c": None, "d": "bad_metadata"}
    assert [s.label for s in samples if not s.error] == [2**63 - 1, -(2**63)]
    assert "outside int64" in samples[0].error.detail


def test_case_different_suffixes_and_non_utf8_keys_are_sample_errors_with_the_raw_bytes(worker, tmp_path):
    data = tar_of(
        [
            ("x_0.jpg", JPG),
            ("x_0.JPG", JPG),
            (b"caf\xe9_1.jpg", JPG),  # Latin-1, not UTF-8
            ("caf\u00e9_2.jpg", JPG),  # UTF-8: a normal key
            ("ok_3.png", PNG),
        ]
    )
    (tmp_path / "names.tar").write_bytes(data)
    record = process(worker, tmp_path / "names.tar")
    assert (record["samples"], record["rows"], record["errors"]) == (4, 2, 2)
    assert record["errors_by_reason"] == {"bad_key": 1, "duplicate_member": 1}
    errors = {e["key"]: e for e in error_table(worker, "names")}
    assert errors["x_0"]["reason"] == "duplicate_member" and "x_0.JPG" in errors["x_0"]["detail"]
    bad = errors["caf\\xe9_1"]
    assert bad["reason"] == "bad_key" and bad["key_raw"] == b"caf\xe9_1"
    assert bad["key_raw"].decode("utf-8", "surrogateescape").encode("utf-8", "backslashreplace") != b""
    assert errors["x_0"]["key_raw"] is None
    rows = pq.read_table(worker.ledger.data_url("names"), columns=["key"]).column("key").to_pylist()
    assert rows == ["caf\u00e9_2", "ok_3"]
    assert pq.read_schema(worker.ledger.errors_url("names")).equals(ERROR_SCHEMA)


def test_a_few_bad_samples_do_not_fail_a_small_shard_and_many_still_do(worker, tmp_path, monkeypatch):
    """The default rate (10 %) counts only from run.min_errors_to_fail (10) bad samples on."""
    defaults = dataclasses.replace(worker.config, run=RunConfig())
    monkeypatch.setattr(worker, "config", defaults)
    (tmp_path / "one.tar").write_bytes(tar_of([("k.jpg", corrupt_jpeg_bytes(1))]))
    link = tarfile.TarInfo("k_3.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "nowhere.jpg"
    (tmp_path / "four.tar").write_bytes(tar_of([(f"k_{i}.jpg", JPG) for i in range(3)], links=[link]))
    assert process(worker, tmp_path / "one.tar")["errors_by_reason"] == {"decode_error": 1}
    four = process(worker, tmp_path / "four.tar")
    assert (four["rows"], four["errors_by_reason"]) == (3, {"unresolved_link": 1})

    many = [(f"b_{i}.jpg", corrupt_jpeg_bytes(i)) for i in range(10)]
    many += [(f"g_{i}.jpg", JPG) for i in range(10)]
    (tmp_path / "many.tar").write_bytes(tar_of(many))
    with pytest.raises(ShardError) as e:  # 10 of 20: the rate applies
        process(worker, tmp_path / "many.tar")
    assert e.value.reason == "too_many_errors" and "10 of 20 samples failed" in e.value.detail
    assert not worker.ledger.is_done("many")

    rate_alone = dataclasses.replace(defaults, run=RunConfig(min_errors_to_fail=1))
    monkeypatch.setattr(worker, "config", rate_alone)
    with pytest.raises(ShardError, match="too_many_errors"):
        process(worker, tmp_path / "one.tar", shard_id="one-again")


def test_a_row_arrow_refuses_becomes_a_sample_error_and_the_batch_keeps_the_others(worker, tmp_path):
    layout = worker.encoder.layout
    schema = pq.read_schema(worker.ledger.data_url("names"))
    writer = ShardWriter(str(tmp_path / "d.parquet"), str(tmp_path / "e.parquet"), schema, 10)
    codes = np.zeros((3, layout.seq_len), layout.code_dtype)
    var_input = np.zeros((3, *layout.var_input_shape), np.float16) if layout.var_input else None
    with writer:
        writer.write(["k0", "k\udcff1", "k2"], [1, 2, 3], [None, None, "m"], codes, var_input)
        writer.commit()
    assert pq.read_table(tmp_path / "d.parquet").column("key").to_pylist() == ["k0", "k2"]
    [error] = pq.read_table(tmp_path / "e.parquet").to_pylist()
    assert (error["key"], error["reason"], error["key_raw"]) == ("k\\xff1", "sample_error", b"k\xff1")


# -- every member accounted --------------------------------------------------------------------------------------


def gnu_tar(tmp_path) -> tuple[bytes, list[str]]:
    """A shard made by GNU tar from a directory with hard links, a symlink, a README, a hidden file, a
    subdirectory and a FIFO; returns its bytes and what `tar t` lists."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a_0.jpg").write_bytes(JPG)
    (src / "a_0.cls").write_bytes(b"7")
    os.link(src / "a_0.jpg", src / "a_1.jpg")  # GNU tar stores the second name as a hard link
    os.link(src / "a_0.cls", src / "a_1.cls")
    os.symlink("a_0.jpg", src / "a_2.jpg")
    os.symlink("/etc/hostname", src / "a_3.jpg")  # never followed outside the tar
    (src / "README").write_text("about this shard\n")
    (src / ".hidden.jpg").write_bytes(JPG)
    (src / "sub" / "b_0.png").write_bytes(PNG)
    os.mkfifo(src / "pipe")
    names = [
        "a_0.cls",
        "a_0.jpg",
        "a_1.cls",
        "a_1.jpg",
        "a_2.jpg",
        "a_3.jpg",
        "README",
        ".hidden.jpg",
        "sub",
        "pipe",
    ]
    out = tmp_path / "gnu.tar"
    subprocess.run(["tar", "-cf", str(out), "-C", str(src), *names], check=True)
    listed = subprocess.run(["tar", "-tf", str(out)], check=True, capture_output=True, text=True).stdout
    return out.read_bytes(), listed.splitlines()


def test_gnu_tar_links_are_resolved_and_every_listed_member_is_accounted(tmp_path):
    data, listed = gnu_tar(tmp_path)
    samples, stats = read_all(data)
    assert stats.members == len(listed) == 11
    assert outcome(samples) == {
        "a_0": None,
        "a_1": None,
        "a_2": None,
        "a_3": "unresolved_link",
        "sub/b_0": None,
    }
    by_key = {s.key: s for s in samples}
    assert by_key["a_1"].image == by_key["a_2"].image == JPG and by_key["a_1"].label == 7
    assert stats.ignored == {"no_extension": 1, "dot_name": 1, "directory": 1, "special_file": 1}
    assert stats.sample_members + sum(stats.ignored.values()) == stats.members


@pytest.mark.parametrize("maker", ["gnu", "python"])
def test_links_resolve_in_a_tar_of_dot_with_dot_slash_names(maker, tmp_path):
    """`tar -C src -cf x.tar .` names every member `./...`; link targets are `a.jpg`, `../a.jpg`, `./a.jpg`."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(JPG)
    (src / "a.cls").write_bytes(b"7")
    (src / "b.jpg").symlink_to("a.jpg")
    (src / "sub" / "c.jpg").symlink_to("../a.jpg")
    os.link(src / "a.jpg", src / "d.jpg")  # stored as a hard link to the first name, `./a.jpg`
    out = tmp_path / "dot.tar"
    if maker == "gnu":
        subprocess.run(["tar", "--sort=name", "-C", str(src), "-cf", str(out), "."], check=True)
    else:
        with tarfile.open(out, "w") as tar:
            tar.add(src, arcname=".")
    with tarfile.open(out) as tar:
        names = {m.name: m for m in tar.getmembers()}
    assert names["./b.jpg"].issym() and names["./sub/c.jpg"].issym()
    assert any(m.islnk() for m in names.values())
    samples, stats = read_all(out.read_bytes())
    assert outcome(samples) == {k: None for k in ("./a", "./b", "./d", "./sub/c")}
    assert all(s.image == JPG for s in samples)
    assert stats.members == len(names)


def test_a_link_whose_target_left_the_window_is_an_error_not_a_loss(monkeypatch, tmp_path):
    monkeypatch.setattr(reader, "LINK_CACHE_MEMBERS", 2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(4):
            info = tarfile.TarInfo(f"k_{i}.jpg")
            info.size = len(JPG)
            tar.addfile(info, io.BytesIO(JPG))
        for i, target in ((4, "k_0.jpg"), (5, "k_3.jpg")):
            link = tarfile.TarInfo(f"k_{i}.jpg")
            link.type, link.linkname = tarfile.LNKTYPE, target
            tar.addfile(link)
    samples, stats = read_all(buf.getvalue())
    assert outcome(samples)["k_4"] == "unresolved_link" and outcome(samples)["k_5"] is None
    assert len(samples) == stats.members == 6


def test_done_marker_and_status_count_ignored_members(worker, tmp_path, capsys):
    data, listed = gnu_tar(tmp_path)
    (tmp_path / "gnu.tar").write_bytes(data)
    record = process(worker, tmp_path / "gnu.tar")
    assert record["members"] == len(listed)
    assert record["ignored_members"] == 4
    assert record["ignored_by_reason"] == {
        "directory": 1,
        "dot_name": 1,
        "no_extension": 1,
        "special_file": 1,
    }
    assert record["rows"] + record["errors"] == record["samples"] == 5
    status = read_status(Snapshot.open(worker.config.output, require_run=False)).to_dict()
    assert status["ignored_members"] >= 4 and status["ignored_by_reason"]["special_file"] >= 1
    main(["status", worker.config.output])
    assert f"ignored: {status['ignored_members']} tar members in no sample" in capsys.readouterr().out


# -- the end-of-archive marker ----------------------------------------------------------------------------------


def member_ends(data: bytes) -> list[int]:
    """Byte offsets where each member (header + padded data) ends: cutting there leaves a valid-looking tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset_data + -(-m.size // 512) * 512 for m in tar.getmembers()]


@pytest.mark.parametrize("maker", ["python", "gnu"])
def test_a_tar_cut_at_a_block_boundary_is_truncated_unless_allowed(maker, tmp_path):
    samples, _ = defect_samples(4)
    if maker == "python":
        data = _tar_bytes(samples)
    else:
        src = tmp_path / "src"
        src.mkdir()
        for s in samples[:6]:
            for suffix, value in s.items():
                if not suffix.startswith("__"):
                    (src / f"{s['__key__']}.{suffix}").write_bytes(value)
        subprocess.run(["tar", "-cf", str(tmp_path / "g.tar"), "-C", str(src), "."], check=True)
        data = (tmp_path / "g.tar").read_bytes()
    full, _ = read_all(data)
    ends = member_ends(data)
    cut = ends[len(ends) // 2]
    with pytest.raises(ShardError) as e:
        read_all(data[:cut])
    assert e.value.reason == "truncated_tar" and "end-of-archive" in e.value.detail
    kept, _ = read_all(data[:cut], allow_unterminated=True)
    assert 0 < len(kept) < len(full)
    with pytest.raises(ShardError, match="truncated_tar"):  # inside a header: cut short even when allowed
        read_all(data[: cut + 100], allow_unterminated=True)
    with pytest.raises(ShardError, match="truncated_tar"):  # one zero block of the two
        read_all(data[: ends[-1] + 512])
    assert len(read_all(data[: ends[-1] + 1024])[0]) == len(full)  # exactly the marker, no record padding


def test_a_corrupt_header_mid_tar_fails_the_shard_as_bad_tar():
    data = bytearray(tar_of([("a.jpg", JPG), ("b.jpg", JPG), ("c.jpg", JPG)]))
    second = member_ends(bytes(data))[0]
    data[second + 148 : second + 156] = b"1234567\x00"  # a wrong header checksum
    with pytest.raises(ShardError) as e:
        read_all(bytes(data))
    assert e.value.reason == "bad_tar"


def test_gzipped_tars_are_read_and_also_need_the_marker():
    data = tar_of([("a.jpg", JPG), ("b.png", PNG)])
    assert len(read_all(gzip.compress(data))[0]) == 2
    with pytest.raises(ShardError, match="truncated_tar"):
        read_all(gzip.compress(data[: member_ends(data)[0]]))


# -- compressed tars: the format's own checks, to the last byte ----------------------------------------------------

COMPRESSORS = {
    # level 0 stores the tar's bytes as they are: a flipped bit there still inflates, into a different tar
    "gzip": lambda data: gzip.compress(data, compresslevel=0, mtime=0),
    "bzip2": bz2.compress,
    "xz": lzma.compress,
    "lzma": lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
}


def flip_a_bit(packed: bytes) -> bytes:
    """`packed` with one bit flipped: inside the JPEG's bytes where they are stored as they are (gzip level 0,
    so the damage inflates into a tar with one byte changed), else in the middle."""
    at = packed.find(JPG)
    at = at + len(JPG) // 2 if at >= 0 else len(packed) // 2
    return packed[:at] + bytes([packed[at] ^ 0x10]) + packed[at + 1 :]


def gzip_trailer(packed: bytes, crc: int | None = None, size: int | None = None) -> bytes:
    """`packed` with its gzip trailer's CRC32 or length (ISIZE) replaced."""
    old_crc, old_size = struct.unpack("<II", packed[-8:])
    crc, size = old_crc if crc is None else crc, old_size if size is None else size
    return packed[:-8] + struct.pack("<II", crc, size)


@pytest.mark.parametrize(
    "fmt, damage, reason",
    [
        ("gzip", "cut 8", "truncated_tar"),  # the whole trailer: the tar inside is complete
        ("gzip", "cut 1", "truncated_tar"),
        ("gzip", "wrong crc", "bad_tar"),
        ("gzip", "wrong length", "bad_tar"),
        ("gzip", "flipped bit", "bad_tar"),  # inflates, into a tar with one byte changed
        ("gzip", "junk after", "bad_tar"),
        ("bzip2", "cut 8", "truncated_tar"),
        ("bzip2", "flipped bit", "bad_tar"),
        ("xz", "cut 8", "truncated_tar"),
        ("xz", "flipped bit", "bad_tar"),
        ("lzma", "cut 8", "truncated_tar"),
    ],
)
def test_a_damaged_compressed_tar_is_never_read_as_good(fmt, damage, reason):
    data = tar_of([("a.jpg", JPG), ("b.png", PNG), ("c.cls", b"3")])
    packed = COMPRESSORS[fmt](data)
    assert outcome(read_all(packed)[0]) == {"a": None, "b": None, "c": "missing_image"}
    damaged = {
        "cut 8": lambda: packed[:-8],
        "cut 1": lambda: packed[:-1],
        "wrong crc": lambda: gzip_trailer(packed, crc=zlib.crc32(data) ^ 1),
        "wrong length": lambda: gzip_trailer(packed, size=len(data) + 512),
        "flipped bit": lambda: flip_a_bit(packed),
        "junk after": lambda: packed + b"junk",
    }[damage]()
    with pytest.raises(ShardError) as e:
        read_all(damaged)
    assert e.value.reason == reason and e.value.detail.startswith("shard: ") and fmt[:2] in e.value.detail


def test_compressed_tars_may_be_concatenated_streams_and_end_in_zeros():
    """What pigz/pbzip2 and tape padding write: several streams one after the other, zero bytes at the end."""
    data = tar_of([("a.jpg", JPG), ("b.png", PNG)])
    half = member_ends(data)[0]
    for compress in (gzip.compress, bz2.compress, lzma.compress):
        assert len(read_all(compress(data[:half]) + compress(data[half:]))[0]) == 2
    assert len(read_all(gzip.compress(data) + bytes(1000))[0]) == 2


class FailingRead(io.BytesIO):
    """Bytes whose read fails after `at` of them with an OSError, as a disk's read error does."""

    def __init__(self, data: bytes, at: int) -> None:
        super().__init__(data)
        self.at = at

    def readinto(self, buffer) -> int:
        if self.tell() >= self.at:
            raise OSError(errno.EIO, "Input/output error")
        return super().readinto(memoryview(buffer)[: self.at - self.tell()])


def test_a_failed_read_of_a_compressed_shard_is_not_taken_for_corrupt_data():
    """gzip's own errors are OSErrors too; a read that failed must not become `bad_tar`, a permanent reason
    (never retried): the next read may succeed."""
    packed = gzip.compress(tar_of([(f"k_{i}.jpg", JPG) for i in range(6)]))
    with pytest.raises(OSError) as e:
        list(iter_samples(FailingRead(packed, len(packed) // 2), "shard"))
    assert e.value.errno == errno.EIO and not isinstance(e.value, ShardError)


def test_a_gzipped_shard_cut_short_commits_nothing(worker, tmp_path):
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(gzip.compress(tar_of([(f"k_{i}.jpg", JPG) for i in range(6)]))[:-8])
    with pytest.raises(ShardError) as e:
        process(worker, path)
    assert e.value.reason == "truncated_tar" and e.value.detail.startswith("cut: ")
    assert not worker.ledger.is_done("cut")
    assert not os.path.exists(worker.ledger.data_url("cut"))


# -- the done marker names what was read ---------------------------------------------------------------------------


def test_the_done_marker_records_the_fingerprint_read_not_the_planned_one(worker, tmp_path):
    path = tmp_path / "fp.tar"
    path.write_bytes(tar_of([("a.jpg", JPG)]))
    stale = {"size": 1, "mtime": 0.0}  # as if planned before the file was replaced
    record = worker.process(Shard("fp", str(path), stale))
    assert record.input.fingerprint == storage.input_version(str(path)) != stale


def test_an_input_changed_while_read_fails_the_attempt_and_commits_nothing(worker, tmp_path):
    path = tmp_path / "moving.tar"
    path.write_bytes(tar_of([(f"k_{i}.jpg", JPG) for i in range(9)]))

    def touch(_n):  # the file is rewritten while the shard is being read
        os.utime(path, ns=(0, 1_000_000_000 * 1_600_000_000 + 1))

    with pytest.raises(ShardError) as e:
        process(worker, path, on_progress=touch)
    assert e.value.reason == "input_changed"
    assert not worker.ledger.is_done("moving")
    assert process(worker, path)["rows"] == 9  # the retry reads one version and commits it
