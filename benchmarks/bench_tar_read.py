"""What checking a compressed tar costs: tarfile's own streaming decompression (`mode="r|*"`, which checks no
gzip trailer: the reader before issue 23) against `vqpipe.compressed` (the standard library's gzip/bz2/lzma
file classes, every check on, the stream read to its end), on the same file, reading every member's bytes.

A shard of `--samples` members of `--kb` KB of random bytes (like JPEGs, they barely compress), written to a
temporary directory as .tar, .tar.gz, .tar.bz2 and .tar.xz, read from disk as the worker reads a local shard.

    python benchmarks/bench_tar_read.py [--samples 500 --kb 40 --repeats 5 --formats tar,gz,bz2,xz]
"""

from __future__ import annotations

import argparse
import bz2
import functools
import gzip
import io
import lzma
import os
import platform
import tarfile
import tempfile
from pathlib import Path

from timing import interleaved

from vqpipe import compressed


def build(samples: int, kb: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(samples):
            data = os.urandom(kb * 1024)
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_members(tar: tarfile.TarFile) -> int:
    n = 0
    for member in tar:
        tar.members = []  # type: ignore[attr-defined]  # as the reader does: memory stays flat
        if member.isreg():
            file = tar.extractfile(member)
            assert file is not None
            file.read()
            n += 1
    return n


def unchecked(path: Path) -> int:
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        return read_members(tar)


def checked(path: Path) -> int:
    with open(path, "rb") as f:
        stream = compressed.open_tar(f, path.name)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            n = read_members(tar)
        compressed.read_to_end(stream)
        return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--kb", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--formats", default="tar,gz,bz2,xz", help="comma-separated: tar, gz, bz2, xz")
    a = p.parse_args()
    data = build(a.samples, a.kb)
    print(
        f"{platform.python_version()}, {os.cpu_count()} CPUs; tar of {a.samples} x {a.kb} KB = {len(data) >> 20} MiB"
    )
    with tempfile.TemporaryDirectory() as tmp:
        formats = {"tar": bytes, "gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}
        for fmt in a.formats.split(","):
            compress = formats[fmt]
            suffix = ".tar" if fmt == "tar" else f".tar.{fmt}"
            path = Path(tmp) / f"shard{suffix}"
            path.write_bytes(compress(data))
            runs = {
                "r|* (unchecked)": functools.partial(unchecked, path),
                "vqpipe.compressed": functools.partial(checked, path),
            }
            best = interleaved(runs, a.samples, a.repeats)
            mb = len(data) / 2**20
            line = ", ".join(f"{name} {mb / s:.0f} MB/s ({s:.3f} s)" for name, s in best.items())
            print(
                f"{suffix:9s} {line}; checked/unchecked time {best['vqpipe.compressed'] / best['r|* (unchecked)']:.2f}"
            )


if __name__ == "__main__":
    main()
