"""One shard stream -> samples: Python's streaming tar reader and WebDataset's naming rule (`base_plus_ext`).

Only raw bytes come out: members are never unpickled or decoded here. Every tar member is accounted for
(docs/reliability.md, "Every member accounted"): it is either part of a sample, or counted in
`ReadStats.ignored` by reason. A sample whose content is wrong (no image, bad label, a key that is not UTF-8,
two members with the same suffix, a link whose target is gone, a key seen before) comes out with an `error`
instead of image bytes, so the caller records it; nothing a single sample contains can fail the shard. Only
damage to the tar itself raises `ShardError`: not a tar, cut short (also at a block boundary: the
end-of-archive marker is required unless `allow_unterminated`), a corrupt header, or compressed data that
fails its format's checks (compressed.py).
"""

from __future__ import annotations

import logging
import posixpath
import re
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from webdataset.tariterators import base_plus_ext

from . import compressed
from .errors import SampleError, ShardError
from .preprocess import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

META_EXTENSIONS = ("json", "txt")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# WebDataset's own metadata members (`__index__`, `__meta__/...`): never part of a sample.
_WDS_META = re.compile(r"__[^/]*__($|/)")
# Hard and symbolic links are resolved against recently read members; these bound what is remembered.
LINK_CACHE_BYTES = 64 * 2**20
LINK_CACHE_MEMBERS = 4096


@dataclass
class RawSample:
    key: str
    image: bytes | None = None
    image_ext: str | None = None
    label: int | None = None
    meta: str | None = None
    error: SampleError | None = None
    key_raw: bytes | None = None  # the key's bytes as stored in the tar, when they are not UTF-8


@dataclass
class ReadStats:
    """What the tar held: `members` as `tar t` lists them; `ignored` counts those in no sample, by reason."""

    members: int = 0
    sample_members: int = 0
    ignored: Counter = field(default_factory=Counter)


# tarfile's HeaderError subclasses say why a header read failed (CPython has had them since 3.2); they are not in
# its documentation, so typeshed does not declare them.
_EOFHeaderError: type[tarfile.HeaderError] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_EmptyHeaderError: type[tarfile.HeaderError] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]
_TruncatedHeaderError: type[tarfile.HeaderError] = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]


class _TarInfo(tarfile.TarInfo):
    """Remembers why the header read that ended the archive failed: tarfile's streaming mode ends quietly on
    an end-of-archive block, on no data at all and on a corrupt header alike, and only the first is an end."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> _TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.vqpipe_end = e  # type: ignore[attr-defined]
            raise


def iter_samples(
    stream: IO[bytes], shard_name: str, stats: ReadStats | None = None, allow_unterminated: bool = False
) -> Iterator[RawSample]:
    """Yield every sample of a WebDataset tar stream in order, as RawSample; count members into `stats`."""
    stats = stats if stats is not None else ReadStats()
    seen: set[str] = set()
    stream = compressed.open_tar(stream, shard_name)  # gzip, bzip2, xz: decompressed with their checks
    try:
        tar = tarfile.open(  # noqa: SIM115 - closed below; opening is where "not a tar" shows
            fileobj=stream, mode="r|", tarinfo=_TarInfo, encoding="utf-8", errors="surrogateescape"
        )
    except tarfile.ReadError as e:
        raise ShardError("not_a_tar", f"{shard_name}: {e}") from None
    group: _Group | None = None
    try:
        with tar:
            for member, data in _members(tar, stats):
                reason = _not_in_a_sample(member.name)
                if reason:
                    stats.ignored[reason] += 1
                    continue
                key, suffix = base_plus_ext(member.name)  # WebDataset's rule: up to the basename's first dot
                if key is None or not suffix:  # not reached for the names _not_in_a_sample lets through
                    stats.ignored["no_extension"] += 1
                    continue
                stats.sample_members += 1
                if group is None or key != group.key:
                    if group is not None:
                        yield _checked(group.finish(), seen)
                    group = _Group(key)
                group.add(suffix.lower(), data, member.name)
            if group is not None:
                yield _checked(group.finish(), seen)
            _check_end(tar, shard_name, allow_unterminated)
            compressed.read_to_end(stream)  # a compressed tar's trailer and checksums come after its end
    except (EOFError, tarfile.TarError) as e:
        raise ShardError("truncated_tar", f"{shard_name}: {e}") from None


def sample_of(key: str, members: Iterable[tuple[str, bytes]]) -> RawSample:
    """One sample from members another reader grouped (suffix as stored, bytes), by this reader's rules: suffixes
    compared lower-cased, the image by `IMAGE_EXTENSIONS` priority, `.cls`/`.json`/`.txt` parsed, and every problem
    a `SampleError` with the job's reason, never an exception (vqpipe.raydata over Ray's `read_webdataset`)."""
    group = _Group(key)
    for suffix, data in members:
        group.add(suffix.lower(), data, f"{key}.{suffix}")
    return group.finish()


def _not_in_a_sample(name: str) -> str | None:
    """Why a file or link name cannot be a sample member (WebDataset names are `<key>.<suffix>`), or None."""
    base = posixpath.basename(name)
    if base.startswith("."):  # hidden: base_plus_ext would take the directory as the key
        return "dot_name"
    if "." not in base.rstrip("."):
        return "no_extension"
    return None


def _members(tar: tarfile.TarFile, stats: ReadStats) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """Members that may belong to a sample, with their bytes (None: a link whose target is not remembered);
    directories, devices and WebDataset metadata are counted as ignored instead."""
    recent = _Recent()
    for member in tar:
        # tarfile keeps every header of a stream otherwise: memory would grow with the shard. (`members` is
        # the list behind getmembers(); typeshed does not declare it.)
        tar.members = []  # type: ignore[attr-defined]
        stats.members += 1
        if member.isdir():
            stats.ignored["directory"] += 1
            continue
        if not (member.isreg() or member.islnk() or member.issym()):
            stats.ignored["special_file"] += 1
            continue
        if "/" not in member.name and _WDS_META.match(member.name):
            stats.ignored["webdataset_meta"] += 1
            continue
        data: bytes | None
        if member.isreg():
            file = tar.extractfile(member)
            if file is None:  # not reached: tarfile gives None only for members that are not files or links
                raise tarfile.ReadError(f"{member.name}: a file member without data")
            data = file.read()
        else:  # a hard link names the target's path; a symbolic one is relative to the link's directory
            target = member.linkname
            if member.issym():
                target = posixpath.join(posixpath.dirname(member.name), target)
            data = recent.get(posixpath.normpath(target))
        if data is not None:
            # remembered under the normalised name that targets are looked up by: `./a.jpg` (from
            # `tar -C src -cf x.tar .`) is the target of a symbolic link to `a.jpg` and of a hard link to `./a.jpg`
            recent.put(posixpath.normpath(member.name), data)
        yield member, data


class _Recent:
    """The bytes of the last members read (bounded by LINK_CACHE_BYTES/MEMBERS), for links to resolve to.

    GNU tar stores the second and later names of a hard-linked file as links to the first; a stream cannot
    seek back, so a link whose target fell out of this window becomes an `unresolved_link` sample error."""

    def __init__(self) -> None:
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, name: str) -> bytes | None:
        return self._data.get(name)

    def put(self, name: str, data: bytes) -> None:
        if name in self._data:
            self._bytes -= len(self._data.pop(name))
        if len(data) > LINK_CACHE_BYTES:
            return
        self._data[name] = data
        self._bytes += len(data)
        while self._bytes > LINK_CACHE_BYTES or len(self._data) > LINK_CACHE_MEMBERS:
            self._bytes -= len(self._data.popitem(last=False)[1])


@dataclass
class _Group:
    """The members of one sample (consecutive members with the same key), suffix -> bytes."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: SampleError | None = None

    def add(self, suffix: str, data: bytes | None, name: str) -> None:
        if self.error is not None:
            return
        if suffix in self.members:  # suffixes compare lower-cased: x.jpg and x.JPG are the same member
            self.error = SampleError("duplicate_member", f"{_show(name)}: a second .{_show(suffix)} member")
        elif data is None:
            self.error = SampleError("unresolved_link", f"{_show(name)}: link target not found in the shard")
        else:
            self.members[suffix] = data

    def finish(self) -> RawSample:
        try:
            self.key.encode("utf-8")
        except UnicodeEncodeError:  # tarfile kept undecodable bytes as surrogates: the name was not UTF-8
            raw = self.key.encode("utf-8", "surrogateescape")
            return RawSample(
                escape_key(raw), key_raw=raw, error=SampleError("bad_key", f"key is not UTF-8: {raw!r}")
            )
        if self.error is not None:
            return RawSample(self.key, error=self.error)
        try:
            return _to_sample(self.key, self.members)
        except Exception as e:  # noqa: BLE001 - one sample's content never fails the shard
            logger.exception("key %r: unexpected error reading the sample", self.key)
            return RawSample(self.key, error=SampleError("sample_error", f"{type(e).__name__}: {e}"))


def escape_key(raw: bytes) -> str:
    """A readable, UTF-8-safe spelling of a key's bytes (invalid bytes as `\\xNN`); the exact bytes are kept
    beside it in the error file's `key_raw` column."""
    return raw.decode("utf-8", "backslashreplace")


def _checked(sample: RawSample, seen: set[str]) -> RawSample:
    if sample.key in seen:
        sample = RawSample(
            sample.key,
            key_raw=sample.key_raw,
            error=SampleError("duplicate_key", f"key {sample.key!r} appears again in the shard"),
        )
    seen.add(sample.key)
    return sample


def _to_sample(key: str, members: dict[str, bytes]) -> RawSample:
    sample = RawSample(key)
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            sample.image, sample.image_ext = members[ext], ext
            break
    else:
        present = sorted(_show(k) for k in members)
        sample.error = SampleError(
            "missing_image", f"no image member (has: {', '.join(present) or 'nothing'})"
        )
        return sample
    try:
        if "cls" in members:
            label = int(members["cls"].decode("ascii").strip())
            if not INT64_MIN <= label <= INT64_MAX:
                raise ValueError(f"label {label} is outside int64")
            sample.label = label
        for ext in META_EXTENSIONS:
            if ext in members:
                sample.meta = members[ext].decode("utf-8")
                break
    except (UnicodeDecodeError, ValueError) as e:
        sample.error = SampleError("bad_metadata", f"unreadable .cls/.json/.txt member: {_short(e)}")
    return sample


def _check_end(tar: tarfile.TarFile, shard_name: str, allow_unterminated: bool) -> None:
    """Refuse a tar that ends without its end-of-archive marker (two zero blocks): an interrupted copy that
    stops at a block boundary would otherwise read as a shorter, valid tar."""
    end = getattr(tar, "vqpipe_end", None)
    if isinstance(end, _EOFHeaderError):  # one zero block read; the marker has a second one
        rest = tar.fileobj.read(tarfile.BLOCKSIZE)
        if rest == tarfile.NUL * tarfile.BLOCKSIZE or (allow_unterminated and not rest):
            return
        if rest.strip(tarfile.NUL):
            raise ShardError("bad_tar", f"{shard_name}: data after an end-of-archive block")
        end = _EmptyHeaderError("the end-of-archive marker is cut short")
    elif isinstance(end, _EmptyHeaderError) and allow_unterminated:
        return
    if isinstance(end, (_EmptyHeaderError, _TruncatedHeaderError)):
        raise ShardError(
            "truncated_tar",
            f"{shard_name}: no end-of-archive marker after {tar.offset} bytes ({end}); the tar was cut short "
            "(run.allow_unterminated_tar accepts tars from writers that omit it)",
        )
    raise ShardError("bad_tar", f"{shard_name}: corrupt tar header at byte {tar.offset} ({end})")


def _show(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _short(e: BaseException, limit: int = 200) -> str:
    text = _show(str(e))
    return text if len(text) <= limit else text[: limit - 3] + "..."
