"""One model replica processing whole shards end to end: read -> decode -> encode -> write -> commit.

A plain class (no Ray): the cluster layer wraps it in an actor, tests call it directly. Several shards may be in
flight at once (one calling thread each). Per shard, a reader thread streams the tar into the replica's decode
pool (decode_stage.py) and the calling thread hands the decoded crops to the replica's one encoder loop
(batcher.py, batch_encode.py), which batches them across the shards in flight and routes each shard's rows to
that shard's writer thread (async_writer.py). Each shard checks and commits on its own once all its rows are
written (this module). Memory stays bounded by the queue sizes, not by the shard size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from . import __version__, storage
from .async_writer import AsyncWriter
from .batch_encode import BatchEncoder
from .batcher import Decoded, EncoderLoop
from .config import CPU_ALLOCATOR_ENV, JobConfig
from .decode_stage import DecodeStage
from .encode import Encoder, build_encoder
from .errors import ShardError
from .ledger import Ledger
from .out.layout import Layout
from .plan import Shard
from .reader import ReadStats
from .records import DoneRecord, InputRef
from .schema import data_schema, file_metadata
from .stage_clock import StageClock
from .views import DEFAULT_VIEWS
from .writer import ShardWriter

logger = logging.getLogger(__name__)

# When a running shard looks for a done marker written by another attempt: after 2 s, then at doubling
# intervals up to 60 s. Each look is a HEAD on an object store; a fixed 2 s made a 1-minute shard cost 30.
_SUPERSEDED_CHECK_S = 2.0
_SUPERSEDED_CHECK_MAX_S = 60.0
# How long a partial batch waits for crops from shards still reading before it runs anyway. Short next to a
# batch's device time, long next to the gap between two shards' first images when many are in flight.
_BATCH_MAX_WAIT_S = 0.2
# How often a shard whose rows are all handed over looks again whether they are written (and for a twin).
_WAIT_S = 0.5


class _Superseded(Exception):
    """Another attempt committed this shard while this one was running."""


@dataclass
class _Outcome:
    sizes: dict[str, int]
    record: DoneRecord  # as committed in the data file's footer, but for its sizes


class ShardWorker:
    def __init__(
        self,
        config: JobConfig,
        encoder: Encoder,
        resolution: int,
        model_sha256: str,
        decode_threads: int,
        slots: int | None = None,
    ) -> None:
        """`slots`: how many shards the caller runs at once (an actor's concurrency); None: unknown."""
        self.config = config
        self.resolution, self.model_sha256 = resolution, model_sha256
        # A tokenize run writes format 2 only (job.py refuses older OUTs): no request to find the layout out.
        self.ledger = Ledger(
            config.output, config.storage_options, layout=Layout(config.output.rstrip("/"), 2)
        )
        enc = config.encode
        self.decode_threads = max(1, decode_threads)
        device_decoder = None
        if enc.decode == "device":
            from .device_decode import DeviceDecoder  # torchvision: needed by this option only

            device_decoder = DeviceDecoder(encoder.device, resolution)
            if encoder.device.type == "cpu":
                logger.warning(
                    "encode.decode = device on a CPU replica: not VAR-exact, and slower than PIL there"
                )
        self.decode = DecodeStage(
            resolution,
            enc.views,
            enc.max_image_pixels,
            self.decode_threads,
            prefetch=max(2 * enc.batch_size, 4 * self.decode_threads),
            on_device=device_decoder is not None,
            allow_unterminated_tar=config.run.allow_unterminated_tar,
        )
        self.batch_encoder = BatchEncoder(
            encoder, resolution, enc.max_image_pixels, enc.decode, device_decoder
        )
        self.loop = EncoderLoop(self.batch_encoder, enc.batch_size, _BATCH_MAX_WAIT_S, slots)

    @property
    def encoder(self) -> Encoder:
        """The replica's encoder (run by the encoder loop's thread only)."""
        return self.batch_encoder.encoder

    @encoder.setter
    def encoder(self, encoder: Encoder) -> None:
        self.batch_encoder.encoder = encoder

    @classmethod
    def from_config(
        cls,
        cfg: JobConfig,
        expected_sha256: str | None = None,
        cpus: int | None = None,
        slots: int | None = None,
    ) -> ShardWorker:
        """`cpus`: the CPUs this replica was given (decode threads unless encode.decode_threads says)."""
        encoder, model_sha256, resolution = build_encoder(cfg, expected_sha256)
        cpus = cpus or max(1, int(cfg.run.cpus_per_replica or 1))
        return cls(cfg, encoder, resolution, model_sha256, cfg.encode.decode_threads or cpus, slots)

    def close(self) -> None:
        self.loop.close()
        self.decode.close()

    def process(
        self,
        shard: Shard,
        attempt: int = 1,
        on_progress: Callable[[int], None] | None = None,
        look_first: bool = False,
    ) -> DoneRecord:
        """Tokenize one shard and commit it; returns the done record. Raises ShardError when the shard fails.
        A first attempt was planned from the done/ listing under the run's lease: only a retry, or a speculative
        copy (`look_first`: it may start long after the original, e.g. queued on a busy replica), looks first."""
        if attempt > 1 or look_first:  # committed after all (or a crash lost its marker: written again here)
            found = self.ledger.read_commit(shard.shard_id)
            if found is not None:
                found.skipped = True
                return found
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
            outcome = self._run(shard, attempt, started, writer, clock, counts, stats, on_progress)
        except _Superseded:
            logger.info("%s: committed meanwhile by another attempt; this copy is discarded", shard.shard_id)
            return self._committed_by_another(shard)
        record, sizes = outcome.record, outcome.sizes
        record.data_bytes, record.error_bytes = sizes["data_bytes"], sizes["error_bytes"]
        record.seconds = {k: round(v, 4) for k, v in sorted(clock.seconds.items())}
        record.wall_seconds = round(time.time() - started, 4)
        self.ledger.mark_done(shard.shard_id, record)
        logger.info(
            "%s: done, %d rows, %d errors in %.1fs",
            shard.shard_id,
            record.rows,
            record.errors,
            record.wall_seconds,
        )
        return record

    def _committed_by_another(self, shard: Shard) -> DoneRecord:
        record = self.ledger.read_commit(shard.shard_id)
        if record is None:  # never: the data file was seen; it was removed since (a reprocess by hand?)
            raise ShardError("worker_error", f"{shard.shard_id}: committed by another attempt, then removed")
        record.skipped = True
        return record

    def _run(
        self,
        shard: Shard,
        attempt: int,
        started: float,
        writer: ShardWriter,
        clock: StageClock,
        counts: Counter[str],
        stats: ReadStats,
        on_progress: Callable[[int], None] | None,
    ) -> _Outcome:
        committed_elsewhere = _SupersededCheck(self.ledger, shard.shard_id)
        first_view = self.config.encode.views[0]

        def progress(items: list[Decoded]) -> None:
            images = sum(1 for item in items if item.view == first_view)  # each image has one row per view
            if on_progress is not None and images:  # a batch may hold no first view; Ray's inc(0) raises
                on_progress(images)

        opts = self.config.storage_options
        # The version read, from the open's own metadata request (no request of its own).
        stream, read_version = storage.open_input_with_version(shard.url, opts)
        if shard.fingerprint and read_version != shard.fingerprint:
            logger.info("%s: input changed since planning; reading the new version", shard.shard_id)
        with stream, writer:
            with AsyncWriter(writer, clock, first_view) as out:
                feed = self.loop.open(shard.shard_id, out.put_rows, writer.add_error, clock.add, progress)
                try:
                    items = self.decode.items(stream, shard.shard_id, clock, stats, counts, writer.add_error)
                    with contextlib.closing(items):
                        for item in items:
                            feed.put(item)  # the one place crops enter the encoder (one row each)
                            if committed_elsewhere():
                                raise _Superseded
                    feed.close_input()
                    while not feed.wait(timeout=_WAIT_S):
                        if committed_elsewhere():
                            raise _Superseded
                finally:
                    feed.release()  # every row written, or (failed) none of its rows is written from now on
            counts["images"] = out.images
            now = storage.input_version(shard.url, opts)
            if now != read_version:  # the done marker must name the version that was read, and only one was
                raise ShardError(
                    "input_changed",
                    f"{shard.shard_id}: input changed while being read ({read_version} -> {now}); "
                    "retry reads it anew",
                )
            errors = Counter(e.reason for e in writer.errors)
            n_errors, run = sum(errors.values()), self.config.run
            # the rate says nothing about a few errors: one bad image of a 4-sample shard is 25 %
            if n_errors >= run.min_errors_to_fail and n_errors > run.max_error_rate * counts["samples"]:
                raise ShardError(
                    "too_many_errors",
                    f"{shard.shard_id}: {n_errors} of {counts['samples']} samples failed "
                    f"(limit {run.max_error_rate:.0%}, from {run.min_errors_to_fail} errors on): {dict(errors)}",
                )
            if self.ledger.data_committed(shard.shard_id):  # a speculative twin won: first commit wins
                raise _Superseded
            enc = self.config.encode
            record = DoneRecord(  # as the data file's footer keeps it; sizes and final timings come after
                shard_id=shard.shard_id,
                # the fingerprint of the bytes read (equal before and after reading), not the one from planning
                input=InputRef(storage.redact(shard.url), read_version),
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
                seconds={k: round(v, 4) for k, v in sorted(clock.seconds.items())},
                precision=self.encoder.mode.name,
                decode=enc.decode,
                agreement_with_exact=feed.agreement,
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
            sizes = clock.timed("write", writer.commit, record.to_json())
        return _Outcome(sizes, record)


class _SupersededCheck:
    """True once another attempt has committed the shard. A speculative twin (or the original it copies) may
    commit first; the running copy stops soon instead of encoding the rest, or speculation could never end a
    job sooner than the slow copy. Looks after _SUPERSEDED_CHECK_S, then at doubling intervals."""

    def __init__(self, ledger: Ledger, shard_id: str) -> None:
        self.ledger, self.shard_id = ledger, shard_id
        self.last, self.interval = time.monotonic(), _SUPERSEDED_CHECK_S

    def __call__(self) -> bool:
        if time.monotonic() - self.last < self.interval:
            return False
        self.last, self.interval = time.monotonic(), min(2 * self.interval, _SUPERSEDED_CHECK_MAX_S)
        return self.ledger.data_committed(self.shard_id)
