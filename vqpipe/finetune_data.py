"""Training images for `vqpipe finetune`: VAR's train transform, endless shuffled batches from shards, eval images."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError, SampleError
from .preprocess import DEFAULT_MAX_PIXELS, checked_resized_size, decode_image, preprocess
from .reader import iter_samples
from .storage import open_input

logger = logging.getLogger(__name__)


def train_pixels(data: bytes, resolution: int, rng: np.random.Generator, hflip: bool = False) -> np.ndarray:
    """VAR's train transform: uint8 (3, R, R). Resize as the validation transform, then a random crop."""
    img = decode_image(data, max_pixels=DEFAULT_MAX_PIXELS)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    size = checked_resized_size(*img.size, resolution, DEFAULT_MAX_PIXELS)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    # torchvision's RandomCrop without padding: uniform offsets; the resize leaves both sides >= R.
    left = int(rng.integers(img.width - resolution + 1))
    top = int(rng.integers(img.height - resolution + 1))
    crop = img.crop((left, top, left + resolution, top + resolution))
    return np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))


class ShardImages:
    """Image bytes from WebDataset shards, shard order reshuffled every epoch, endless. Counts bad samples."""

    def __init__(self, urls: Sequence[str], storage_options: dict[str, Any] | None, seed: int):
        self.urls = list(urls)
        self.storage_options = storage_options
        self.rng = np.random.default_rng(seed)
        self.skipped = 0

    def once(self, urls: Sequence[str]) -> Iterator[tuple[str, bytes]]:
        for url in urls:
            with open_input(url, self.storage_options) as stream:
                for sample in iter_samples(stream, url):
                    if sample.image is None:
                        self.skipped += 1
                        logger.warning("%s: skipped sample %s: %s", url, sample.key, sample.error)
                        continue
                    yield f"{url}:{sample.key}", sample.image

    def forever(self) -> Iterator[tuple[str, bytes]]:
        while True:
            found = False
            for item in self.once([self.urls[i] for i in self.rng.permutation(len(self.urls))]):
                found = True
                yield item
            if not found:
                raise ConfigError(f"finetune: no readable image in {len(self.urls)} input shard(s)")


def training_batches(
    source: ShardImages, resolution: int, batch_size: int, buffer: int, hflip: bool, seed: int
) -> Iterator[torch.Tensor]:
    """Endless (B, 3, R, R) float batches in [-1, 1], drawn from a shuffle buffer of training crops."""
    rng = np.random.default_rng(seed + 1)
    pool: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for where, data in source.forever():
        try:
            pool.append(train_pixels(data, resolution, rng, hflip))
        except SampleError as e:
            source.skipped += 1
            logger.warning("%s: skipped: %s", where, e)
            continue
        if len(pool) < buffer:
            continue
        batch.append(pool.pop(int(rng.integers(len(pool)))))
        if len(batch) == batch_size:
            yield _to_model_input(batch)
            batch = []


def _to_model_input(pixels: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(pixels)).float().div_(255).mul_(2).sub_(1)


def eval_images(source: ShardImages, resolution: int, count: int) -> torch.Tensor | None:
    """The first `count` images of the inputs with VAR's validation transform (the tokenize pixels)."""
    pixels: list[np.ndarray] = []
    for where, data in source.once(source.urls):
        if len(pixels) == count:
            break
        try:
            pixels.append(preprocess(data, resolution))
        except SampleError as e:
            logger.warning("%s: not used for evaluation: %s", where, e)
    return _to_model_input(pixels) if pixels else None
