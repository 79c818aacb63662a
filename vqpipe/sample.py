"""A small, realistic WebDataset built from photos that ship with scikit-image and scikit-learn (no download).

Each sample is a random crop of one photo (some smaller than 256 px, some tall or wide strips) saved as JPEG
(random quality) or PNG (RGB, grey, RGBA or palette), with `.cls` (the photo's index in `SOURCES`, ASCII)
and `.json` (source, crop box, original size, encoding). Output for a given seed is byte-identical across
runs with the same Pillow/zlib: fixed tar metadata, one random stream per shard.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# The photos, in label order: RGB ones, one RGBA (logo), a few grey. "sklearn:" names are scikit-learn's
# sample images; the others are scikit-image's bundled `skimage.data` functions.
SOURCES: tuple[str, ...] = (
    "sklearn:china",
    "sklearn:flower",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "logo",
    "camera",
    "coins",
    "text",
)

_MAX_CROP = 640  # longest side of a crop: keeps PNGs small and generation fast
_TAR_MTIME = 1_700_000_000
_INSTALL_HINT = "the sample dataset needs scikit-image and scikit-learn: pip install 'vqpipe[sample]'"


def _load_sources() -> list[tuple[str, Image.Image]]:
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(_INSTALL_HINT)
    # Read scikit-learn's JPEGs directly: importing sklearn for load_sample_images() costs ~2 s.
    sklearn_images = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images"

    images = []
    for name in SOURCES:
        if name.startswith("sklearn:"):
            path = sklearn_images / f"{name.split(':', 1)[1]}.jpg"
            if path.is_file():
                with Image.open(path) as f:
                    img = f.convert("RGB")
            else:  # layout changed: fall back to the public API
                from sklearn.datasets import load_sample_images

                bunch = load_sample_images()
                index = [Path(p).stem for p in bunch.filenames].index(name.split(":", 1)[1])
                img = Image.fromarray(bunch.images[index])
        else:
            # (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA
            img = Image.fromarray(getattr(skimage.data, name)())
        images.append((name.removeprefix("sklearn:"), img))
    return images


def _crop_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """A random crop: mostly ordinary sizes, some smaller than 256 px, some tall or wide strips."""
    max_w, max_h = min(width, _MAX_CROP), min(height, _MAX_CROP)
    kind = rng.choice(["normal", "small", "tall", "wide"], p=[0.5, 0.2, 0.15, 0.15])
    if kind == "small":
        w, h = rng.integers(16, 200, size=2)
    elif kind == "tall":
        w = rng.integers(24, 120)
        h = rng.integers(min(3 * w, max_h), max_h + 1)
    elif kind == "wide":
        h = rng.integers(24, 120)
        w = rng.integers(min(3 * h, max_w), max_w + 1)
    else:
        w = rng.integers(min(256, max_w), max_w + 1)
        h = rng.integers(min(256, max_h), max_h + 1)
    w, h = int(min(w, max_w)), int(min(h, max_h))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    return left, top, left + w, top + h


def _encode(rng: np.random.Generator, img: Image.Image) -> tuple[str, bytes, dict]:
    """Pick a realistic encoding for a crop; returns (suffix, bytes, description)."""
    roll = rng.random()
    buf = io.BytesIO()
    if img.mode == "RGBA" and roll < 0.7:
        img.save(buf, "PNG")
        return "png", buf.getvalue(), {"format": "png", "mode": "RGBA"}
    if img.mode == "RGBA":
        img = img.convert("RGB")
    if roll < 0.6:
        quality = int(rng.integers(40, 96))
        img.save(buf, "JPEG", quality=quality)
        return "jpg", buf.getvalue(), {"format": "jpg", "mode": img.mode, "quality": quality}
    if roll < 0.75 or img.mode == "L":
        img.save(buf, "PNG")
        return "png", buf.getvalue(), {"format": "png", "mode": img.mode}
    if roll < 0.85:
        img = img.quantize(colors=int(rng.integers(16, 257)))
    elif roll < 0.93:
        img = img.convert("L")
    else:  # RGBA with a random alpha ramp (VAR drops alpha without compositing)
        w, h = img.size
        ramp = np.linspace(int(rng.integers(0, 128)), 255, w, dtype=np.float32)
        img = img.copy()
        img.putalpha(Image.fromarray(np.broadcast_to(ramp, (h, w)).astype(np.uint8)))
    img.save(buf, "PNG")
    return "png", buf.getvalue(), {"format": "png", "mode": img.mode}


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Deterministic tar (fixed mtime, uid 0, no names), written to a temporary name then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def write_sample_dataset(
    out_dir: str | os.PathLike, shards: int = 4, samples_per_shard: int = 16, seed: int = 0
) -> list[str]:
    """Write `shards` WebDataset tars `sample-000000.tar`, ... into the local directory `out_dir`.

    Keys are `<shard:06d>_<index:06d>`, unique across shards; members of a sample are contiguous and sorted.
    Returns the shard paths. Deterministic for a given seed.
    """
    if shards < 1 or samples_per_shard < 1:
        raise ValueError(f"shards and samples_per_shard must be >= 1, got {shards} and {samples_per_shard}")
    sources = _load_sources()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    paths = []
    for shard in range(shards):
        rng = np.random.default_rng([seed, shard])
        members: list[tuple[str, bytes]] = []
        for index in range(samples_per_shard):
            key = f"{shard:06d}_{index:06d}"
            label = int(rng.integers(len(sources)))
            name, photo = sources[label]
            box = _crop_box(rng, *photo.size)
            suffix, data, encoding = _encode(rng, photo.crop(box))
            meta = {"source": name, "label": label, "crop_box": list(box), "original_size": list(photo.size)}
            meta.update(encoding)
            sample = {
                "cls": str(label).encode("ascii"),
                "json": json.dumps(meta, sort_keys=True).encode(),
                suffix: data,
            }
            members.extend((f"{key}.{ext}", sample[ext]) for ext in sorted(sample))
        path = out / f"sample-{shard:06d}.tar"
        _write_tar(path, members)
        logger.info("wrote %s (%d samples)", path, samples_per_shard)
        paths.append(str(path))
    return paths
