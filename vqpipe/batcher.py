"""One encoder loop per replica: images from every shard in flight -> full batches -> each shard's rows back.

Shards are units of work, retry and commit, but a batch need not be: a 2-image shard encoded alone runs the
device on batches of 2. Here each shard in flight opens a `Feed` and puts its decoded crops (`Decoded`, one per
image and view: one row each) into one bounded queue; a single thread (the only one that touches the device)
forms batches of `batch_size` across shards, encodes them and hands every shard its own slice of the result, in
its order. A partial batch runs when its oldest item has waited `max_wait_s`, or at once when waiting cannot
fill it: no shard is still reading and every slot for a shard (`slots`, the shards the replica may hold) is
taken by one waiting for this batch. Writing, errors and the commit stay per shard (worker.py): a shard that
fails or is superseded is cancelled and its items are dropped, the other shards' rows are untouched.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import STORAGE_ERROR, ShardError, StorageError

logger = logging.getLogger(__name__)


class _Signal:
    """A control message on the loop's queue (a shard begins, ends its input, releases its slot; stop)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_BEGIN, _END, _RELEASE, _STOP = _Signal("begin"), _Signal("end"), _Signal("release"), _Signal("stop")


@dataclass(frozen=True)
class Decoded:
    """One crop ready for the encoder (one output row), with what its row needs. `pixels`: uint8 (3, R, R) from
    the exact PIL path; `jpeg`: bytes whose header checked out, left for the device decoder
    (`encode.decode = "device"`, centre view only). `view`: which of `encode.views` this crop is."""

    key: str
    label: int | None
    meta: str | None
    view: str
    pixels: np.ndarray | None = None
    jpeg: bytes | None = None


@dataclass
class EncodedBatch:
    """What encoding a batch gave: the (feed, item) pairs kept (an item the device could not decode is its
    shard's error instead), their codes and var_input rows in that order, and device seconds by stage."""

    kept: list[tuple[Feed, Decoded]]
    codes: np.ndarray | None = None
    var_input: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)


# sink(items, codes, var_input): the shard's writer takes the rows of `items` (its own, in its order).
Sink = Callable[[list[Decoded], np.ndarray, "np.ndarray | None"], None]
AddError = Callable[[str, str, str], None]
Timer = Callable[[str, float], None]
Progress = Callable[[list[Decoded]], None]
EncodeFn = Callable[[list[tuple["Feed", Decoded]]], EncodedBatch]


class Feed:
    """One shard's connection to the encoder loop. The shard's thread puts, closes and waits; the loop encodes,
    routes rows to `sink`, records sample errors with `add_error` and reports failures through `wait`."""

    def __init__(
        self,
        loop: EncoderLoop,
        shard_id: str,
        sink: Sink,
        add_error: AddError,
        timer: Timer,
        on_progress: Progress | None,
    ) -> None:
        self.loop, self.shard_id = loop, shard_id
        self.sink, self.add_error, self.timer, self.on_progress = sink, add_error, timer, on_progress
        # Set by the encode function from this shard's first batch.
        self.agreement: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._submitted = self._finished = 0
        self._closed = False
        self._cond = threading.Condition()
        self._route_lock = threading.Lock()  # cancel() waits for a sink call in progress, then none follows

    def put(self, item: Decoded) -> None:
        if self.error is not None:
            raise self.error
        with self._cond:
            self._submitted += 1
        self.loop.send(self, item)

    def close_input(self) -> None:
        """No more items from this shard (idempotent): the loop need not wait for it to fill a batch."""
        if not self._closed:
            self._closed = True
            self.loop.send(self, _END)

    def wait(self, timeout: float) -> bool:
        """True once every item put has been written or recorded as an error; raises the shard's failure."""
        with self._cond:
            self._cond.wait_for(lambda: self._finished >= self._submitted or self.error is not None, timeout)
            if self.error is not None:
                raise self.error
            if self._finished >= self._submitted:
                return True
        self.loop.check_alive(self.shard_id)
        return False

    def release(self) -> None:
        """The shard needs the loop no more (all written, or failed): its slot will soon take a new shard."""
        self.cancel()
        self.loop.send(self, _RELEASE)

    def cancel(self) -> None:
        """Drop this shard's items still queued or batched; after this returns, `sink` is never called again."""
        with self._route_lock:
            self.cancelled = True
        self.close_input()

    # -- called by the loop -------------------------------------------------------------------------------------

    def _route(self, items: list[Decoded], codes: np.ndarray, var_input: np.ndarray | None) -> None:
        with self._route_lock:
            if not self.cancelled:
                try:
                    self.sink(items, codes, var_input)
                except BaseException as e:  # noqa: BLE001 - this shard's writer failed: this shard fails
                    self._fail(e)
        if self.on_progress is not None and not self.cancelled:
            try:
                self.on_progress(items)
            except Exception:  # noqa: BLE001 - a progress counter never fails a shard, nor its batch's others
                logger.warning("%s: progress callback failed", self.shard_id, exc_info=True)

    def _finish(self, n: int) -> None:
        with self._cond:
            self._finished += n
            self._cond.notify_all()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = error
            self.cancelled = True
            self._cond.notify_all()


class EncoderLoop:
    """The replica's device thread. `encode([(feed, item), ...])` -> EncodedBatch (e.g. batch_encode.BatchEncoder);
    rows of its codes and var_input follow the pairs it kept."""

    def __init__(
        self, encode: EncodeFn, batch_size: int, max_wait_s: float, slots: int | None = None
    ) -> None:
        """`slots`: how many shards the replica can hold at once; None (unknown): a partial batch runs as soon as
        no shard is reading, which is how each shard ran alone before batches spanned shards."""
        self.encode, self.batch_size, self.max_wait_s, self.slots = encode, batch_size, max_wait_s, slots
        self.queue: queue.Queue[tuple[Feed | None, Decoded | _Signal]] = queue.Queue(maxsize=2 * batch_size)
        # Items per batch encoded -> batches: how full the device runs.
        self.batch_sizes: Counter[int] = Counter()
        self.thread = threading.Thread(target=self._run, name="encoder", daemon=True)
        self.thread.start()

    def open(
        self,
        shard_id: str,
        sink: Sink,
        add_error: AddError,
        timer: Timer,
        on_progress: Progress | None = None,
    ) -> Feed:
        feed = Feed(self, shard_id, sink, add_error, timer, on_progress)
        self.send(feed, _BEGIN)
        return feed

    def send(self, feed: Feed, item: Decoded | _Signal) -> None:
        """Queue an item or a signal for the loop; waits while the queue is full, fails if the loop has stopped."""
        while True:
            try:
                return self.queue.put((feed, item), timeout=1.0)
            except queue.Full:
                self.check_alive(feed.shard_id)

    def check_alive(self, shard_id: str) -> None:
        """A stopped loop (closed, or killed by a bug) will never finish a shard: fail it instead of hanging."""
        if not self.thread.is_alive():
            raise ShardError("worker_error", f"{shard_id}: the replica's encoder loop has stopped")

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put((None, _STOP))
            self.thread.join()

    def _run(self) -> None:
        batch: list[tuple[Feed, Decoded]] = []
        reading = 0  # shards whose input has not ended: they may still add to the batch
        held = 0  # shards begun and not released: when all slots are held, no new shard can come in
        oldest = 0.0
        while True:
            stuck = reading == 0 and (self.slots is None or held >= self.slots)
            if batch and (len(batch) >= self.batch_size or stuck):
                self._run_batch(batch)
                batch = []
                continue
            timeout = None if not batch else max(0.0, oldest + self.max_wait_s - time.monotonic())
            try:
                feed, item = self.queue.get(timeout=timeout)
            except queue.Empty:  # the shards still reading are slower than the device: do not wait longer
                self._run_batch(batch)
                batch = []
                continue
            if item is _STOP:
                if batch:
                    self._run_batch(batch)
                return
            assert feed is not None  # only _STOP comes without a feed
            if item is _BEGIN:
                reading += 1
                held += 1
            elif item is _END:
                reading -= 1
            elif item is _RELEASE:
                held -= 1
            elif feed.cancelled:
                feed._finish(1)
            elif isinstance(item, Decoded):
                if not batch:
                    oldest = time.monotonic()
                batch.append((feed, item))

    def _run_batch(self, batch: list[tuple[Feed, Decoded]]) -> None:
        live = [(f, i) for f, i in batch if not f.cancelled]
        for f, _ in batch:
            if f.cancelled:
                f._finish(1)
        if not live:
            return
        try:
            self._encode_and_route(live)
        except BaseException as e:  # noqa: BLE001 - not one sample's fault (device, bug): its shards fail
            reason = "worker_error"
            if isinstance(e, StorageError):  # a shard's writer could not write: the store, not a bug
                reason = STORAGE_ERROR
                logger.warning("a batch of %d items failed: %s", len(live), e)
            else:
                logger.exception("encoding a batch of %d items failed", len(live))
            for f in {f for f, _ in live}:  # each its own error: one exception raised in many threads is not
                error = ShardError(reason, f"{f.shard_id}: its batch failed: {type(e).__name__}: {e}")
                error.__cause__ = e
                f._fail(error)
        finally:
            for f, n in Counter(f for f, _ in live).items():
                f._finish(n)

    def _encode_and_route(self, live: list[tuple[Feed, Decoded]]) -> None:
        out = self.encode(live)
        if not out.kept or out.codes is None:
            return
        self.batch_sizes[len(out.kept)] += 1
        rows: dict[Feed, list[int]] = {}
        for row, (f, _) in enumerate(out.kept):
            rows.setdefault(f, []).append(row)
        for f, idx in rows.items():  # each shard is charged its share of the batch's device time
            for stage, s in out.seconds.items():
                f.timer(stage, s * len(idx) / len(out.kept))
            part = np.asarray(idx)
            var_input = None if out.var_input is None else out.var_input[part]
            f._route([out.kept[i][1] for i in idx], out.codes[part], var_input)
