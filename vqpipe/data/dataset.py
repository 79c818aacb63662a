"""`TokenDataset`: a torch IterableDataset over the committed shards of a vqpipe OUT (local path or fsspec URL).

Streaming: the row groups behind one shuffle window of `shuffle_buffer` rows are decoded at a time, so memory is
about (2 x shuffle_buffer + 2 row groups) x bytes per row, whatever the dataset's size. Ranks, workers and epoch order come
from `epoch.py`; resume is exact because a window's order is a function of its position alone (see state_dict).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..manifest import Source
from ..out.snapshot import Snapshot
from ..schema import read_metadata
from .batch import TokenBatch, block_columns
from .epoch import EpochPlan, make_plan, window_order
from .rows import RowBlock
from .shards import ShardReader, check_file, open_parquet
from .state import check_position, check_state
from .views import RANDOM, ShardViews, check_file_views, columns_to_read, view_choice

logger = logging.getLogger(__name__)

_STATE_VERSION = 1
# What a saved state must have been saved with to apply here.
_STATE_SETTINGS = ("version", "seed", "shuffle", "drop_last", "shuffle_buffer", "view", "world_size", "rank")


class TokenDataset(IterableDataset):
    """Rows of an OUT as `{"key", "label", "codes", "var_input"?, "meta"?, "view"?}`, sharded like DistributedSampler.

    - Only shards with a done marker at construction are read; rows per shard come from the markers. Shards
      that `vqpipe compact` copied are read from their compacted file, the others from data/ (manifest.py).
    - `rank`/`world_size` default to torch.distributed's when it is initialised, else 0/1; DataLoader workers
      split a rank's rows further. Every rank yields `len(self)` rows; `drop_last=False` fills the last round by
      repeating rows from the epoch's start, `drop_last=True` drops the tail.
    - `shuffle=True`: seeded permutation of shards, of each shard's row groups, and of every window of
      `shuffle_buffer` consecutive rows. Call `set_epoch(e)` before each epoch.
    - `columns`: any of label, codes, var_input, meta, and any other column the files have (fixed-size
      lists as tensors, other types as Python values; nulls in those stay None).
    - A null label becomes `label_fill` (VAR's trainer takes `num_classes` as its "no class" index).
    - `compacted=False`: ignore `vqpipe compact`'s files and read data/ (to resume an epoch begun before it).
    - `view`: of an OUT written with `--views`, "random" (one seeded view per image per epoch: the epoch, len()
      and the state count images), a view's name (that view only), or "all" (every row). One view: every row.
    - `batch_size`: yield ready batches (use `DataLoader(ds, batch_size=None)`), much cheaper per row than
      collating single items; the same rows in the same order either way.
    """

    def __init__(
        self,
        out: str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        columns: Sequence[str] = ("codes", "label"),
        label_fill: int = -1,
        shuffle_buffer: int = 4096,
        batch_size: int | None = None,
        view: str = RANDOM,
        shards: Sequence[str] | None = None,
        compacted: bool = True,
        storage_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        if "key" in columns:
            raise ValueError("'key' is always read; columns= names the others")
        if seed < 0 or shuffle_buffer < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError("seed must be >= 0, shuffle_buffer and batch_size >= 1")
        self.out, self.storage_options = out, storage_options
        self.columns = ("key", *dict.fromkeys(columns))
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.label_fill, self.shuffle_buffer, self.batch_size = label_fill, shuffle_buffer, batch_size
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.epoch = 0
        self._resume: dict[str, Any] | None = None
        self._yielded = 0
        snapshot = Snapshot.open(out, storage_options)  # the committed shards and where their rows are
        committed = snapshot.shard_ids
        if shards is not None:
            missing = sorted(set(shards) - set(committed))
            if missing:
                raise ValueError(f"{out}: shard(s) not committed: {', '.join(missing[:5])}")
            committed = sorted(set(shards))
        self.shard_ids = tuple(committed)
        self.shard_rows = tuple(snapshot.rows(committed))
        self.shard_rows_by_id = dict(zip(self.shard_ids, self.shard_rows))
        index = snapshot.committed
        self.choice = view_choice(  # which rows of each image an epoch yields
            view,
            [
                ShardViews(*v)
                for v in zip(
                    committed, index.views(committed), self.shard_rows, index.column("images", committed)
                )
            ],
            snapshot.ledger.done_url,
        )
        self.views = self.choice.views  # the OUT's, in the order of an image's rows
        # What the files are read for, and the view of files without a `view` column: from the first file's schema.
        self.read_columns: tuple[str, ...] = self.columns
        self._view_fill: str | None = None
        # The files to read: the epoch is planned over these (a data file, or a compacted file's counted rows).
        # compacted=False reads data/ only (it must still hold every file): to finish an epoch begun before a
        # compaction of a format-1.x OUT, which kept the data files.
        self.sources: tuple[Source, ...] = tuple(snapshot.sources(committed, compacted=compacted))
        self.metadata = self._check_columns()
        self._digest = _digest(self.shard_ids, self.shard_rows, self.sources)

    # -- public API ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Rows this rank yields per epoch (all its DataLoader workers together); images with a view per image."""
        return self._plan().per_rank

    @property
    def total_rows(self) -> int:
        return sum(self.shard_rows)

    @property
    def total_images(self) -> int:
        return self.total_rows // len(self.views) if self.choice.per_image else self.total_rows

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None  # a state loaded for another epoch does not apply to this one
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """Where this (rank, worker) stands: call it in the training loop (num_workers=0), or let torchdata's
        StatefulDataLoader call it inside each worker (num_workers > 0)."""
        num_workers, worker = _worker()
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "yielded": self._yielded,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "shuffle_buffer": self.shuffle_buffer,
            "view": self.choice.sampling,
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": num_workers,
            "worker": worker,
            "shards_digest": self._digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration continues right after the last row the saved iteration yielded."""
        check_state(state)
        mine = self.state_dict()
        state = {"view": "all", **state}  # states saved before view= existed read every row
        for key in _STATE_SETTINGS:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"state was saved with {key}={state.get(key)!r}, this dataset has {mine[key]!r}"
                )
        if state["shards_digest"] != self._digest:
            raise ValueError(
                f"{self.out}: the committed shards changed since the state was saved (now {len(self.shard_ids)}), "
                "or where their rows are stored (vqpipe compact); to finish that epoch, build the dataset with "
                "shards= the saved run's shard_ids, and compacted=False if OUT was compacted since"
            )
        begin, end = self._plan().worker_range(self.rank, state["worker"], state["num_workers"])
        check_position(state, end - begin)  # a worker's rows per epoch are the same in every epoch
        self.epoch = state["epoch"]
        self._resume = dict(state)

    def __iter__(self) -> Iterator[dict[str, Any] | TokenBatch]:
        plan = self._plan()
        num_workers, worker = _worker()
        begin, end = plan.worker_range(self.rank, worker, num_workers)
        start = self._take_resume(num_workers, worker)
        self._yielded = start
        reader = ShardReader(self)
        try:
            window = self.shuffle_buffer
            first = begin + (start // window) * window
            skip = start % window
            pending: list[RowBlock] = []
            have = 0
            for wstart in range(first, end, window):
                wend = min(end, wstart + window)
                block = reader.read(plan, wstart, wend)
                order = window_order(
                    wend - wstart, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch, window_start=wstart
                )
                order = order[skip:]
                skip = 0
                if self.batch_size is None:
                    yield from self._items(block.take(order))
                    continue
                pos = 0
                while pos < len(order):  # gather each batch straight from the window: one copy per row
                    piece = block.take(order[pos : pos + self.batch_size - have])
                    pos += len(piece)
                    pending.append(piece)
                    have += len(piece)
                    if have == self.batch_size:
                        yield self._batch(RowBlock.concat(pending))
                        pending, have = [], 0
            if pending:
                yield self._batch(RowBlock.concat(pending))
        finally:  # also when the loop stops early: the open data file is closed
            reader.close()

    # -- internals ----------------------------------------------------------------------------------------------

    def _plan(self) -> EpochPlan:
        per = len(self.views) if self.choice.per_image else 1  # positions are images: one row each
        return make_plan(
            [s.rows // per for s in self.sources],
            world_size=self.world_size,
            drop_last=self.drop_last,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
        )

    def _take_resume(self, num_workers: int, worker: int) -> int:
        state, self._resume = self._resume, None
        if state is None or state["epoch"] != self.epoch:
            return 0
        if (state["num_workers"], state["worker"]) != (num_workers, worker):
            raise ValueError(
                f"state was saved by worker {state['worker']} of {state['num_workers']}, loaded into worker "
                f"{worker} of {num_workers}: resume with the same num_workers (StatefulDataLoader does this)"
            )
        return int(state["yielded"])

    def _items(self, block: RowBlock) -> Iterator[dict[str, Any]]:
        cols = block_columns(block, self.columns, self._view_fill)
        if "label" in cols:
            cols["label"] = cols["label"].tolist()  # Python ints
        names = list(cols)
        for values in zip(*cols.values()):
            self._yielded += 1  # counted before the yield: state_dict() taken after a fetch includes this row
            yield dict(zip(names, values))

    def _batch(self, block: RowBlock) -> TokenBatch:
        self._yielded += len(block)
        return TokenBatch.of(block_columns(block, self.columns, self._view_fill))

    def _check_columns(self) -> dict[str, Any]:
        """The first non-empty data file's vqpipe metadata; every asked column must be in it. A default run's files
        have no `view` column: asked for, it is their one view (center)."""
        for src in self.sources:
            if src.rows:
                f, source = open_parquet(src.url, self.storage_options)
                try:
                    self.read_columns, self._view_fill = columns_to_read(
                        self.columns, self.choice, f.schema_arrow.names
                    )
                    check_file(f.schema_arrow, src.url, self.read_columns)
                    check_file_views(f.schema_arrow, self.choice, src.url)
                    return read_metadata(f.schema_arrow)
                finally:
                    f.close()
                    if source is not None:
                        source.close()
        return {}


def _digest(shard_ids: tuple[str, ...], shard_rows: tuple[int, ...], srcs: tuple[Source, ...]) -> str:
    """What a saved state must match: the committed shards and, once some are compacted, where their rows are."""
    if all(
        s.file_rows is None for s in srcs
    ):  # data files only: the digest states saved before compaction have
        return hashlib.sha256(repr(list(zip(shard_ids, shard_rows))).encode()).hexdigest()
    layout = [(s.id, s.rows, s.ranges, s.shards) for s in srcs]
    return hashlib.sha256(repr(layout).encode()).hexdigest()


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.num_workers, info.id) if info is not None else (1, 0)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size
