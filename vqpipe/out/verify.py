"""`vqpipe status --verify` and `vqpipe tokenize --repair`: find the files committed rows need that are damaged —
missing, unreadable (truncated, a page whose CRC32 fails), or holding another number of rows than committed —
and forget the shards whose rows they hold, so that the next run tokenizes them again.

Files written before format 2 carry no page checksums: for those only what fails to decode is found.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..manifest import Manifest, write_manifest
from .incomplete import mark_incomplete
from .snapshot import Damage, Snapshot

logger = logging.getLogger(__name__)

_THREADS = 8  # files read at once (object stores: latency bound)


def verify(snapshot: Snapshot) -> list[Damage]:
    """Every file the committed rows need, read in full: data and compacted files (rows, page checksums), and
    the committed shards' error files. Slow on purpose: a full read of the OUT."""
    srcs = snapshot.sources_unchecked()
    jobs: list[tuple[str, int | None, tuple[str, ...], str]] = [
        (
            s.url,
            s.rows if s.file_rows is None else s.file_rows,
            s.shards,
            "compacted" if s.file_rows is not None else "data",
        )
        for s in srcs
    ]
    jobs += [(snapshot.ledger.errors_url(i), None, (i,), "errors") for i in snapshot.shard_ids]
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        found = [d for d in pool.map(lambda j: _check(snapshot, *j), jobs) if d is not None]
    for d in found:
        logger.error("damaged: %s", d.describe())
    return found


def _check(
    snapshot: Snapshot, url: str, rows: int | None, shards: tuple[str, ...], kind: str
) -> Damage | None:
    so = snapshot.ledger.storage_options
    try:
        with storage.open_input(url, so) as f:
            pf = pq.ParquetFile(f, page_checksum_verification=True)
            got = pf.metadata.num_rows
            for g in range(pf.metadata.num_row_groups):  # every page decoded, every checksum checked
                pf.read_row_group(g)
    except FileNotFoundError:
        return Damage(url, "missing", "no such file", shards, kind)
    except (pa.ArrowException, OSError) as e:
        return Damage(url, "unreadable", f"cannot be read ({type(e).__name__}: {_short(e)})", shards, kind)
    except storage.StorageError as e:
        if not storage.exists(url, so):
            return Damage(url, "missing", "no such file", shards, kind)
        return Damage(url, "unreadable", str(e), shards, kind)
    if rows is not None and got != rows:
        return Damage(url, "rows", f"{got} rows, committed {rows}", shards, kind)
    return None


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return text[:200]


def forget_damaged(snapshot: Snapshot, damaged: list[Damage]) -> list[str]:
    """Make the shards whose rows damaged files hold uncommitted again (only while holding OUT's lease), so that
    a run tokenizes them again where their inputs still exist. Returns their ids."""
    ledger, layout, so = snapshot.ledger, snapshot.layout, snapshot.ledger.storage_options
    parts = {d.url for d in damaged if d.kind == "compacted"}
    forgotten: list[str] = []
    in_parts = {i for d in damaged if d.kind == "compacted" for i in d.shards}
    elsewhere = {i for d in damaged if d.kind != "compacted" for i in d.shards}
    if elsewhere & set(snapshot.placement.compacted) - in_parts:
        # a compacted shard whose error file is damaged: its rows stay in a compacted file until it is rewritten
        mark_incomplete(layout, so, "shards to be tokenized again are also in compacted files")
    if parts:
        kept = tuple(p for p in snapshot.manifest.parts if layout.file_url(p.file) not in parts)
        write_manifest(layout, Manifest(kept), so)  # first: no reader is sent to those files any more
    for shard_id in sorted(in_parts | elsewhere):
        ledger.unmark_done(shard_id)
        forgotten.append(shard_id)
    for url in sorted(parts):
        storage.remove(url, so)
    if forgotten:
        logger.warning(
            "forgot %d shard(s) whose files are damaged; they are tokenized again where their inputs exist: %s",
            len(forgotten),
            ", ".join(forgotten[:10]),
        )
    return forgotten
