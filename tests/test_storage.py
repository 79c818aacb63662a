"""vqpipe.storage against real filesystems: memory://, local disk, and S3 (moto's server on 127.0.0.1)."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
import traceback
import uuid
from typing import Any

import fsspec
import pytest
import s3fs
from fsspec.implementations.memory import MemoryFileSystem
from s3server import S3Server, s3_server

from vqpipe import storage
from vqpipe.errors import StorageError

KEY_CANARY = "AKIACANARY1234567890"
SECRET_CANARY = "SECRETCANARY1234"
MiB = 2**20


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture
def mem() -> Any:
    """A fresh memory:// directory URL (memory:// is one process-wide store)."""
    root = f"memory://vq-{uuid.uuid4().hex[:10]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def put(url: str, data: bytes = b"x", **opts: Any) -> None:
    fs, path = fsspec.core.url_to_fs(url, **opts)
    fs.pipe_file(path, data)


def leftovers(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return [p for p in fs.find(path) if os.path.basename(p).startswith(storage.TMP_PREFIX)]


class FlakyMemoryFileSystem(MemoryFileSystem):
    """memory:// whose files raise ConnectionResetError once `fail_at` bytes into a read, `failures` times
    in all, as a dropped connection would: the bytes underneath are real, only the failure is injected."""

    protocol = "flakymem"
    failures = 0
    fail_at = 0
    opens = 0

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path.removeprefix("flakymem://"))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        f = super()._open(path, mode, **kwargs)
        if "r" not in mode:
            return f
        type(self).opens += 1
        return _FlakyFile(f, type(self))


class _FlakyFile:
    def __init__(self, f: Any, owner: type[FlakyMemoryFileSystem]):
        self._f, self._owner, self.size = f, owner, f.size

    def read(self, n: int = -1) -> bytes:
        if self._owner.failures and self._f.tell() + max(n, 0) > self._owner.fail_at:
            self._owner.failures -= 1
            raise ConnectionResetError("connection reset by peer (injected)")
        return self._f.read(n)

    def seek(self, *args: Any) -> int:
        return self._f.seek(*args)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        pass


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> type[FlakyMemoryFileSystem]:
    fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)
    for name, value in (("failures", 0), ("fail_at", 0), ("opens", 0)):
        monkeypatch.setattr(FlakyMemoryFileSystem, name, value)
    monkeypatch.setattr(storage.retries, "RETRY_BACKOFF_S", 0.0)
    return FlakyMemoryFileSystem


# ----------------------------------------------------------------------------------------- URLs, secrets


def test_protocol_is_local_and_join() -> None:
    assert storage.protocol("/data/x.tar") == "file"
    assert storage.protocol("s3://b/x.tar") == "s3"
    assert storage.is_local("shards/x.tar") and storage.is_local("file:///x")
    assert not storage.is_local("s3://b/x") and not storage.is_local("memory://x")
    assert storage.join("s3://b/run/", "done", "a.json") == "s3://b/run/done/a.json"
    assert storage.join("s3://b", "/x/") == "s3://b/x"
    assert storage.join("memory://", "x") == "memory://x"
    assert storage.join("/tmp/out", "a", "", "b.parquet") == "/tmp/out/a/b.parquet"


@pytest.mark.parametrize(
    "text, secret",
    [
        ("s3://b/x.tar?token=SECRETCANARY1234&part=1", "SECRETCANARY1234"),
        ("https://alice:SECRETCANARY1234@example.com/x", "SECRETCANARY1234"),
        ("creds AKIACANARY1234567890 leaked", "AKIACANARY1234567890"),
        ("{'key': 'k1', 'secret': 'SECRETCANARY1234'}", "SECRETCANARY1234"),
        ('{"aws_secret_access_key": "SECRETCANARY1234"}', "SECRETCANARY1234"),
        ("aws_session_token=SECRETCANARY1234", "SECRETCANARY1234"),
        ("https://acct.blob.core.windows.net/c/x?sv=2020&sig=SECRETCANARY1234", "SECRETCANARY1234"),
        ("X-Amz-Signature=SECRETCANARY1234&X-Amz-Credential=abc", "SECRETCANARY1234"),
        ("password: SECRETCANARY1234", "SECRETCANARY1234"),
        ("Authorization: Bearer SECRETCANARY1234", "SECRETCANARY1234"),
        ("password: 'SECRET CANARY 1234'", "CANARY"),
        ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=SECRETCANARY1234;", "SECRETCANARY1234"),
    ],
)
def test_redact_scrubs_secrets(text: str, secret: str) -> None:
    out = storage.redact(text)
    assert secret not in out
    assert "***" in out


@pytest.mark.parametrize(
    "text",
    [
        "s3://bucket/shards/part-000001.tar: 3 of 10 expanded names do not exist (NoSuchKey)",
        "s3://b/x.tar: cannot read (KeyError: 'part-1.tar')",
        "design: 3, passage=2, shards: 4",
    ],
)
def test_redact_keeps_ordinary_text(text: str) -> None:
    assert storage.redact(text) == text


def test_public_storage_options_masks_secrets_and_is_json() -> None:
    opts = {
        "key": KEY_CANARY,
        "secret": SECRET_CANARY,
        "token": None,
        "anon": False,
        "client_kwargs": {
            "endpoint_url": f"https://user:{SECRET_CANARY}@s3.example.com",
            "region_name": "us-east-1",
            "aws_session_token": SECRET_CANARY,
        },
        "account_key": SECRET_CANARY,
        "sas_token": SECRET_CANARY,
        "connection_string": f"AccountName=a;AccountKey={SECRET_CANARY}",
        "credentials": {"private_key": SECRET_CANARY},
        "config_kwargs": {"retries": {"max_attempts": 3}},
        "session": object(),
    }
    public = storage.public_storage_options(opts)
    text = json.dumps(public)
    assert SECRET_CANARY not in text and KEY_CANARY not in text
    assert public["key"] == public["secret"] == public["account_key"] == public["credentials"] == "***"
    assert public["token"] is None and public["anon"] is False
    assert public["client_kwargs"]["region_name"] == "us-east-1"
    assert public["client_kwargs"]["endpoint_url"] == "https://user:***@s3.example.com"
    assert public["config_kwargs"] == {"retries": {"max_attempts": 3}}
    assert storage.public_storage_options(None) == {}


# ----------------------------------------------------------------------------------------------- memory://


def test_expand_files_dirs_globs_and_braces(mem: str) -> None:
    for i in range(4):
        put(f"{mem}/shards/part-{i:06d}.tar")
    put(f"{mem}/shards/readme.txt")
    put(f"{mem}/other/x.tar")
    put(f"{mem}/shards/sub/deep.tar")
    expected = [f"memory:///{mem[9:]}/shards/part-{i:06d}.tar" for i in range(4)]

    assert storage.expand_inputs([f"{mem}/shards"]) == expected  # *.tar only, not recursive
    assert storage.expand_inputs([f"{mem}/shards/*.tar"]) == expected
    assert storage.expand_inputs([f"{mem}/shards/part-{{000000..000003}}.tar"]) == expected
    assert storage.expand_inputs([f"{mem}/shards/part-{{000002,000000}}.tar"]) == [expected[0], expected[2]]
    # files, overlapping specs and a brace over directories mixing globs: sorted and de-duplicated
    got = storage.expand_inputs(
        [
            f"{mem}/other/x.tar",
            f"{mem}/shards/part-000001.tar",
            f"{mem}/{{shards,other}}/*.tar",
            f"{mem}/shards",
        ]
    )
    assert got == sorted({*expected, f"memory:///{mem[9:]}/other/x.tar"})


def test_expand_braces_lists_each_parent_once(mem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for d in ("a", "b"):
        for i in range(25):
            put(f"{mem}/{d}/part-{i:03d}.tar")
    calls: list[str] = []
    real_ls = MemoryFileSystem.ls

    def counting_ls(self: MemoryFileSystem, path: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(path)
        return real_ls(self, path, *args, **kwargs)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("brace expansion must not query names one by one")

    monkeypatch.setattr(MemoryFileSystem, "ls", counting_ls)
    for name in ("exists", "info", "isfile"):
        monkeypatch.setattr(MemoryFileSystem, name, forbidden)
    got = storage.expand_inputs_with_info([f"{mem}/{{a,b}}/part-{{000..024}}.tar"])
    assert len(got) == 50
    assert sorted(calls) == [f"/{mem[9:]}/a", f"/{mem[9:]}/b"]
    assert all(fp["size"] == 1 for _, fp in got)


def test_expand_reports_what_is_missing(mem: str) -> None:
    for i in range(3):
        put(f"{mem}/shards/part-{i}.tar")
    with pytest.raises(StorageError, match=r"7 of 10 expanded names do not exist, e\.g\. .*part-3\.tar"):
        storage.expand_inputs([f"{mem}/shards/part-{{0..9}}.tar"])
    with pytest.raises(StorageError, match=r"nowhere/\*\.tar: matches no files"):
        storage.expand_inputs([f"{mem}/shards/part-0.tar", f"{mem}/nowhere/*.tar"])
    with pytest.raises(StorageError, match="missing.tar: no such file"):
        storage.expand_inputs([f"{mem}/shards/missing.tar"])
    put(f"{mem}/empty/readme.txt")
    with pytest.raises(StorageError, match="matches no tar files .*found e.g. readme.txt"):
        storage.expand_inputs([f"{mem}/empty"])
    with pytest.raises(StorageError, match=r"10 of 10 expanded names"):
        storage.expand_inputs([f"{mem}/no-such-dir/part-{{0..9}}.tar"])


def test_fingerprint_from_listing_matches_input_fingerprint(mem: str) -> None:
    put(f"{mem}/s/a.tar", b"abc")
    put(f"{mem}/s/b.tar", b"abcd")
    for url, fp in storage.expand_inputs_with_info([f"{mem}/s/{{a,b}}.tar"]):
        assert fp == storage.input_version(url)
    assert storage.input_version(f"{mem}/s/b.tar")["size"] == 4
    with pytest.raises(StorageError, match="no such file"):
        storage.input_version(f"{mem}/s/c.tar")


def test_atomic_write_memory(mem: str) -> None:
    target = f"{mem}/out/x.parquet"
    with storage.atomic_write(target) as f:
        f.write(b"hello")
        assert not storage.exists(target)  # memory:// would publish at open: a temporary key is used
    assert storage.read_bytes(target) == b"hello"

    with pytest.raises(RuntimeError, match="boom"), storage.atomic_write(f"{mem}/out/y.parquet") as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert not storage.exists(f"{mem}/out/y.parquet")
    # an existing file survives a failed rewrite
    with pytest.raises(KeyboardInterrupt), storage.atomic_write(target) as f:
        f.write(b"new")
        raise KeyboardInterrupt
    assert storage.read_bytes(target) == b"hello"
    assert leftovers(mem) == []


def test_small_helpers_memory(mem: str) -> None:
    storage.write_json_atomic(f"{mem}/run/run.json", {"b": 1, "a": [1, 2]})
    assert (
        storage.read_bytes(f"{mem}/run/run.json").decode()
        == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    )
    assert storage.read_json(f"{mem}/run/run.json") == {"a": [1, 2], "b": 1}
    storage.write_bytes_atomic(f"{mem}/run/done/s1.json", b"{}")
    storage.write_bytes_atomic(f"{mem}/run/done/s2.json", b"{}")
    storage.write_bytes_atomic(f"{mem}/run/done/s3.txt", b"")
    storage.write_bytes_atomic(f"{mem}/run/done/sub/s4.json", b"{}")
    assert storage.list_files(f"{mem}/run/done", ".json") == ["s1.json", "s2.json"]
    assert storage.list_files(f"{mem}/run/nothing", ".json") == []
    assert storage.exists(f"{mem}/run/done/s1.json")
    storage.remove(f"{mem}/run/done/s1.json")
    storage.remove(f"{mem}/run/done/s1.json")  # already gone: fine
    assert not storage.exists(f"{mem}/run/done/s1.json")
    put(f"{mem}/run/bad.json", b"{not json")
    with pytest.raises(StorageError, match="bad.json: not valid JSON"):
        storage.read_json(f"{mem}/run/bad.json")
    with pytest.raises(StorageError, match="nope.json: no such file"):
        storage.read_json(f"{mem}/run/nope.json")


def test_cleanup_temporaries_memory(mem: str) -> None:
    put(f"{mem}/out/.tmp-123-abc-x.parquet")
    put(f"{mem}/out/x.parquet")
    put(f"{mem}/out/deeper/.tmp-1-2-y.parquet")  # not directly in the directory: left alone
    assert storage.cleanup_temporaries(f"{mem}/out") == 1
    assert storage.list_files(f"{mem}/out", "") == ["x.parquet"]
    assert storage.cleanup_temporaries(f"{mem}/does-not-exist") == 0


def test_open_input_streams_and_retries_a_dropped_connection(
    flaky: type[FlakyMemoryFileSystem], caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(3 * MiB + 17)
    put(f"flakymem://vq-{uuid.uuid4().hex}/x.tar", b"")  # registers the path prefix
    url = f"flakymem://vq-{uuid.uuid4().hex}/x.tar"
    put(url, data)
    flaky.failures, flaky.fail_at = 1, 2 * MiB + 5
    with storage.open_input(url) as f:
        assert f.read(10) == data[:10]
        chunks = [data[:10]]
        while chunk := f.read(100_000):
            chunks.append(chunk)
    assert b"".join(chunks) == data
    assert flaky.failures == 0 and flaky.opens == 2  # failed once, re-opened once at the offset
    assert "re-opening" in caplog.text and "ConnectionResetError" in caplog.text


def test_open_input_gives_up_after_bounded_attempts(flaky: type[FlakyMemoryFileSystem]) -> None:
    url = f"flakymem://vq-{uuid.uuid4().hex}/x.tar"
    put(url, b"y" * 1000)
    flaky.failures, flaky.fail_at = 100, 500
    with (
        pytest.raises(
            StorageError, match=r"x.tar: read failed at byte \d+ after 3 attempt\(s\).*ConnectionReset"
        ),
        storage.open_input(url, attempts=3, backoff_s=0) as f,
    ):
        f.read()
    assert flaky.opens == 3


def test_open_input_missing(mem: str) -> None:
    with pytest.raises(StorageError, match=r"nope\.tar: no such file"):
        storage.open_input(f"{mem}/nope.tar")
    with pytest.raises(StorageError, match=r"nope\.tar: no such file"):
        storage.read_bytes(f"{mem}/nope.tar")


def test_importing_storage_pulls_in_no_cloud_client() -> None:
    code = "import sys, vqpipe.storage; print(sorted({'s3fs', 'botocore', 'aiohttp', 'braceexpand'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ local disk


def test_expand_local_paths_are_absolute(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shards").mkdir()
    for i in range(3):
        (tmp_path / "shards" / f"p-{i}.tar").write_bytes(b"t" * (i + 1))
    monkeypatch.chdir(tmp_path)
    want = [str(tmp_path / "shards" / f"p-{i}.tar") for i in range(3)]
    assert storage.expand_inputs(["shards"]) == want
    assert storage.expand_inputs(["shards/*.tar", "./shards/../shards/p-0.tar"]) == want
    (tmp_path / "odd[1].tar").write_bytes(b"t")  # "[" makes it look like a glob that matches nothing
    assert storage.expand_inputs(["odd[1].tar"]) == [str(tmp_path / "odd[1].tar")]
    got = storage.expand_inputs_with_info(["shards/p-{0..2}.tar"])
    assert [u for u, _ in got] == want
    for url, fp in got:
        assert fp == storage.input_version(url)
        assert set(fp) == {"size", "mtime"}


def test_local_fingerprint_changes_with_the_file(tmp_path: Any) -> None:
    p = tmp_path / "a.tar"
    p.write_bytes(b"one")
    before = storage.input_version(str(p))
    assert storage.input_version(str(p)) == before
    p.write_bytes(b"three")
    os.utime(p, (1_000_000, 1_000_000))
    assert storage.input_version(str(p)) != before


def test_atomic_write_local_creates_dirs_and_replaces(tmp_path: Any) -> None:
    target = tmp_path / "out" / "deep" / "x.parquet"
    with storage.atomic_write(str(target)) as f:
        f.write(b"v1")
        assert not target.exists()
        assert [p.name.startswith(".tmp-") for p in target.parent.iterdir()] == [True]
    assert target.read_bytes() == b"v1"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(), not mkstemp's 0600
    storage.write_bytes_atomic(f"file://{target}", b"v2")
    assert target.read_bytes() == b"v2"
    assert os.listdir(target.parent) == ["x.parquet"]


def test_atomic_write_local_failure_leaves_nothing(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="bad row"), storage.atomic_write(str(tmp_path / "new.parquet")) as f:
        f.write(b"partial" * 1000)
        raise ValueError("bad row")
    assert os.listdir(tmp_path) == []

    old = tmp_path / "old.parquet"
    old.write_bytes(b"good")
    with pytest.raises(OSError, match="disk on fire"), storage.atomic_write(str(old)) as f:
        f.write(b"partial")
        f.close()  # writers such as pyarrow close their sink: that must not commit
        raise OSError("disk on fire")  # the body's own exceptions propagate unchanged
    assert old.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["old.parquet"]


def test_cleanup_temporaries_local(tmp_path: Any) -> None:
    (tmp_path / ".tmp-4242-0123456789ab-x.parquet").write_bytes(b"crashed")
    (tmp_path / "x.parquet").write_bytes(b"ok")
    assert storage.cleanup_temporaries(str(tmp_path)) == 1
    assert os.listdir(tmp_path) == ["x.parquet"]
    assert storage.cleanup_temporaries(str(tmp_path / "missing")) == 0


# ------------------------------------------------------------------------------------------ S3 (moto server)


@pytest.fixture(scope="module")
def s3() -> Any:
    with s3_server() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _list_requests(s3: S3Server, since: int) -> list[tuple[str, str]]:
    return [r for r in s3.requests[since:] if r[0] == "GET" and "list-type=2" in r[1]]


def test_s3_brace_expansion_is_one_paginated_listing(s3: S3Server, prefix: str) -> None:
    n = 1100  # more than one page: S3 returns at most 1000 keys per listing request
    s3.seed({f"{prefix}/shards/part-{i:06d}.tar": b"tar" for i in range(n)})
    s3.seed({f"{prefix}/shards/part-{i:06d}.json": b"{}" for i in range(5)})
    start = len(s3.requests)
    got = storage.expand_inputs_with_info(
        [s3.url(f"{prefix}/shards/part-{{000000..{n - 1:06d}}}.tar")], s3.storage_options
    )
    requests = s3.requests[start:]
    assert len(got) == n
    assert got[0][0] == s3.url(f"{prefix}/shards/part-000000.tar")
    assert got[-1][0] == s3.url(f"{prefix}/shards/part-{n - 1:06d}.tar")
    assert len(requests) == 2 and len(_list_requests(s3, start)) == 2, requests  # two pages, no HEADs
    assert "continuation-token" in requests[1][1]


def test_s3_globs_directories_and_missing_names(s3: S3Server, prefix: str) -> None:
    s3.seed({f"{prefix}/shards/part-{i}.tar": b"tar" for i in range(5)})
    s3.seed({f"{prefix}/shards/part-0.json": b"{}", f"{prefix}/shards/sub/deep.tar": b"tar"})
    want = [s3.url(f"{prefix}/shards/part-{i}.tar") for i in range(5)]
    start = len(s3.requests)
    assert storage.expand_inputs([s3.url(f"{prefix}/shards/*.tar")], s3.storage_options) == want
    assert storage.expand_inputs([s3.url(f"{prefix}/shards")], s3.storage_options) == want
    assert storage.expand_inputs([s3.url(f"{prefix}/shards/part-4.tar")], s3.storage_options) == want[4:]
    assert len(s3.requests) - start <= 8, s3.requests[start:]
    s3.seed({f"{prefix}/shards/part-5.tar": b"new"})  # listings are not served from a stale cache
    assert len(storage.expand_inputs([s3.url(f"{prefix}/shards/*.tar")], s3.storage_options)) == 6
    with pytest.raises(StorageError, match=r"3 of 9 expanded names do not exist, e\.g\. s3://.*/part-6\.tar"):
        storage.expand_inputs([s3.url(f"{prefix}/shards/part-{{0..8}}.tar")], s3.storage_options)
    with pytest.raises(StorageError, match="matches no files"):
        storage.expand_inputs([s3.url(f"{prefix}/shards/*.parquet")], s3.storage_options)


def test_s3_reads_and_listings_are_not_served_from_a_stale_cache(s3: S3Server, prefix: str) -> None:
    s3.seed({f"{prefix}/d/a.tar": b"short"})
    assert storage.expand_inputs([s3.url(f"{prefix}/d")], s3.storage_options) == [s3.url(f"{prefix}/d/a.tar")]
    assert storage.list_files(s3.url(f"{prefix}/d"), ".tar", s3.storage_options) == ["a.tar"]
    # another worker writes behind this process's back (s3fs caches listings per filesystem instance)
    s3.seed({f"{prefix}/d/a.tar": b"a longer content", f"{prefix}/d/b.tar": b"b"})
    with storage.open_input(s3.url(f"{prefix}/d/a.tar"), s3.storage_options) as f:
        assert f.read() == b"a longer content"
    assert storage.list_files(s3.url(f"{prefix}/d"), ".tar", s3.storage_options) == ["a.tar", "b.tar"]
    assert storage.exists(s3.url(f"{prefix}/d/b.tar"), s3.storage_options)
    assert storage.input_version(s3.url(f"{prefix}/d/a.tar"), s3.storage_options)["size"] == 16


def test_s3_fingerprint_has_etag_and_matches_listing(s3: S3Server, prefix: str) -> None:
    s3.seed({f"{prefix}/a.tar": b"aaa", f"{prefix}/b.tar": b"bbbb"})
    got = dict(storage.expand_inputs_with_info([s3.url(f"{prefix}/{{a,b}}.tar")], s3.storage_options))
    fp = storage.input_version(s3.url(f"{prefix}/a.tar"), s3.storage_options)
    assert fp == got[s3.url(f"{prefix}/a.tar")]  # listing (ms precision) and HEAD (s precision) agree
    assert fp["etag"] == hashlib.md5(b"aaa").hexdigest() and fp["size"] == 3 and isinstance(fp["mtime"], int)
    s3.seed({f"{prefix}/a.tar": b"AAA"})
    assert storage.input_version(s3.url(f"{prefix}/a.tar"), s3.storage_options)["etag"] != fp["etag"]


def test_s3_open_input_streams_in_range_requests(
    s3: S3Server, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage.reads, "READ_BLOCK_SIZE", 1 * MiB)
    buf = io.BytesIO()
    members = {f"{i:04d}.jpg": os.urandom(300_000) for i in range(20)}  # ~6 MB tar
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    s3.seed({f"{prefix}/shard.tar": buf.getvalue()})

    start = len(s3.requests)
    with (
        storage.open_input(s3.url(f"{prefix}/shard.tar"), s3.storage_options) as f,
        tarfile.open(fileobj=f, mode="r|") as tar,  # streaming mode, as webdataset reads shards
    ):
        members_iter = iter(tar)
        first = next(members_iter)
        assert tar.extractfile(first).read() == members[first.name]  # type: ignore[union-attr]
        gets_after_first = sum(1 for m, _ in s3.requests[start:] if m == "GET")
        got = {first.name: members[first.name]}
        for member in members_iter:
            got[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    assert got == members
    gets = sum(1 for m, _ in s3.requests[start:] if m == "GET")
    assert gets_after_first <= 2  # not downloaded whole
    assert gets >= len(buf.getvalue()) // (2 * MiB)  # fetched block by block


def test_s3_open_input_survives_a_connection_reset(
    s3: S3Server, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(5 * MiB)
    s3.seed({f"{prefix}/x.tar": data})
    monkeypatch.setattr(storage.reads, "READ_BLOCK_SIZE", 1 * MiB)
    calls = {"n": 0}
    real_fetch = s3fs.core.S3File._fetch_range

    def fetch_failing_once(self: Any, start: int, end: int) -> bytes:
        calls["n"] += 1
        if calls["n"] == 3:  # mid-stream, after two blocks were served
            raise ConnectionResetError("connection reset by peer (injected)")
        return real_fetch(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", fetch_failing_once)
    start = len(s3.requests)
    with storage.open_input(s3.url(f"{prefix}/x.tar"), s3.storage_options, backoff_s=0) as f:
        out = b"".join(iter(lambda: f.read(256 * 1024), b""))
    assert out == data
    heads = [r for r in s3.requests[start:] if r[0] == "HEAD"]
    assert len(heads) == 2  # opened, then re-opened once at the offset


def test_s3_open_input_refuses_an_object_that_changed(
    s3: S3Server, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.seed({f"{prefix}/x.tar": os.urandom(3 * MiB)})
    monkeypatch.setattr(storage.reads, "READ_BLOCK_SIZE", 1 * MiB)
    real_fetch = s3fs.core.S3File._fetch_range
    calls = {"n": 0}

    def fetch(self: Any, start: int, end: int) -> bytes:
        calls["n"] += 1
        if calls["n"] == 2:
            s3.seed({f"{prefix}/x.tar": os.urandom(3 * MiB)})  # rewritten under our feet
            raise ConnectionResetError("injected")
        return real_fetch(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", fetch)
    with (
        pytest.raises(StorageError, match="changed while being read"),
        storage.open_input(s3.url(f"{prefix}/x.tar"), s3.storage_options, backoff_s=0) as f,
    ):
        f.read()


def test_s3_failed_atomic_write_leaves_no_object_and_no_upload(
    s3: S3Server, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    client = s3.boto3_client()
    key = f"{prefix}/out/x.parquet"
    with (
        pytest.raises(RuntimeError, match="encoder died"),
        storage.atomic_write(s3.url(key), s3.storage_options, block_size=5 * MiB) as f,
    ):
        for _ in range(3):
            f.write(os.urandom(4 * MiB))  # 12 MiB > part size: parts are being uploaded
        uploads = client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])
        assert [u["Key"] for u in uploads] == [key]
        f.close()  # a writer closing its sink must not commit either
        raise RuntimeError("encoder died")
    del f
    gc.collect()  # a discarded s3fs file still tries to finish its upload when collected, unless disarmed
    assert "Contents" not in client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)
    assert client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", []) == []
    assert not storage.exists(s3.url(key), s3.storage_options)
    assert unraisable == []


def test_s3_atomic_write_big_object(s3: S3Server, prefix: str) -> None:
    data = os.urandom(12 * MiB)
    url = s3.url(f"{prefix}/out/big.parquet")
    with storage.atomic_write(url, s3.storage_options, block_size=5 * MiB) as f:
        for i in range(0, len(data), MiB):
            f.write(data[i : i + MiB])
        assert not storage.exists(url, s3.storage_options)  # nothing visible before the block exits
    assert storage.read_bytes(url, s3.storage_options) == data
    assert storage.input_version(url, s3.storage_options)["etag"].endswith("-3")  # 3 parts: 5 + 5 + 2 MiB
    storage.write_json_atomic(s3.url(f"{prefix}/out/done/a.json"), {"ok": True}, s3.storage_options)
    assert storage.read_json(s3.url(f"{prefix}/out/done/a.json"), s3.storage_options) == {"ok": True}
    assert storage.list_files(s3.url(f"{prefix}/out"), ".parquet", s3.storage_options) == ["big.parquet"]
    storage.remove(url, s3.storage_options)
    storage.remove(url, s3.storage_options)
    assert storage.list_files(s3.url(f"{prefix}/out"), ".parquet", s3.storage_options) == []


def test_s3_cleanup_removes_temp_keys_and_stale_uploads(s3: S3Server, prefix: str) -> None:
    client = s3.boto3_client()
    client.create_multipart_upload(Bucket=s3.bucket, Key=f"{prefix}/out/crashed.parquet")
    client.create_multipart_upload(Bucket=s3.bucket, Key=f"{prefix}/elsewhere/live.parquet")
    s3.seed({f"{prefix}/out/.tmp-1-abc-x.parquet": b"t", f"{prefix}/out/x.parquet": b"x"})
    assert storage.cleanup_temporaries(s3.url(f"{prefix}/out"), s3.storage_options) == 2
    assert storage.list_files(s3.url(f"{prefix}/out"), "", s3.storage_options) == ["x.parquet"]
    left = client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix).get("Uploads", [])
    assert [u["Key"] for u in left] == [f"{prefix}/elsewhere/live.parquet"]


def test_s3_credentials_never_appear_in_errors(
    s3: S3Server, prefix: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage.retries, "RETRY_BACKOFF_S", 0.0)
    opts = {**s3.storage_options, "key": KEY_CANARY, "secret": SECRET_CANARY}
    s3.seed({f"{prefix}/a.tar": b"a"})
    host = s3.endpoint_url.removeprefix("http://")
    refused = {
        **opts,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1}},  # botocore would retry for ~7 s
    }
    failing = [
        lambda: storage.open_input(s3.url(f"{prefix}/missing.tar"), opts),
        lambda: storage.read_bytes(s3.url(f"{prefix}/missing.tar?token={SECRET_CANARY}"), opts),
        lambda: storage.input_version(s3.url(f"{prefix}/missing.tar"), opts),
        lambda: storage.expand_inputs([s3.url(f"{prefix}/x-{{0..3}}.tar")], opts),
        lambda: storage.expand_inputs([s3.url(f"{prefix}/*.parquet")], opts),
        lambda: storage.expand_inputs([f"s3://no-such-bucket-{prefix}/x.tar"], opts),
        lambda: storage.write_bytes_atomic(f"s3://no-such-bucket-{prefix}/x.json", b"{}", opts),
        lambda: storage.read_bytes(f"http://user:{SECRET_CANARY}@{host}/no-such-bucket/x.tar"),
        lambda: storage.read_bytes(s3.url(f"{prefix}/a.tar"), refused),  # nothing listens on port 9
    ]
    for fn in failing:
        with pytest.raises(StorageError) as info:
            fn()
        text = "".join(traceback.format_exception(info.value))
        assert SECRET_CANARY not in text and KEY_CANARY not in text, text
    assert SECRET_CANARY not in caplog.text and KEY_CANARY not in caplog.text
    public = json.dumps(storage.public_storage_options(opts))
    assert SECRET_CANARY not in public and KEY_CANARY not in public
    assert s3.endpoint_url in public  # what is not secret stays readable


@pytest.mark.parametrize("chunk", [300 * 1024, 4096])  # one write too big, or the buffer filling the disk
def test_atomic_write_on_a_full_disk_is_one_clear_storage_error(tiny_disk: Any, chunk: int) -> None:
    target = tiny_disk / "run.json"
    target.write_bytes(b"older")
    with pytest.raises(StorageError) as err, storage.atomic_write(str(target)) as f:
        for _ in range(300 * 1024 // chunk):
            f.write(b"x" * chunk)
    assert str(err.value) == f"{target}: cannot write (OSError: [Errno 28] No space left on device)"
    shown = "".join(traceback.format_exception(err.value))
    assert "During handling" not in shown and "direct cause" not in shown  # one error, not a chain
    assert target.read_bytes() == b"older"  # the older file is untouched
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["run.json"]  # no temporary left


def test_atomic_write_whose_commit_flush_hits_a_full_disk(tiny_disk: Any) -> None:
    (tiny_disk / "filler").write_bytes(b"f" * 256 * 1024)  # the disk is full
    with pytest.raises(StorageError, match="plan.json: cannot write .*No space left on device"):
        storage.write_bytes_atomic(str(tiny_disk / "plan.json"), b"p" * 3000)  # buffered: fails on commit
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


def test_redaction_is_pure_text():
    """redaction is used everywhere messages are built: it must not need fsspec (the other modules own it)."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(storage.__file__).parent / "redaction.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported and not [m for m in imported if m.split(".")[0] in ("fsspec", "storage", "urls")]
    assert storage.redact("s3://u:hunter2@b/x?X-Amz-Signature=abc") == "s3://u:***@b/x?X-Amz-Signature=***"


def test_sha256_of_streams_the_file_and_can_keep_exactly_the_bytes_hashed(tmp_path) -> None:
    data = os.urandom((8 << 20) + 12345)  # more than one read part
    (tmp_path / "ckpt.pth").write_bytes(data)
    kept = io.BytesIO()
    digest = storage.sha256_of(str(tmp_path / "ckpt.pth"), keep=kept)
    assert digest == hashlib.sha256(data).hexdigest() == storage.sha256_of(str(tmp_path / "ckpt.pth"))
    assert kept.getvalue() == data
    with pytest.raises((StorageError, OSError)):
        storage.sha256_of(str(tmp_path / "missing.pth"))


def test_the_storage_deadline_is_vqpipes_own_option_and_is_checked() -> None:
    """`vqpipe_deadline_s` never reaches fsspec (memory:// would refuse an unknown option), and a bad value
    is a ConfigError naming the key."""
    from vqpipe.errors import ConfigError

    url = f"memory://deadline-{uuid.uuid4().hex[:8]}/x.json"
    storage.write_bytes_atomic(url, b"{}", {"vqpipe_deadline_s": 5})
    assert storage.read_bytes(url, {"vqpipe_deadline_s": 5}) == b"{}"
    for bad in (0, -1, "soon", float("nan"), True):
        with pytest.raises(
            ConfigError, match=r"storage_options\.vqpipe_deadline_s: expected a positive number"
        ):
            storage.read_bytes(url, {"vqpipe_deadline_s": bad})


def test_retries_stop_at_the_deadline_and_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection reset again and again is retried with backoff, but not past the operation's deadline."""
    from vqpipe.storage import deadlines

    monkeypatch.setattr(storage.retries, "RETRY_ATTEMPTS", 1000)
    calls = {"n": 0}

    def reset() -> None:
        calls["n"] += 1
        raise ConnectionResetError(104, "Connection reset by peer")

    started = time.monotonic()
    with deadlines.deadline(0.5), pytest.raises(StorageError) as info:
        storage.retries._retrying("s3://b/k", "read", reset, backoff_s=0.05)
    assert time.monotonic() - started < 1.5 and calls["n"] > 1
    assert str(info.value) == (
        "s3://b/k: cannot read (timed out: no answer within 0.5s, the storage deadline (vqpipe_deadline_s); "
        "last error: connection lost: ConnectionResetError: [Errno 104] Connection reset by peer)"
    )
    # nested operations keep the earlier end; a fresh one (the clean-up after a timeout) has its own
    with deadlines.deadline(1):
        with deadlines.deadline(60):
            assert deadlines.remaining() is not None and deadlines.remaining() <= 1  # type: ignore[operator]
        with deadlines.deadline(60, fresh=True):
            assert deadlines.remaining() > 59  # type: ignore[operator]
    assert deadlines.remaining() is None
