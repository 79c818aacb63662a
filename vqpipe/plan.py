"""Which shards exist, which are done, and what to run.

A shard's identity is its id, a function of its input URL alone: `<stem>-<8 hex of sha1(url)>` (see
docs/reliability.md, "Shard identity"). It never depends on which other inputs a pattern matches or on a
worker index, so a rerun over a pattern that now matches more (or fewer) files, with any number of replicas,
resumes exactly where it left off. Outputs written before this rule (format 1.0 used the plain stem unless two
inputs shared it) are still recognised: a done marker `done/<stem>.json` that recorded the same input URL
counts as that input's commit, and the shard keeps that id.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

from . import storage
from .errors import ConfigError
from .index import Committed
from .ledger import Ledger
from .records import InputRef

logger = logging.getLogger(__name__)

TAR_SUFFIXES = storage.TAR_SUFFIXES


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


def shard_id(url: str) -> str:
    """The id of the shard read from `url` (as listed: an absolute local path or a full URL)."""
    return f"{legacy_stem(url)}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def legacy_stem(url: str) -> str:
    """The file name without its tar suffix: format 1.0's id for an input whose name no other input shared."""
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
    committed: Committed | None = None,
) -> Plan:
    """Split the listed inputs (URL, fingerprint) into shards to run and shards already committed.

    Reads no marker: what each committed input's marker recorded (to notice a changed input, or a legacy
    plain-stem id's input) comes from the ledger index (`committed`, else `ledger.committed()`, which costs a
    listing of done/ and a read of each marker the index lacks)."""
    shards = sorted((Shard(shard_id(u), u, fp) for u, fp in inputs), key=lambda s: s.shard_id)
    for a, b in zip(shards, shards[1:]):  # 8 hex digits under one stem: never seen, but never silently merged
        if a.shard_id == b.shard_id:
            raise ConfigError(
                f"inputs {storage.redact(a.url)} and {storage.redact(b.url)} get one id {a.shard_id}"
            )
    if limit is not None:
        shards = shards[:limit]
    index = committed if committed is not None else ledger.committed()
    done = {s.shard_id: s.shard_id for s in shards if s.shard_id in index}
    legacy = {
        s.shard_id: legacy_stem(s.url)
        for s in shards
        if s.shard_id not in index and legacy_stem(s.url) in index
    }
    taken = set(done.values())
    for shard in shards:  # a legacy marker counts for the one input it recorded, at most once
        stem = legacy.get(shard.shard_id)
        if stem and stem not in taken and _legacy_match(index.input(stem), shard):
            done[shard.shard_id] = stem
            taken.add(stem)
    plan = Plan(todo=[], done=[], changed=[])
    for shard in shards:
        if shard.shard_id not in done:
            plan.todo.append(shard)
            continue
        shard = Shard(done[shard.shard_id], shard.url, shard.fingerprint)
        if not index.same_input(shard.shard_id, shard.fingerprint) and _changed(
            index.input(shard.shard_id), shard
        ):
            plan.changed.append(shard)
            if reprocess_changed:
                plan.todo.append(shard)
                continue
        plan.done.append(shard)
    return plan


def _legacy_match(recorded: InputRef, shard: Shard) -> bool:
    """Whether a format-1.0 marker under the plain stem is this input's commit: it recorded this URL (as
    written, credentials masked). Where masking hid part of the URL (`.../key=2024/part-0.tar`), the
    recorded size and ETag/mtime must match too, so another input that masks alike is not taken for it."""
    public = storage.redact(shard.url)
    if recorded.url != public:
        return False
    if public == shard.url:
        return True
    before, now = recorded.fingerprint, shard.fingerprint
    keys = [k for k in ("size", "etag", "mtime") if k in before and k in now]
    return bool(keys) and all(before[k] == now[k] for k in keys)


def _changed(recorded: InputRef, shard: Shard) -> bool:
    """True when the input's size, ETag or mtime differ from what the done marker recorded."""
    before, now = recorded.fingerprint, shard.fingerprint
    return any(before.get(k) != now.get(k) for k in ("size", "etag", "mtime") if k in before and k in now)
