"""The read and decode stage of one shard: tar samples in order -> `Decoded` crops, read and decoded ahead."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

import numpy as np

from .batcher import Decoded
from .errors import SampleError
from .jpeg_probe import probe_jpeg
from .preprocess import preprocess_views
from .reader import RawSample, ReadStats, iter_samples
from .stage_clock import StageClock

logger = logging.getLogger(__name__)

_DONE = object()

# What a sample decodes to: its crops (V, 3, R, R) (PIL path), the JPEG left for the device, or why it failed.
_Result = np.ndarray | bytes | SampleError


class DecodeStage:
    """The replica's decode pool, shared by the shards in flight; each shard streams through `decoded`."""

    def __init__(
        self,
        resolution: int,
        views: tuple[str, ...],
        max_image_pixels: int,
        threads: int,
        prefetch: int,
        on_device: bool = False,
        allow_unterminated_tar: bool = False,
    ) -> None:
        self.resolution, self.views, self.max_image_pixels = resolution, views, max_image_pixels
        self.threads, self.prefetch, self.on_device = threads, prefetch, on_device
        self.allow_unterminated_tar = allow_unterminated_tar
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def items(
        self,
        stream: IO[bytes],
        shard_id: str,
        clock: StageClock,
        stats: ReadStats,
        counts: Counter[str],
        add_error: Callable[[str, str, str, bytes | None], None],
    ) -> Generator[Decoded, None, None]:
        """The shard's crops in tar order, one per image and view; every sample is counted (`counts`: samples,
        input_bytes) and every one that failed is recorded with `add_error` instead."""
        # closed with this generator, not when collected: stops the reader thread at once
        with contextlib.closing(self.decoded(stream, shard_id, clock, stats)) as decoded:
            for sample, result in decoded:
                counts["samples"] += 1
                counts["input_bytes"] += len(sample.image or b"")
                if isinstance(result, SampleError):
                    add_error(sample.key, result.reason, result.detail, sample.key_raw)
                    continue
                if isinstance(result, bytes):  # left for the device: the centre view only (config checks)
                    yield Decoded(sample.key, sample.label, sample.meta, self.views[0], jpeg=result)
                    continue
                for view, pixels in zip(self.views, result, strict=True):
                    yield Decoded(sample.key, sample.label, sample.meta, view, pixels=pixels)

    def decoded(
        self, stream: IO[bytes], shard_id: str, clock: StageClock, stats: ReadStats
    ) -> Generator[tuple[RawSample, _Result], None, None]:
        """Samples in tar order with their crops (or SampleError); reading and decoding run ahead in threads."""
        futures: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        logged = threading.Event()

        def decode(sample: RawSample) -> _Result:
            if sample.error is not None:
                return sample.error
            try:
                assert sample.image is not None  # the reader gives an image or an error
                if self.on_device and clock.timed("decode", probe_jpeg, sample.image, self.max_image_pixels):
                    return sample.image  # a JPEG the device decoder takes: decoded with its batch
                args = (sample.image, self.resolution, self.views, self.max_image_pixels)
                crops: np.ndarray = clock.timed("decode", preprocess_views, *args)  # (V, 3, R, R)
                return crops
            except SampleError as e:
                return e
            except Exception as e:  # noqa: BLE001 - one sample never fails its shard; a bug shows in the log
                if not logged.is_set():
                    logged.set()
                    logger.exception("%s: key %r: unexpected error decoding", shard_id, sample.key)
                return SampleError("sample_error", f"{type(e).__name__}: {e}"[:300])

        def read() -> None:
            try:
                samples = iter_samples(stream, shard_id, stats, self.allow_unterminated_tar)
                while not stop.is_set():
                    sample = clock.timed("read", next, samples, None)
                    if sample is None:
                        break
                    futures.put((sample, self.pool.submit(decode, sample)))
                futures.put(_DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which re-raises it
                futures.put(e)

        reader = threading.Thread(target=read, name=f"read-{shard_id}", daemon=True)
        reader.start()
        try:
            while True:
                t = time.perf_counter()
                item = futures.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                sample, future = item
                result = future.result()
                clock.add("wait_input", time.perf_counter() - t)
                yield sample, result
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue, then let it finish
                _drain(futures)
                reader.join(timeout=0.05)


def _drain(q: queue.Queue[Any]) -> None:
    try:
        while True:
            item = q.get_nowait()
            if isinstance(item, tuple) and isinstance(item[1], Future):
                item[1].cancel()
    except queue.Empty:
        pass
