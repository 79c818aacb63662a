"""Which shards exist, which are done, and what to run.

A shard's identity is its id, derived from its input URL alone (never from a worker index), so a rerun with
more or fewer replicas, or over a pattern that now matches more shards, resumes exactly where it left off.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .ledger import Ledger

logger = logging.getLogger(__name__)

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class Shard:
    shard_id: str
    url: str
    fingerprint: dict[str, Any] = field(default_factory=dict, compare=False)  # size, mtime/ETag at planning


@dataclass
class Plan:
    todo: list[Shard]
    done: list[Shard]
    changed: list[Shard]  # done, but the input changed since (reported; redone only if asked)

    @property
    def all(self) -> list[Shard]:
        return sorted(self.todo + self.done, key=lambda s: s.shard_id)


def shard_ids(urls: list[str]) -> dict[str, str]:
    """URL -> id: the file name without its tar suffix; names that collide get a short hash of the full URL."""
    base = {u: _stem(u) for u in urls}
    counts = Counter(base.values())
    return {
        u: b if counts[b] == 1 else f"{b}-{hashlib.sha1(u.encode()).hexdigest()[:8]}" for u, b in base.items()
    }


def _stem(url: str) -> str:
    name = posixpath.basename(url.rstrip("/"))
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def make_plan(
    inputs: list[tuple[str, dict[str, Any]]],
    ledger: Ledger,
    limit: int | None = None,
    reprocess_changed: bool = False,
) -> Plan:
    """Split the listed inputs (URL, fingerprint) into shards to run and shards already committed."""
    ids = shard_ids([u for u, _ in inputs])
    shards = sorted((Shard(ids[u], u, fp) for u, fp in inputs), key=lambda s: s.shard_id)
    if limit is not None:
        shards = shards[:limit]
    done_ids = ledger.done_ids()
    markers = ledger.read_done_many([s.shard_id for s in shards if s.shard_id in done_ids])
    plan = Plan(todo=[], done=[], changed=[])
    for shard in shards:
        if shard.shard_id not in done_ids:
            plan.todo.append(shard)
            continue
        if _changed(markers[shard.shard_id].get("input", {}), shard):
            plan.changed.append(shard)
            if reprocess_changed:
                plan.todo.append(shard)
                continue
        plan.done.append(shard)
    return plan


def _changed(recorded: dict[str, Any], shard: Shard) -> bool:
    """True when the input's URL, size, ETag or mtime differ from what the done marker recorded."""
    if recorded.get("url") not in (None, shard.url):
        return True
    before, now = recorded.get("fingerprint", {}), shard.fingerprint
    return any(before.get(k) != now.get(k) for k in ("size", "etag", "mtime") if k in before and k in now)
