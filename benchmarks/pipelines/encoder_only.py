"""The ceiling: the encoder alone on pre-decoded batches."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from vqpipe.encode import Encoder
from vqpipe.errors import SampleError
from vqpipe.preprocess import preprocess
from vqpipe.reader import iter_samples


def encoder_only(encoder: Encoder, paths: list[str], resolution: int, batch_size: int) -> dict[str, Any]:
    """Pre-decode every image, then time the encoder alone on the same per-shard batches the job forms."""
    t = time.perf_counter()
    batches, keys = [], []
    for path in paths:
        pixels, shard_keys = [], []
        with open(path, "rb") as f:
            for sample in iter_samples(f, Path(path).stem):
                try:
                    pixels.append(preprocess(sample.image, resolution))
                except SampleError:  # also a sample the reader rejected (no image bytes)
                    continue
                shard_keys.append(sample.key)
        batches += [np.stack(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
        keys += shard_keys
    decode_s = time.perf_counter() - t
    encoder(batches[0])  # warm-up: allocator, kernel selection, cuDNN handles
    codes, per_image = [], []
    for batch in batches:
        t = time.perf_counter()
        codes.append(encoder(batch))
        per_image.append((time.perf_counter() - t) / len(batch))
    images = sum(len(b) for b in batches)
    # The ceiling: the median batch, so that a burst of other work on the machine does not lower it.
    seconds = float(np.median(per_image)) * images
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "seconds_total": float(sum(t * len(b) for t, b in zip(per_image, batches))),
        "sequential_decode_s": decode_s,
        "_outputs": dict(
            zip(keys, zip(np.concatenate([c for c, _ in codes]), _rows([v for _, v in codes], images)))
        ),
    }


def _rows(parts: list[np.ndarray | None], n: int) -> list:
    return list(np.concatenate(parts)) if parts[0] is not None else [None] * n
