"""Which rows of an OUT each (rank, DataLoader worker) reads in an epoch, and in what order. Pure functions.

An epoch is one sequence of "positions" (rows; images when one view per image is read) over the committed
shards, in shard-id order or (shuffle) a seeded permutation of the shards. As with `DistributedSampler`, the
sequence is padded by wrapping around to the start (drop_last=False) or cut (drop_last=True) to a multiple of the
world size; rank r then takes the r-th contiguous block, so every rank yields the same count and reads only the
shards its block covers (no rank reads every file). A rank's block is split further into contiguous runs, one per
DataLoader worker. Only numpy's platform-independent generators are used: the same (seed, epoch, world size,
workers) gives the same rows on any machine.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Separate generator streams for the four seeded choices, so that none repeats another's draws.
_SHARDS, _ROW_GROUPS, _WINDOW, _VIEWS = 0, 1, 2, 3


@dataclass(frozen=True)
class Span:
    """Rows [start, stop) of shard number `shard`, counted in that shard's epoch row order."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class EpochPlan:
    rows: tuple[int, ...]  # rows per shard, in shard-id order
    order: tuple[int, ...]  # shard numbers in epoch order
    world_size: int
    drop_last: bool

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @property
    def per_rank(self) -> int:
        """Rows every rank yields in the epoch (DistributedSampler's num_samples)."""
        n, w = self.total_rows, self.world_size
        return n // w if self.drop_last else -(-n // w)

    def worker_range(self, rank: int, worker: int, num_workers: int) -> tuple[int, int]:
        """Positions [begin, end) of one DataLoader worker of one rank; worker counts differ by at most 1."""
        base, extra = divmod(self.per_rank, num_workers)
        begin = rank * self.per_rank + worker * base + min(worker, extra)
        return begin, begin + base + (worker < extra)

    def spans(self, begin: int, end: int) -> list[Span]:
        """The shard rows behind positions [begin, end); positions past the last row wrap to the first."""
        n = self.total_rows
        if end <= begin:
            return []
        if n == 0:
            raise ValueError("the dataset has no rows")
        starts = [0]
        for k in self.order:
            starts.append(starts[-1] + self.rows[k])
        out, p = [], begin
        while p < end:
            q = p % n
            i = bisect.bisect_right(starts, q) - 1  # skips empty shards: their start equals the next one's
            take = min(end - p, starts[i + 1] - q)
            out.append(Span(self.order[i], q - starts[i], q - starts[i] + take))
            p += take
        return out


def make_plan(
    rows: Sequence[int], *, world_size: int, drop_last: bool, shuffle: bool, seed: int, epoch: int
) -> EpochPlan:
    order = _rng(seed, epoch, _SHARDS).permutation(len(rows)) if shuffle else np.arange(len(rows))
    return EpochPlan(tuple(int(r) for r in rows), tuple(int(k) for k in order), world_size, drop_last)


def row_group_order(
    shard_id: str, num_row_groups: int, *, shuffle: bool, seed: int, epoch: int
) -> np.ndarray:
    """The order in which a shard's row groups make up its epoch row order (seeded by the shard's id)."""
    if not shuffle:
        return np.arange(num_row_groups)
    return _rng(seed, epoch, _ROW_GROUPS, zlib.crc32(shard_id.encode())).permutation(num_row_groups)


def window_order(size: int, *, shuffle: bool, seed: int, epoch: int, window_start: int) -> np.ndarray:
    """The shuffle buffer: the rows of positions [window_start, window_start + size) in a seeded order that
    depends on where the window starts, so a resumed worker rebuilds the same order from the same rows."""
    if not shuffle:
        return np.arange(size)
    return _rng(seed, epoch, _WINDOW, window_start).permutation(size)


def view_picks(shard_id: str, images: int, views: int, *, seed: int, epoch: int) -> np.ndarray:
    """The view (index) of each of a shard's images that the epoch yields with view="random", seeded by the shard's
    id: the same wherever the shard's rows are read from and whoever reads them."""
    return _rng(seed, epoch, _VIEWS, zlib.crc32(shard_id.encode())).integers(views, size=images)


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([int(e) for e in entropy])
