"""One model replica processing whole shards end to end: read -> decode -> encode -> write -> commit.

A plain class (no Ray): the cluster layer wraps it in an actor, tests call it directly. Inside a shard the
stages overlap through bounded queues: a reader thread streams the tar and feeds a decode pool; the calling
thread batches decoded pixels and runs the encoder; a writer thread turns results into Parquet row groups.
Memory stays bounded by the queue sizes, not by the shard size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import resource
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from . import __version__, storage
from .config import CPU_ALLOCATOR_ENV, JobConfig
from .encode import Encoder, build_encoder
from .errors import SampleError, ShardError
from .ledger import Ledger
from .plan import Shard
from .preprocess import preprocess, preprocess_views, probe_jpeg
from .reader import RawSample, ReadStats, iter_samples
from .records import DoneRecord, InputRef
from .schema import data_schema, file_metadata
from .views import DEFAULT_VIEWS
from .writer import ShardWriter

logger = logging.getLogger(__name__)

_DONE = object()
# When a running shard looks for a done marker written by another attempt: after 2 s, then at doubling
# intervals up to 60 s. Each look is a HEAD on an object store; a fixed 2 s made a 1-minute shard cost 30.
_SUPERSEDED_CHECK_S = 2.0
_SUPERSEDED_CHECK_MAX_S = 60.0


class _Superseded(Exception):
    """Another attempt committed this shard while this one was running."""


class _Jpeg(NamedTuple):
    """A JPEG whose header checked out, left for the device to decode (`encode.decode = "device"`)."""

    data: bytes


class StageClock:
    """Seconds spent per stage, summed over threads (thread-safe)."""

    def __init__(self) -> None:
        self.seconds: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def timed(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.add(stage, time.perf_counter() - t)


class ShardWorker:
    def __init__(
        self, config: JobConfig, encoder: Encoder, resolution: int, model_sha256: str, decode_threads: int
    ):
        self.config, self.encoder = config, encoder
        self.resolution, self.model_sha256 = resolution, model_sha256
        self.ledger = Ledger(config.output, config.storage_options)
        self.decode_threads = max(1, decode_threads)
        self.pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
        self.prefetch = max(2 * config.encode.batch_size, 4 * decode_threads)
        self.device_decoder = None
        if config.encode.decode == "device":
            from .device_decode import DeviceDecoder  # torchvision: needed by this option only

            self.device_decoder = DeviceDecoder(encoder.device, resolution)
            if encoder.device.type == "cpu":
                logger.warning(
                    "encode.decode = device on a CPU replica: not VAR-exact, and slower than PIL there"
                )

    @classmethod
    def from_config(
        cls, cfg: JobConfig, expected_sha256: str | None = None, cpus: int | None = None
    ) -> ShardWorker:
        """`cpus`: the CPUs this replica was given (decode threads unless encode.decode_threads says)."""
        encoder, model_sha256, resolution = build_encoder(cfg, expected_sha256)
        cpus = cpus or max(1, int(cfg.run.cpus_per_replica or 1))
        return cls(cfg, encoder, resolution, model_sha256, cfg.encode.decode_threads or cpus)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def process(
        self, shard: Shard, attempt: int = 1, on_progress: Callable[[int], None] | None = None
    ) -> DoneRecord:
        """Tokenize one shard and commit it; returns the done record. Raises ShardError when the shard fails.
        A first attempt was planned from the done/ listing under the run's lease: only a retry looks first."""
        if attempt > 1 and self.ledger.is_done(shard.shard_id):  # an earlier attempt committed after all
            return self._committed_by_another(shard)
        started, clock = time.time(), StageClock()
        enc = self.config.encode
        meta = file_metadata(
            self.encoder.layout,
            resolution=self.resolution,
            preset=self.config.model.preset,
            model_sha256=self.model_sha256,
            precision={**self.encoder.settings, "decode": enc.decode},
            shard={"id": shard.shard_id, "url": storage.redact(shard.url)},
            batch_size=enc.batch_size,
            vqpipe_version=__version__,
            views=enc.views,
        )
        schema = data_schema(self.encoder.layout, meta, view_column=enc.views != DEFAULT_VIEWS)
        writer = ShardWriter(
            self.ledger.data_url(shard.shard_id),
            self.ledger.errors_url(shard.shard_id),
            schema,
            enc.rows_per_group,
            self.config.storage_options,
        )
        counts: Counter = Counter()
        stats = ReadStats()
        try:
            sizes, errors, agreement, read_fp = self._run(shard, writer, clock, counts, stats, on_progress)
        except _Superseded:
            logger.info("%s: committed meanwhile by another attempt; this copy is discarded", shard.shard_id)
            return self._committed_by_another(shard)
        n_errors = sum(errors.values())
        record = DoneRecord(
            shard_id=shard.shard_id,
            # the fingerprint of the bytes read (equal before and after reading), not the one from planning
            input=InputRef(storage.redact(shard.url), read_fp),
            samples=counts["samples"],
            images=counts["images"],  # encoded; images + errors = samples
            rows=writer.rows,  # one per image and view
            views=list(enc.views),
            errors=n_errors,
            errors_by_reason=dict(sorted(errors.items())),
            # every tar member is in a sample or counted here (docs/reliability.md, "Every member accounted")
            members=stats.members,
            ignored_members=sum(stats.ignored.values()),
            ignored_by_reason=dict(sorted(stats.ignored.items())),
            input_bytes=counts["input_bytes"],
            data_bytes=sizes["data_bytes"],
            error_bytes=sizes["error_bytes"],
            seconds={k: round(v, 4) for k, v in sorted(clock.seconds.items())},
            precision=self.encoder.mode.name,
            decode=enc.decode,
            agreement_with_exact=agreement,
            wall_seconds=round(time.time() - started, 4),
            started=started,
            attempt=attempt,
            host=socket.gethostname(),
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            decode_threads=self.decode_threads,
            allocator_env={k: os.environ[k] for k in CPU_ALLOCATOR_ENV if k in os.environ},
            pid=os.getpid(),
            vqpipe_version=__version__,
        )
        self.ledger.mark_done(shard.shard_id, record)
        logger.info(
            "%s: done, %d rows, %d errors in %.1fs",
            shard.shard_id,
            writer.rows,
            n_errors,
            record.wall_seconds,
        )
        return record

    def _committed_by_another(self, shard: Shard) -> DoneRecord:
        record = self.ledger.read_done(shard.shard_id)
        record.skipped = True
        return record

    def _run(
        self,
        shard: Shard,
        writer: ShardWriter,
        clock: StageClock,
        counts: Counter,
        stats: ReadStats,
        on_progress,
    ) -> tuple:
        agreement = None
        last_check, interval = time.monotonic(), _SUPERSEDED_CHECK_S

        def committed_elsewhere() -> bool:
            # A speculative twin (or the original it copies) may commit first; stop at the next batch instead
            # of encoding the rest, or speculation could never end a job sooner than the slow copy.
            nonlocal last_check, interval
            if time.monotonic() - last_check < interval:
                return False
            last_check, interval = time.monotonic(), min(2 * interval, _SUPERSEDED_CHECK_MAX_S)
            return self.ledger.is_done(shard.shard_id)

        opts = self.config.storage_options
        # The version read, from the open's own metadata request (no request of its own).
        stream, read_fp = storage.open_input_with_version(shard.url, opts)
        if shard.fingerprint and read_fp != shard.fingerprint:
            logger.info("%s: input changed since planning; reading the new version", shard.shard_id)
        with stream, writer:
            with (
                _AsyncWriter(writer, clock) as out,
                contextlib.closing(self._decoded(stream, shard, clock, stats)) as decoded,
            ):
                for batch in self._batches(decoded, writer, counts):
                    if self.device_decoder is not None:
                        batch, pixels = self._decode_on_device(batch, writer, clock)
                        if not batch:
                            continue
                    else:
                        pixels = np.stack([item[3] for item in batch])
                    keys, labels, metas, _, views = zip(*batch)
                    if agreement is None and not self._exact:  # a per-shard sample of drift
                        agreement = self._agreement(batch, pixels)
                    codes, var_input = self.encoder(pixels, timer=clock.add)
                    out.put((keys, labels, metas, codes, var_input, views))
                    images = views.count(self.config.encode.views[0])  # each image has one row per view
                    counts["images"] += images
                    if on_progress and images:  # a batch of crops may hold no first view; Ray's inc(0) raises
                        on_progress(images)
                    if committed_elsewhere():
                        raise _Superseded
            now = storage.input_version(shard.url, opts)
            if now != read_fp:  # the done marker must name the version that was read, and only one was
                raise ShardError(
                    "input_changed",
                    f"{shard.shard_id}: input changed while being read ({read_fp} -> {now}); retry reads it anew",
                )
            errors = Counter(e.reason for e in writer.errors)
            n_errors = sum(errors.values())
            if counts["samples"] and n_errors > self.config.run.max_error_rate * counts["samples"]:
                raise ShardError(
                    "too_many_errors",
                    f"{shard.shard_id}: {n_errors} of {counts['samples']} samples failed "
                    f"(limit {self.config.run.max_error_rate:.0%}): {dict(errors)}",
                )
            if self.ledger.is_done(shard.shard_id):  # a speculative twin won: first commit wins
                raise _Superseded
            sizes = clock.timed("write", writer.commit)
        return sizes, errors, agreement, read_fp

    @property
    def _exact(self) -> bool:
        return self.encoder.mode.exact and self.device_decoder is None

    def _agreement(self, batch: list, pixels: Any) -> dict[str, Any]:
        """Codes of this batch as configured vs. exact (PIL pixels, exact encoder), per scale."""
        exact_pixels = None
        if self.device_decoder is not None:
            exact_pixels = np.stack([self._pil_pixels(item[3]) for item in batch])
        report = self.encoder.agreement_with_exact(pixels, exact_pixels=exact_pixels)
        return {**report, "decode": self.config.encode.decode}

    def _pil_pixels(self, item: Any) -> np.ndarray:
        if isinstance(item, _Jpeg):
            return preprocess(item.data, self.resolution, self.config.encode.max_image_pixels)
        return item

    def _decode_on_device(self, batch: list, writer: ShardWriter, clock: StageClock) -> tuple[list, Any]:
        """Decode the batch's JPEGs on the device. One the device cannot decode takes the exact PIL path, which
        gives it its proper error reason if it is broken; the batch keeps the others, in order."""
        jpegs = [item[3].data for item in batch if isinstance(item[3], _Jpeg)]
        decoded = iter(clock.timed("decode_device", self.device_decoder, jpegs))
        kept, pixels = [], []
        for item in batch:
            result = next(decoded) if isinstance(item[3], _Jpeg) else item[3]
            if isinstance(result, Exception):
                try:
                    result = clock.timed("decode", self._pil_pixels, item[3])
                except SampleError as e:
                    writer.add_error(item[0], e.reason, e.detail)
                    continue
            kept.append(item)
            pixels.append(result)
        return kept, (self.device_decoder.stack(pixels) if kept else None)

    def _decoded(
        self, stream, shard: Shard, clock: StageClock, stats: ReadStats
    ) -> Iterator[tuple[RawSample, Any]]:
        """Samples in tar order with their pixels (or SampleError); reading and decoding run ahead in threads."""
        futures: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        resolution, max_pixels = self.resolution, self.config.encode.max_image_pixels
        views = self.config.encode.views
        on_device = self.device_decoder is not None
        logged = threading.Event()

        def decode(sample: RawSample) -> Any:
            if sample.error is not None:
                return sample.error
            try:
                if on_device and clock.timed("decode", probe_jpeg, sample.image, max_pixels) is not None:
                    return _Jpeg(sample.image)
                return clock.timed("decode", preprocess_views, sample.image, resolution, views, max_pixels)
            except SampleError as e:
                return e
            except Exception as e:  # noqa: BLE001 - one sample never fails its shard; a bug shows in the log
                if not logged.is_set():
                    logged.set()
                    logger.exception("%s: key %r: unexpected error decoding", shard.shard_id, sample.key)
                return SampleError("sample_error", f"{type(e).__name__}: {e}"[:300])

        def read() -> None:
            try:
                samples = iter_samples(stream, shard.shard_id, stats, self.config.run.allow_unterminated_tar)
                while not stop.is_set():
                    sample = clock.timed("read", next, samples, None)
                    if sample is None:
                        break
                    futures.put((sample, self.pool.submit(decode, sample)))
                futures.put(_DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the consuming thread, which re-raises it
                futures.put(e)

        reader = threading.Thread(target=read, name=f"read-{shard.shard_id}", daemon=True)
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

    def _batches(self, decoded, writer: ShardWriter, counts: Counter) -> Iterator[list]:
        batch: list = []
        for sample, result in decoded:
            counts["samples"] += 1
            counts["input_bytes"] += len(sample.image or b"")
            if isinstance(result, SampleError):
                writer.add_error(sample.key, result.reason, result.detail, sample.key_raw)
                continue
            # One decoded image -> one batch item per view (an encoder batch counts crops); a _Jpeg is the centre
            # view only (the config refuses other views with device decode).
            crops = [result] if isinstance(result, _Jpeg) else result
            for view, pixels in zip(self.config.encode.views, crops, strict=True):
                batch.append((sample.key, sample.label, sample.meta, pixels, view))
                if len(batch) == self.config.encode.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            item = q.get_nowait()
            if isinstance(item, tuple) and isinstance(item[1], Future):
                item[1].cancel()
    except queue.Empty:
        pass


class _AsyncWriter:
    """Writes finished batches on a background thread so Parquet encoding overlaps the next batch's encode."""

    def __init__(self, writer: ShardWriter, clock: StageClock, depth: int = 2):
        self.writer, self.clock = writer, clock
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def __enter__(self) -> _AsyncWriter:
        self.thread.start()
        return self

    def put(self, item: tuple) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.queue.put(_DONE)
        self.thread.join()
        if self.error is not None and exc is None:
            raise self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not _DONE:
            if self.error is None:
                try:
                    self.clock.timed("write", self.writer.write, *item)
                except BaseException as e:  # noqa: BLE001 - surfaced on the encoding thread
                    self.error = e
