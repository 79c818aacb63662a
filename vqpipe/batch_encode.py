"""Encoding one batch on the encoder loop's thread: device decode of its JPEGs, the encoder, agreement samples."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from .batcher import Decoded, EncodedBatch, Feed
from .encode import Encoder
from .errors import SampleError
from .preprocess import preprocess

if TYPE_CHECKING:
    import torch

    from .device_decode import DeviceDecoder


class BatchEncoder:
    """`encoder` applied to batches of `Decoded` items from any shards in flight (an `EncoderLoop`'s encode)."""

    def __init__(
        self,
        encoder: Encoder,
        resolution: int,
        max_image_pixels: int,
        decode: str,
        device_decoder: DeviceDecoder | None = None,
    ) -> None:
        self.encoder, self.resolution, self.max_image_pixels = encoder, resolution, max_image_pixels
        self.decode, self.device_decoder = decode, device_decoder

    @property
    def exact(self) -> bool:
        return bool(self.encoder.mode.exact) and self.device_decoder is None

    def __call__(self, batch: list[tuple[Feed, Decoded]]) -> EncodedBatch:
        """A batch -> the items kept, codes, var_input, device seconds by stage. An image the device cannot
        decode becomes its shard's error."""
        pixels: np.ndarray | torch.Tensor
        if self.device_decoder is not None:
            kept, stacked = self._decode_on_device(batch)
            if stacked is None:
                return EncodedBatch([])
            batch, pixels = kept, stacked
        else:
            pixels = np.stack([self.pil_pixels(item) for _, item in batch])  # host pixels: PIL decoded them
        # A sample of drift for each shard: its crops in the first batch it is in.
        fresh = {feed for feed, _ in batch if feed.agreement is None}
        if fresh and not self.exact:
            rows = [i for i, (feed, _) in enumerate(batch) if feed in fresh]
            agreement = self._agreement([batch[i][1] for i in rows], pixels[rows])
            for feed in fresh:
                feed.agreement = agreement
        seconds: Counter[str] = Counter()
        codes, var_input = self.encoder(pixels, timer=lambda stage, s: seconds.update({stage: s}))
        return EncodedBatch(batch, codes, var_input, dict(seconds))

    def _agreement(self, items: list[Decoded], pixels: np.ndarray | torch.Tensor) -> dict[str, Any]:
        """Codes of this batch as configured vs. exact (PIL pixels, exact encoder), per scale."""
        exact_pixels = None
        if self.device_decoder is not None:
            exact_pixels = np.stack([self.pil_pixels(item) for item in items])
        report = self.encoder.agreement_with_exact(pixels, exact_pixels=exact_pixels)
        return {**report, "decode": self.decode}

    def pil_pixels(self, item: Decoded) -> np.ndarray:
        if item.pixels is not None:
            return item.pixels
        assert item.jpeg is not None  # a Decoded holds one or the other (decode_stage makes them)
        return preprocess(item.jpeg, self.resolution, self.max_image_pixels)

    def _decode_on_device(
        self, batch: list[tuple[Feed, Decoded]]
    ) -> tuple[list[tuple[Feed, Decoded]], torch.Tensor | None]:
        """Decode the batch's JPEGs on the device. One the device cannot decode takes the exact PIL path, which
        gives it its proper error reason if it is broken; the batch keeps the others, in order."""
        assert self.device_decoder is not None
        jpegs = [item.jpeg for _, item in batch if item.jpeg is not None]
        t = time.perf_counter()
        decoded = iter(self.device_decoder(jpegs))
        seconds = (time.perf_counter() - t) / max(1, len(jpegs))  # each shard is charged for its images
        kept: list[tuple[Feed, Decoded]] = []
        pixels: list[Any] = []
        for feed, item in batch:
            result: Any = item.pixels
            if item.jpeg is not None:
                feed.timer("decode_device", seconds)
                result = next(decoded)
            if isinstance(result, Exception):
                t = time.perf_counter()
                try:
                    result = self.pil_pixels(item)
                except SampleError as e:
                    feed.add_error(item.key, e.reason, e.detail)
                    continue
                finally:
                    feed.timer("decode", time.perf_counter() - t)
            kept.append((feed, item))
            pixels.append(result)
        return kept, (self.device_decoder.stack(pixels) if kept else None)
