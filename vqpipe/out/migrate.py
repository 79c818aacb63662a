"""`vqpipe migrate OUT`: move a format-1.x OUT (bookkeeping beside `data/`) to format 2 (under `_vqpipe/`), so that
any reader pointed at OUT reads each committed row once (docs/format.md, "Moving a format-1.x OUT").

vqpipe reads format-1.x OUTs as they are; it writes only format 2, so `tokenize` and `compact` ask for this
first. Holds the lease of both layouts throughout. Crash-safe and idempotent: until `_vqpipe/run.json` is
written (the switch), the 1.x files are untouched apart from leftovers nobody reads, and a rerun starts over;
after it, a rerun finishes the cleanup. `data/INCOMPLETE-…` makes readers of data/ fail meanwhile.

What moves: run.json, plan.json, the committed shards' done markers and error files (`.parquet` -> `.pq`), failure
records, and the compacted files (`compacted/part-<n>.parquet` -> `data/compacted-<n>.parquet`, with the manifest).
What goes: data files of shards whose rows a compacted file holds (1.x kept both), data files no marker commits
(a killed run's leftovers, never committed in 1.x), the index (rebuilt from the markers on first use).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, replace
from typing import Any

from .. import storage
from ..errors import ConfigError
from ..lease import Lease
from ..ledger import Ledger
from ..manifest import Manifest, read_manifest, write_manifest
from . import card
from .incomplete import clear_incomplete, mark_incomplete
from .layout import COMPACTED_PREFIX, DATA_DIR, INCOMPLETE_NAME, Layout
from .snapshot import Snapshot

logger = logging.getLogger(__name__)

_COPY_BLOCK = 8 * 2**20


@dataclass
class MigrateReport:
    shards: int = 0
    compacted_files: int = 0
    removed_data_files: int = 0
    stale_rows_left: bool = False

    def __str__(self) -> str:
        text = (
            f"migrated to format 2: {self.shards} committed shard(s), {self.compacted_files} compacted file(s) "
            f"moved into data/, {self.removed_data_files} data file(s) removed (their rows were also in compacted "
            "files, or never committed)"
        )
        if self.stale_rows_left:
            text += "; some compacted files hold rows of shards tokenized again since: run `vqpipe compact`"
        return text


def migrate(
    output: str, storage_options: dict[str, Any] | None = None, wait_for_lease_s: float = 0.0
) -> MigrateReport:
    output = output.rstrip("/")
    old, new = Layout(output, 1), Layout(output, 2)
    switched = storage.exists(new.run_url, storage_options)
    if not storage.exists(old.run_url, storage_options):
        if switched:
            raise ConfigError(f"{storage.redact(output)} is in format 2 already")
        raise ConfigError(f"{storage.redact(output)}: not a vqpipe output (no run.json)")
    leases = [Lease(output, storage_options, layout=old), Lease(output, storage_options, layout=new)]
    with contextlib.ExitStack() as stack:
        for lease in leases:
            lease.acquire(wait_s=wait_for_lease_s)
            stack.enter_context(lease)
        mark_incomplete(new, storage_options, "vqpipe migrate is moving files")
        storage.cleanup_temporaries(new.data_dir, storage_options)  # a killed 1.x run's half-written files
        report = MigrateReport() if switched else _copy_over(output, old, new, storage_options)
        _remove_old(output, old, storage_options)
        snap = Snapshot.open(ledger=Ledger(output, storage_options, layout=new), maintain=True)
        report.shards = len(snap.shard_ids)
        report.stale_rows_left = bool(snap.placement.stale) or bool(snap.unexpected())
        if not report.stale_rows_left:
            clear_incomplete(new, storage_options)
        card.write_quietly(snap, len(snap.ledger.failed_ids() - snap.committed.ids))
    return report


def _copy_over(output: str, old: Layout, new: Layout, so: dict[str, Any] | None) -> MigrateReport:
    """Everything format 2 needs, written beside the 1.x files; `_vqpipe/run.json` last (the switch)."""
    report = MigrateReport()
    snap = Snapshot.open(ledger=Ledger(output, so, layout=old))
    for shard_id in snap.shard_ids:
        _copy(old.done_url(shard_id), new.done_url(shard_id), so)
        with contextlib.suppress(FileNotFoundError):
            _copy(old.errors_url(shard_id), new.errors_url(shard_id), so)
    for name in storage.list_files(old.meta("failed"), ".json", so):
        _copy(storage.join(old.meta("failed"), name), storage.join(new.meta("failed"), name), so)
    if storage.exists(old.plan_url, so):
        _copy(old.plan_url, new.plan_url, so)
    manifest = read_manifest(old, so)
    parts = []
    for part in manifest.parts:  # compacted/part-<n>.parquet -> data/compacted-<n>.parquet
        name = f"{COMPACTED_PREFIX}{part.file.rsplit('-', 1)[-1]}"
        with contextlib.suppress(FileNotFoundError):
            _copy(old.file_url(part.file), storage.join(new.data_dir, name), so)
            report.compacted_files += 1
        parts.append(replace(part, file=f"{DATA_DIR}/{name}"))
    if parts:
        write_manifest(new, Manifest(tuple(parts)), so)
    # Data files a 1.x reader skipped: rows also in a compacted file, or never committed.
    keep = {f"{i}.parquet" for i in snap.placement.in_data}
    for name in snap.data_files:
        if (
            "/" not in name
            and name not in keep
            and not name.startswith(COMPACTED_PREFIX)
            and name != INCOMPLETE_NAME
        ):
            storage.remove(storage.join(new.data_dir, name), so)
            report.removed_data_files += 1
    _copy(old.run_url, new.run_url, so)  # the switch: from here on OUT is format 2
    logger.info("%s: format 2 now; removing the format-1.x files", storage.redact(output))
    return report


def _remove_old(output: str, old: Layout, so: dict[str, Any] | None) -> None:
    """The 1.x bookkeeping, after the switch (the lease file goes when its lease is released)."""
    for sub in ("done", "failed", "errors", "index", "compacted"):
        d = storage.join(output, sub)
        for name in storage.list_files(d, "", so):
            storage.remove(storage.join(d, name), so)
        storage.cleanup_temporaries(d, so)
        if storage.is_local(d):  # object stores have no directories to leave behind
            with contextlib.suppress(OSError):
                os.rmdir(d)
    for name in ("run.json", "plan.json"):
        storage.remove(storage.join(output, name), so)


def _copy(src: str, dst: str, so: dict[str, Any] | None) -> None:
    """Stream `src` into `dst` (atomically); FileNotFoundError when `src` is absent."""
    with storage.open_input(src, so) as f, storage.atomic_write(dst, so) as out:
        while chunk := f.read(_COPY_BLOCK):
            out.write(chunk)
