"""A shard's writer thread: its rows from the encoder loop become Parquet row groups off the device's path."""

from __future__ import annotations

import queue
import threading
from types import TracebackType
from typing import Any

import numpy as np

from .batcher import Decoded
from .stage_clock import StageClock
from .writer import ShardWriter

_DONE = object()


class AsyncWriter:
    """Writes a shard's rows on a background thread so Parquet encoding overlaps the next batch's encode."""

    def __init__(self, writer: ShardWriter, clock: StageClock, first_view: str, depth: int = 2) -> None:
        self.writer, self.clock, self.first_view = writer, clock, first_view
        self.images = 0  # rows of the first view: one per image encoded
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def __enter__(self) -> AsyncWriter:
        self.thread.start()
        return self

    def put_rows(self, items: list[Decoded], codes: np.ndarray, var_input: np.ndarray | None) -> None:
        """Called by the encoder loop with this shard's rows of a batch (a `batcher.Sink`)."""
        if self.error is not None:
            raise self.error
        keys = [i.key for i in items]
        labels = [i.label for i in items]
        metas = [i.meta for i in items]
        views = [i.view for i in items]
        self.images += views.count(self.first_view)
        self.queue.put((keys, labels, metas, codes, var_input, views))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
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
