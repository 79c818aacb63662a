"""Property-based fuzzing of tar contents through the real worker (reader -> preprocess -> tiny encoder ->
writer -> done marker): random member names (also not UTF-8), bytes, extensions, labels and metadata,
duplicates, links, directories and FIFOs. Whatever a tar holds, its shard commits and
  - samples = rows + error records (and the files hold exactly those),
  - every member `tarfile` lists is in a sample or counted as ignored, by the reason the tar was built with,
  - a well-formed sample is a row with its label, and a key that is not UTF-8 keeps its exact bytes.
Derandomized, so every run tries the same examples: 50 in the unit layer (Hypothesis profile "fuzz-unit"), 500
in the full suite (profile "fuzz-full", marked slow); VQPIPE_FUZZ_EXAMPLES sets the larger count. The encoder
is the real tiny model, memoized per distinct image (the pool has six), so 500 shards fit in CI.

Compressed tars (`.tar.gz`, and bzip2 and xz, which the reader also accepts) are fuzzed as bytes: such a tar is
compressed, then its compressed bytes are damaged (bits flipped, cut short, zeroed, repeated, inserted, junk
appended; or left whole). The shard either commits, and then the format's own one-shot decompression accepts
the file, gives the tar that was built, and the invariants above hold; or it fails with a tar reason
(`truncated_tar`, `bad_tar`, `not_a_tar`) and leaves nothing in OUT. Never another exception, never a hang (a
time limit per test). 25 examples in the unit layer, 300 in the full suite (VQPIPE_FUZZ_COMPRESSED_EXAMPLES).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import itertools
import lzma
import os
import re
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from shards import good_image_bytes

from vqpipe import storage
from vqpipe.errors import ShardError
from vqpipe.plan import Shard

_FUZZ = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("fuzz-unit", max_examples=50, **_FUZZ)
settings.register_profile(
    "fuzz-full", max_examples=int(os.environ.get("VQPIPE_FUZZ_EXAMPLES", "500")), **_FUZZ
)
settings.register_profile("fuzz-unit-compressed", max_examples=25, **_FUZZ)
settings.register_profile(
    "fuzz-full-compressed",
    max_examples=int(os.environ.get("VQPIPE_FUZZ_COMPRESSED_EXAMPLES", "300")),
    **_FUZZ,
)
IMAGES = {
    "jpg": [good_image_bytes(s, "jpg", (8 + s, 10)) for s in range(3)],
    "png": [good_image_bytes(s, "png", (10, 6 + s), mode) for s, mode in enumerate(["RGB", "L", "RGBA"])],
}
IMAGE_SUFFIXES = ["jpg", "JPG", "jpeg", "png", "PNG", "webp"]
OTHER_SUFFIXES = ["cls", "json", "txt", "CLS", "seg.png", "bin", "pickle", "pyd"]
_counter = itertools.count()


@dataclass
class Member:
    name: bytes
    kind: str  # file | dir | hardlink | symlink | fifo
    data: bytes = b""
    link: bytes = b""
    ignored: str | None = None  # the reason the reader must count it under, or None: part of a sample
    key: bytes | None = None


# -- strategies ------------------------------------------------------------------------------------------------

ascii_keys = st.text("abcXYZ019_-", min_size=1, max_size=8)
unicode_keys = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="./\x00"), min_size=1, max_size=6
)
raw_keys = st.binary(min_size=1, max_size=6).map(lambda b: re.sub(rb"[./\0]", b"_", b))
keys = st.one_of(
    ascii_keys.map(str.encode),
    unicode_keys.map(str.encode),
    raw_keys,
    st.tuples(st.sampled_from([b"sub/", b"a/b/"]), ascii_keys.map(str.encode)).map(b"".join),
).map(lambda k: b"k" + k if k.startswith(b"__") else k)  # `__x__` names are WebDataset's own
suffixes = st.one_of(
    st.sampled_from(IMAGE_SUFFIXES + OTHER_SUFFIXES).map(str.encode),
    st.binary(min_size=1, max_size=5).map(lambda b: re.sub(rb"[/\0]", b"_", b)),
)
labels = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.integers(-(2**70), 2**70), st.sampled_from([2**63, -(2**63) - 1])
).map(lambda n: str(n).encode())
contents = st.one_of(
    st.sampled_from(IMAGES["jpg"] + IMAGES["png"]),
    st.binary(max_size=64),
    labels,
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.just(b""),
)


@st.composite
def sample_members(draw) -> list[Member]:
    key = draw(keys)
    chosen = draw(st.lists(suffixes, min_size=1, max_size=4))
    members = []
    for suffix in chosen:
        lower = suffix.decode("utf-8", "surrogateescape").lower()
        if lower in ("jpg", "jpeg") and draw(st.booleans()):
            data = draw(st.sampled_from(IMAGES["jpg"]))
        elif lower == "png" and draw(st.booleans()):
            data = draw(st.sampled_from(IMAGES["png"]))
        elif lower == "cls" and draw(st.booleans()):
            data = draw(labels)
        else:
            data = draw(contents)
        members.append(Member(key + b"." + suffix, "file", data, key=key))
    return members


@st.composite
def good_sample(draw) -> list[Member]:
    key = draw(st.one_of(ascii_keys, unicode_keys)).encode()
    fmt = draw(st.sampled_from(["jpg", "png"]))
    members = [Member(key + b"." + fmt.encode(), "file", draw(st.sampled_from(IMAGES[fmt])), key=key)]
    if draw(st.booleans()):
        members.append(
            Member(key + b".cls", "file", draw(labels), key=key)  # in int64 or not
        )
    if draw(st.booleans()):
        members.append(Member(key + b".json", "file", b'{"caption": "\xc3\xa9t\xc3\xa9"}', key=key))
    return draw(st.permutations(members))


strays = st.sampled_from(
    [
        Member(b"README", "file", b"readme", ignored="no_extension"),
        Member(b"sub/noext", "file", b"x", ignored="no_extension"),
        Member(b"trailing.", "file", b"x", ignored="no_extension"),
        Member(b".hidden.jpg", "file", IMAGES["jpg"][0], ignored="dot_name"),
        Member(b"sub/.x.cls", "file", b"1", ignored="dot_name"),
        Member(b"adir", "dir", ignored="directory"),
        Member(b"adir/nested", "dir", ignored="directory"),
        Member(b"fifo.jpg", "fifo", ignored="special_file"),
        Member(b"__meta__", "file", b"{}", ignored="webdataset_meta"),
    ]
)


@st.composite
def shard_members(draw) -> list[Member]:
    members: list[Member] = []
    for group in draw(
        st.lists(st.one_of(good_sample(), sample_members(), strays.map(lambda m: [m])), max_size=7)
    ):
        members.extend(group)
    files = [m for m in members if m.kind == "file" and m.ignored is None]
    for _ in range(draw(st.integers(0, 2))):  # links: to an earlier member, or to nothing in the tar
        key = draw(keys)
        target = draw(st.sampled_from([m.name for m in files] + [b"nowhere.jpg"])) if files else b"x.jpg"
        kind = draw(st.sampled_from(["hardlink", "symlink"]))
        at = draw(st.integers(0, len(members)))
        members.insert(at, Member(key + b".jpg", kind, link=target, key=key))
    return members


# -- the tar and what it must give -------------------------------------------------------------------------------


def tar_bytes(members: list[Member], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for m in members:
            info = tarfile.TarInfo(m.name.decode("utf-8", "surrogateescape"))
            info.type = {
                "file": tarfile.REGTYPE,
                "dir": tarfile.DIRTYPE,
                "hardlink": tarfile.LNKTYPE,
                "symlink": tarfile.SYMTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[m.kind]
            info.linkname = m.link.decode("utf-8", "surrogateescape")
            info.size = len(m.data) if m.kind == "file" else 0
            tar.addfile(info, io.BytesIO(m.data) if m.kind == "file" else None)
    return buf.getvalue()


def expected_samples(members: list[Member]) -> list[bytes]:
    """Keys of the samples, in order: runs of members with the same key (ignored members in between do not
    end a run)."""
    keys = [m.key for m in members if m.ignored is None]
    return [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]


def well_formed(members: list[Member], key: bytes, keys: list[bytes]) -> tuple[bool, int | None]:
    """True for a sample that must become a row: a UTF-8 key seen once, plain files with distinct suffixes,
    exactly one image member and it is a real jpg/png, a label in int64 if any, UTF-8 json/txt if any."""
    mine = [m for m in members if m.key == key]
    if keys.count(key) != 1 or any(m.kind != "file" for m in mine):
        return False, None
    try:
        key.decode("utf-8")
        by_suffix = {}
        for m in mine:
            suffix = m.name[len(key) + 1 :].decode("utf-8").lower()
            if suffix in by_suffix:
                return False, None
            by_suffix[suffix] = m.data
    except UnicodeDecodeError:
        return False, None
    images = [s for s in by_suffix if s in ("jpg", "jpeg", "png", "webp")]
    if len(images) != 1 or by_suffix[images[0]] not in IMAGES["jpg"] + IMAGES["png"]:
        return False, None
    label = None
    try:
        if "cls" in by_suffix:
            label = int(by_suffix["cls"].decode("ascii"))
            if not -(2**63) <= label < 2**63:
                return False, None
        for meta in ("json", "txt"):
            if meta in by_suffix:
                by_suffix[meta].decode("utf-8")
    except (UnicodeDecodeError, ValueError):
        return False, None
    return True, label


class MemoEncoder:
    """The real encoder, run once per distinct image: rows get real codes, and the fuzz stays fast."""

    def __init__(self, real):
        self.real, self.memo = real, {}

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __call__(self, pixels, timer=None):
        out = []
        for image in pixels:
            digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()
            if digest not in self.memo:
                self.memo[digest] = self.real(image[None], timer=timer)
            out.append(self.memo[digest])
        var_input = None if out[0][1] is None else np.concatenate([v for _, v in out])
        return np.concatenate([c for c, _ in out]), var_input


@pytest.fixture(scope="module")
def worker(tiny_worker):
    """conftest.py's worker (OUT on tmpfs), its encoder memoized; the tars go beside its OUT."""
    real = tiny_worker.encoder
    tiny_worker.encoder = MemoEncoder(real)
    tiny_worker.tars = Path(tiny_worker.config.inputs[0]) / "tars"
    tiny_worker.tars.mkdir()
    yield tiny_worker
    tiny_worker.encoder = real


tar_formats = st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])


@settings(settings.get_profile("fuzz-unit"))
@given(members=shard_members(), fmt=tar_formats)
def test_every_sample_is_a_row_or_an_error_and_every_member_is_accounted(worker, members, fmt):
    check_shard(worker, members, fmt)


@pytest.mark.slow
@settings(settings.get_profile("fuzz-full"))
@given(members=shard_members(), fmt=tar_formats)
def test_every_sample_is_a_row_or_an_error_and_every_member_is_accounted_500(worker, members, fmt):
    check_shard(worker, members, fmt)


def check_shard(worker, members: list[Member], fmt: int) -> None:
    shard_id = f"fuzz-{next(_counter):05d}"
    path = worker.tars / f"{shard_id}.tar"
    path.write_bytes(tar_bytes(members, fmt))

    record = worker.process(Shard(shard_id, str(path), storage.input_version(str(path)))).to_json()
    check_committed(worker, shard_id, record, path.read_bytes(), members)


def check_committed(worker, shard_id: str, record: dict, tar: bytes, members: list[Member]) -> None:
    """A committed shard against the tar it was read from and the members that tar was built from."""
    # `tar t`, read independently of vqpipe (random access, not a stream)
    with tarfile.open(fileobj=io.BytesIO(tar)) as listing:
        listed = listing.getmembers()
    assert record["members"] == len(listed) == len(members)
    assert record["ignored_by_reason"] == dict(Counter(m.ignored for m in members if m.ignored))
    samples = expected_samples(members)
    assert record["samples"] == len(samples)
    assert record["rows"] + record["errors"] == record["samples"]
    rows = pq.read_table(worker.ledger.data_url(shard_id), columns=["key", "label"]).to_pylist()
    errors = pq.read_table(worker.ledger.errors_url(shard_id)).to_pylist()
    assert (len(rows), len(errors)) == (record["rows"], record["errors"])

    row_labels = {r["key"].encode(): r["label"] for r in rows}
    error_keys = Counter(e["key_raw"] or e["key"].encode() for e in errors)
    row_keys = Counter(r["key"].encode() for r in rows)
    assert row_keys + error_keys == Counter(samples)  # each sample once, under its exact key bytes
    for key in set(samples):
        ok, label = well_formed(members, key, samples)
        if ok:
            event("well-formed sample")
            assert row_labels.get(key, "missing") == label, (key, errors)
    for reason in sorted({e["reason"] for e in errors} | set(record["ignored_by_reason"])):
        event(reason)  # pytest --hypothesis-show-statistics: how often each case came up
    if any(m.kind == "hardlink" for m in members) and rows:
        event("hardlink in a shard with rows")
    for e in errors:
        assert e["reason"] and e["detail"]
        if e["key_raw"] is not None:
            assert e["key"] == e["key_raw"].decode("utf-8", "backslashreplace")


# -- compressed tars, damaged as bytes ----------------------------------------------------------------------------

COMPRESSORS = {
    "gzip": (".tar.gz", lambda data: gzip.compress(data, mtime=0), gzip.decompress),
    "bzip2": (".tar.bz2", bz2.compress, bz2.decompress),
    "xz": (".tar.xz", lzma.compress, lzma.decompress),
}
# How the format's own one-shot decompression refuses damaged bytes.
_REFUSED = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)

damages = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 2**20), st.just(0)),
    # where gzip keeps its CRC32 and length, and bzip2/xz their stream ends: a copy cut off, a bad last block
    st.tuples(st.just("cut end"), st.integers(1, 16), st.just(0)),
    st.tuples(st.just("flip end"), st.integers(1, 16), st.integers(0, 7)),
    st.tuples(st.just("zero"), st.integers(0, 2**20), st.integers(1, 64)),
    st.tuples(st.just("repeat"), st.integers(0, 2**20), st.integers(1, 600)),
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.integers(1, 32)),
    st.tuples(st.just("append"), st.integers(0, 255), st.integers(1, 32)),
)


def damaged(data: bytes, changes: list[tuple[str, int, int]]) -> bytes:
    for kind, at, n in changes:
        if not kind.endswith("end"):
            at %= max(1, len(data))
        if kind == "flip" and data:
            data = data[:at] + bytes([data[at] ^ (1 << n)]) + data[at + 1 :]
        elif kind == "cut":
            data = data[:at]
        elif kind == "cut end":
            data = data[:-at]
        elif kind == "flip end" and len(data) >= at:
            data = data[:-at] + bytes([data[-at] ^ (1 << n)]) + data[len(data) - at + 1 :]
        elif kind == "zero":
            data = data[:at] + bytes(len(data[at : at + n])) + data[at + n :]
        elif kind == "repeat":
            data = data[: at + n] + data[at : at + n] + data[at + n :]
        elif kind == "insert":
            data = data[:at] + bytes((at + i) % 256 for i in range(n)) + data[at:]
        elif kind == "append":
            data = data + bytes([at]) * n
    return data


@st.composite
def compressed_shards(draw) -> tuple[list[Member], int, str, list[tuple[str, int, int]]]:
    members = draw(shard_members())
    fmt = draw(tar_formats)
    comp = draw(st.sampled_from(["gzip", "gzip", "bzip2", "xz"]))  # .tar.gz is the common one
    changes = draw(st.lists(damages, min_size=1, max_size=3)) if draw(st.integers(0, 7)) else []
    return members, fmt, comp, changes


@pytest.mark.timeout(120)
@settings(settings.get_profile("fuzz-unit-compressed"))
@given(case=compressed_shards())
def test_a_damaged_compressed_tar_fails_with_a_tar_reason_or_commits_what_was_built(worker, case):
    check_compressed(worker, *case)


@pytest.mark.slow
@pytest.mark.timeout(900)
@settings(settings.get_profile("fuzz-full-compressed"))
@given(case=compressed_shards())
def test_a_damaged_compressed_tar_fails_with_a_tar_reason_or_commits_what_was_built_300(worker, case):
    check_compressed(worker, *case)


def check_compressed(worker, members: list[Member], fmt: int, comp: str, changes: list) -> None:
    suffix, compress, decompress = COMPRESSORS[comp]
    shard_id = f"fuzzc-{next(_counter):05d}"
    path = worker.tars / f"{shard_id}{suffix}"
    tar = tar_bytes(members, fmt)
    path.write_bytes(damaged(compress(tar), changes))
    try:  # the format's own check of the whole file, independent of the reader's streaming one
        whole = decompress(path.read_bytes())
    except _REFUSED:
        whole = None
    event(f"{comp}: {'intact' if whole is not None else 'fails its check'}")

    try:
        record = worker.process(Shard(shard_id, str(path), storage.input_version(str(path)))).to_json()
    except ShardError as e:
        event(f"{comp}: {e.reason}")
        assert e.reason in ("truncated_tar", "bad_tar", "not_a_tar"), e
        assert changes, f"an undamaged {comp} tar failed: {e}"
        assert not worker.ledger.is_done(shard_id)
        assert not storage.exists(worker.ledger.data_url(shard_id))
        return
    event(f"{comp}: committed")
    assert whole is not None, f"committed a {comp} file that fails its own check ({changes})"
    assert whole.startswith(tar)  # what was committed is what was built (a repeat may add a whole stream)
    check_committed(worker, shard_id, record, whole, members)
