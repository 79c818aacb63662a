"""Compressed shards: a tar stream compressed with gzip, bzip2 or xz is decompressed here, with the format's
integrity checks enforced up to the stream's last byte.

tarfile's own streaming decompression (`mode="r|*"`) never reads a gzip trailer (CRC32 and length) and never
asks whether a bzip2 or xz stream ended: a `.tar.gz` cut 8 bytes short, one with a wrong CRC, or one whose
flipped bit still inflated all read as good data. The standard library's file classes check all of that; the
reader hands tarfile the decompressed bytes they give, reads the rest of them after the tar's end
(`read_to_end`), and their complaints become ShardErrors: `truncated_tar` when the compressed data stops before
its end, `bad_tar` when it fails a check. A format is recognised by its first bytes (tarfile's magic numbers),
whatever the file is called; anything else is read as a plain tar.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from collections.abc import Callable
from typing import IO, Any, cast

from .errors import ShardError

# name, recognises the first bytes, opens the decompressing file over the compressed bytes
_Format = tuple[str, Callable[[bytes], bool], Callable[[Any], io.BufferedIOBase]]
_FORMATS: tuple[_Format, ...] = (
    ("gzip", lambda head: head.startswith(b"\x1f\x8b\x08"), lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    ("bzip2", lambda head: head[:3] == b"BZh" and head[4:10] == b"1AY&SY", bz2.BZ2File),
    ("xz", lambda head: head.startswith(b"\xfd7zXZ"), lzma.LZMAFile),
    # xz's predecessor (lzma-alone) has no checksum: like a plain tar's, only its end and its structure are checked
    ("lzma", lambda head: head.startswith(b"\x5d\x00\x00\x80"), lzma.LZMAFile),
)
_HEAD = 10  # bytes the recognisers look at
_BUFFER = 2**20  # decompressed bytes read at once

# What the decompressing files raise on bad data (gzip.BadGzipFile, and bz2's "Invalid data stream", are
# OSErrors); a failed read of the compressed bytes themselves is told apart by `_Source.failed`.
_CORRUPT = (OSError, zlib.error, lzma.LZMAError)


def open_tar(stream: IO[bytes], shard_name: str) -> IO[bytes]:
    """The tar's bytes: `stream` itself when it is not compressed, else a `Decompressed` reader of it."""
    # look at the first bytes without consuming them (a stream without look-ahead, e.g. BytesIO, is buffered)
    buffered = stream if isinstance(stream, io.BufferedReader) else io.BufferedReader(cast(Any, stream))
    head = buffered.peek(_HEAD)[:_HEAD]
    for name, recognises, opener in _FORMATS:
        if recognises(head):
            return cast(IO[bytes], Decompressed(buffered, shard_name, name, opener))  # tarfile only reads it
    return buffered


def read_to_end(tar_stream: IO[bytes]) -> None:
    """After the tar's end: read what is left of a compressed stream, so that its checks (gzip's CRC32 and
    length trailer, the end of every bzip2/xz stream) run; a plain tar's remaining bytes are not read."""
    if isinstance(tar_stream, Decompressed):
        while tar_stream.read(_BUFFER):
            pass


class _Source:
    """The compressed bytes, remembering whether reading them failed: a storage error is not corrupt data."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.failed, self.consumed = stream, False, 0

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.stream.read(size)
        except BaseException:
            self.failed = True
            raise
        self.consumed += len(data)
        return data


class Decompressed(io.RawIOBase):
    """The decompressed bytes of a compressed tar, from the format's file class, its errors turned into
    ShardErrors naming the shard. (Reads hand on the file class's bytes: no copy into a caller's buffer.)"""

    def __init__(
        self, stream: IO[bytes], shard_name: str, fmt: str, opener: Callable[[Any], io.BufferedIOBase]
    ) -> None:
        super().__init__()
        self.source, self.shard_name, self.fmt = _Source(stream), shard_name, fmt
        self.file = opener(self.source)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            return self.file.read(size)
        except EOFError:
            if self.source.failed:
                raise
            raise ShardError(
                "truncated_tar",
                f"{self.shard_name}: the {self.fmt} data stops before its end, after {self.source.consumed} "
                "compressed bytes: the file was cut short",
            ) from None
        except _CORRUPT as e:
            if self.source.failed:
                raise
            raise ShardError(
                "bad_tar",
                f"{self.shard_name}: corrupt {self.fmt} data within the first {self.source.consumed} compressed "
                f"bytes ({type(e).__name__}: {e})",
            ) from None

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
