"""Test helper: write small WebDataset shards, including damaged samples and damaged tars.

Imported by tests as `from shards import ...`. Every image is generated on the fly and is at most 96 px on a
side (except the decompression bomb, whose header lies), so shards stay a few hundred KB and tests fast.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

Sample = dict  # {"__key__": str, "<suffix>": bytes, ...}

_MTIME = 1_700_000_000  # fixed, so the same samples give the same tar bytes


def _tar_bytes(samples: list[Sample]) -> bytes:
    """A tar with the members of each sample contiguous, in the order given, as `<key>.<suffix>`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for suffix, value in sample.items():
                if suffix.startswith("__"):
                    continue
                data = value.encode() if isinstance(value, str) else bytes(value)
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(path: str | os.PathLike, samples: list[Sample]) -> None:
    """Write `samples` (each `{"__key__": key, suffix: bytes|str, ...}`) as a WebDataset tar at `path`."""
    with open(path, "wb") as f:
        f.write(_tar_bytes(samples))


def write_not_a_tar(path: str | os.PathLike) -> None:
    """A file named like a shard that is not a tar at all."""
    with open(path, "wb") as f:
        f.write(b"this is not a tar archive\n" * 40)


def write_truncated_tar(path: str | os.PathLike, samples: list[Sample]) -> list[str]:
    """Write a valid tar of `samples`, then cut it in the middle of the data of a member near the middle.

    Returns the keys of the samples that lie entirely before the cut (a reader sees those, then an error).
    """
    data = _tar_bytes(samples)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [m for m in tar.getmembers() if m.size >= 2]
    if not members:
        raise ValueError("need at least one member of 2 bytes or more to cut")
    victim = members[len(members) // 2]
    cut = victim.offset_data + victim.size // 2
    with open(path, "wb") as f:
        f.write(data[:cut])
    victim_key = victim.name.split(".", 1)[0]
    keys = [s["__key__"] for s in samples]
    return keys[: keys.index(victim_key)]


def _pixels(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth RGBA picture with a little noise: compresses well, yet every pixel differs per seed."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 4)
    chans = [
        127.5 + 100 * np.sin(x / max(w, 1) * (3 + i) + y / max(h, 1) * (2 + i) + phase[i]) for i in range(4)
    ]
    arr = np.stack(chans, axis=-1) + rng.normal(0, 6, (h, w, 4))
    return np.clip(arr, 0, 255).astype(np.uint8)


def good_image_bytes(
    seed: int, fmt: str = "jpg", size: tuple[int, int] = (64, 48), mode: str = "RGB"
) -> bytes:
    """A valid image file: `fmt` is a file extension (jpg, png, webp, gif, bmp, tiff, ppm, ...), `size` is
    (width, height), `mode` a PIL mode: RGB, RGBA, L, LA, P (adaptive palette), CMYK, 1, I;16."""
    rgba = _pixels(seed, size)
    if mode == "I;16":
        img = Image.fromarray(rgba[..., 0].astype(np.uint16) * 257)  # full 16-bit range
    elif mode == "P":
        img = Image.fromarray(rgba[..., :3]).quantize(colors=32)
    else:
        img = Image.fromarray(rgba, "RGBA").convert(mode)
    pil_format = Image.registered_extensions()[f".{fmt.lower()}"]
    buf = io.BytesIO()
    img.save(buf, pil_format, **({"quality": 90} if pil_format == "JPEG" else {}))
    return buf.getvalue()


def bomb_png_bytes(width: int = 30_000, height: int = 30_000) -> bytes:
    """A ~100-byte PNG whose header declares width×height 1-bit pixels (900 M by default).

    Only a few rows of data follow, so a decoder that ignored the header and decoded anyway would report
    `truncated`, not `too_large`: a test can tell "checked before decoding" from "checked after".
    """

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale, no interlace
    rows = (b"\x00" + b"\x00" * ((width + 7) // 8)) * 4
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


def corrupt_jpeg_bytes(seed: int) -> bytes:
    """A JPEG whose header PIL accepts but whose Huffman table libjpeg rejects ("broken data stream")."""
    data = bytearray(good_image_bytes(seed, "jpg", size=(64, 64)))
    dht = data.find(b"\xff\xc4")  # marker, 2-byte length, class/id, then 16 code-length counts
    data[dht + 5 : dht + 21] = b"\xff" * 16  # counts summing to 4080 > 256: "Bogus Huffman table"
    return bytes(data)


def truncated_bytes(seed: int, fmt: str = "jpg") -> bytes:
    """The first half of a valid image, cut inside the pixel data."""
    data = good_image_bytes(seed, fmt, size=(96, 96))
    return data[: len(data) // 2]


# (case name, image suffix or None, bytes factory, expected reason or None for a valid image)
_CASES = [
    ("rgb_jpg", "jpg", lambda s: good_image_bytes(s, "jpg", (64, 48)), None),
    ("rgb_png", "png", lambda s: good_image_bytes(s, "png", (40, 72)), None),
    ("rgb_webp", "webp", lambda s: good_image_bytes(s, "webp", (50, 50)), None),
    ("grey_png", "png", lambda s: good_image_bytes(s, "png", (48, 48), "L"), None),
    ("grey_jpg", "jpg", lambda s: good_image_bytes(s, "jpg", (48, 40), "L"), None),
    ("la_png", "png", lambda s: good_image_bytes(s, "png", (40, 40), "LA"), None),
    ("cmyk_jpg", "jpg", lambda s: good_image_bytes(s, "jpg", (56, 40), "CMYK"), None),
    ("palette_png", "png", lambda s: good_image_bytes(s, "png", (64, 64), "P"), None),
    ("palette_gif", "gif", lambda s: good_image_bytes(s, "gif", (32, 48), "P"), None),
    ("rgba_png", "png", lambda s: good_image_bytes(s, "png", (48, 64), "RGBA"), None),
    ("i16_png", "png", lambda s: good_image_bytes(s, "png", (40, 30), "I;16"), None),
    ("bilevel_png", "png", lambda s: good_image_bytes(s, "png", (33, 17), "1"), None),
    ("tiny_jpg", "jpg", lambda s: good_image_bytes(s, "jpg", (5, 3)), None),
    ("strip_png", "png", lambda s: good_image_bytes(s, "png", (96, 4)), None),
    ("corrupt_jpg", "jpg", corrupt_jpeg_bytes, "decode_error"),
    ("truncated_jpg", "jpg", lambda s: truncated_bytes(s, "jpg"), "truncated"),
    ("truncated_png", "png", lambda s: truncated_bytes(s, "png"), "truncated"),
    ("text_jpg", "jpg", lambda s: f"not an image, seed {s}\n".encode(), "not_an_image"),
    ("no_image", None, None, "missing_image"),
    ("bomb_png", "png", lambda s: bomb_png_bytes(), "too_large"),
    ("empty_jpg", "jpg", lambda s: b"", "empty"),
]


def defect_samples(seed: int) -> tuple[list[Sample], dict[str, str | None]]:
    """One shard's worth of samples: good images, unusual-but-valid images, and one of each bad kind.

    Returns (samples, expected) where `expected` maps EVERY key to its expected error reason, or None for
    a sample that must tokenize. Keys are `<seed:06d>_<i:06d>` (unique across seeds); the order of cases
    is shuffled by the seed. Each sample carries `.cls` (its index) and `.json` (`{"case": name}`).
    """
    cases = list(_CASES)
    random.Random(seed).shuffle(cases)
    samples, expected = [], {}
    for i, (case, suffix, make, reason) in enumerate(cases):
        key = f"{seed:06d}_{i:06d}"
        sample: Sample = {"__key__": key}
        if suffix is not None:
            sample[suffix] = make(seed * 1000 + i)
        sample["cls"] = str(i).encode()
        sample["json"] = json.dumps({"case": case, "seed": seed}).encode()
        samples.append(sample)
        expected[key] = reason
    return samples, expected
