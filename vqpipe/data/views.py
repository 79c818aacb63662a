"""Which view of each image an epoch yields (`TokenDataset(view=...)`): the OUT's view list, and the pick.

A `--views` run writes one row per (image, view), an image's rows consecutive in the order of the `views` its done
marker and file metadata record (docs/views.md). So a source of R rows holds R / V images, image i being rows
[i·V, (i+1)·V), and picking view v of image i is reading row i·V + v: the epoch is planned over images without
reading any row. The random pick is keyed on (seed, epoch, shard id, image index in that shard): the same for
any world size, worker count, resume point, shard selection or compaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import StorageError
from ..schema import METADATA_KEY
from ..views import DEFAULT_VIEWS
from .epoch import view_picks
from .rows import RowBlock

ALL, RANDOM = "all", "random"


@dataclass(frozen=True)
class ViewChoice:
    """The `view=` asked for, and the views of the OUT it applies to."""

    views: tuple[str, ...]  # the OUT's views, in the order of an image's rows
    view: str  # "all" (every row), "random" (one seeded view per image) or the name of one view

    @property
    def per_image(self) -> bool:
        """The epoch counts images, one row each; with one view per image that is every row (the plain read)."""
        return self.view != ALL and len(self.views) > 1

    @property
    def sampling(self) -> str:
        """What the epoch's positions mean, as a saved state records it: "all" (rows) or the per-image pick."""
        return self.view if self.per_image else ALL

    def picks(self, shard_ids: Sequence[str], images: Sequence[int], seed: int, epoch: int) -> np.ndarray:
        """The view index picked for each image of these shards (in this order), as one array."""
        if self.view != RANDOM:
            return np.full(sum(images), self.views.index(self.view), dtype=np.int64)
        parts = [view_picks(s, n, len(self.views), seed=seed, epoch=epoch) for s, n in zip(shard_ids, images)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class ShardViews:
    """What the view pick needs of one committed shard (from the ledger index, not its marker)."""

    shard_id: str
    views: tuple[str, ...]
    rows: int
    images: int | None  # None for markers from before views (then rows = images)


def view_choice(view: str, shards: Sequence[ShardViews], marker_url: Any) -> ViewChoice:
    """Validate `view=` against the committed shards (`marker_url(shard_id)` names one's marker in errors): to
    pick views they must list the same views and hold whole images; view="all" reads rows as they are."""
    views: tuple[str, ...] | None = None
    first = ""
    for shard in shards if view != ALL else shards[:1]:  # the first names the views of "all"
        got = tuple(shard.views or DEFAULT_VIEWS)
        if views is None:
            views, first = got, shard.shard_id
        elif got != views:
            raise StorageError(
                f"{marker_url(shard.shard_id)}: views {','.join(got)}, but {marker_url(first)} has "
                f"{','.join(views)}; one OUT holds one view list (read them as two datasets, shards=...)"
            )
    choice = ViewChoice(views or DEFAULT_VIEWS, view)
    if view not in (ALL, RANDOM, *choice.views):
        raise ValueError(
            f"view={view!r}: use 'all', 'random' or one of this OUT's views ({', '.join(choice.views)})"
        )
    if choice.per_image:
        n = len(choice.views)
        for shard in shards:
            rows, images = shard.rows, shard.images
            if rows % n or (images is not None and int(images) * n != rows):
                raise StorageError(
                    f"{marker_url(shard.shard_id)}: {rows} rows{'' if images is None else f' for {images} images'} "
                    f"is not {n} views per image; view={view!r} needs whole images (view='all' reads every row)"
                )
    return choice


def columns_to_read(
    columns: tuple[str, ...], choice: ViewChoice, names: Sequence[str]
) -> tuple[tuple[str, ...], str | None]:
    """The columns to read from files that have columns `names`, and the view to fill in for an asked `view` that a
    default run's files do not store (their one view, center). Picking views reads `view` to check each pick."""
    fill = choice.views[0] if "view" in columns and "view" not in names and len(choice.views) == 1 else None
    read = tuple(c for c in columns if c != "view" or fill is None)
    return (*read, "view") if choice.per_image and "view" not in read else read, fill


def check_file_views(schema: pa.Schema, choice: ViewChoice, url: str) -> None:
    """A data (or compacted) file must hold the views its markers list: the pick is row arithmetic on that list."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    got = tuple(json.loads(raw).get("views") or DEFAULT_VIEWS) if raw else choice.views
    if got != choice.views and choice.view != ALL:
        raise StorageError(
            f"{url}: its metadata lists views {','.join(got)}, its done marker(s) {','.join(choice.views)}"
        )


def check_picked(block: RowBlock, picks: np.ndarray, choice: ViewChoice, url: str) -> None:
    """The rows read are the views picked: a file whose rows are not grouped by image is refused, not misread."""
    got = block.extra.get("view")
    if got is None or not len(picks):
        return
    want = np.asarray(choice.views, dtype=object)[picks]
    bad = np.flatnonzero(got != want)
    if len(bad):
        i = int(bad[0])
        key = None if block.keys is None else block.keys[i]
        raise StorageError(
            f"{url}: key {key!r}: the row read as its view {want[i]!r} is view {got[i]!r}; rows must be one per "
            f"view, in the order {','.join(choice.views)}, image after image"
        )
