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
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from typing import Any, NamedTuple

from . import storage
from .errors import ConfigError
from .gcpause import without_cyclic_gc
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


class DoneShard(NamedTuple):
    """A planned input that is already committed: its id (its marker's) and URL. A tuple rather than a Shard:
    a nightly rerun plans 100k of them and needs nothing else of them."""

    shard_id: str
    url: str


class Refused(NamedTuple):
    """A listed input that is not run: it fails at once, alone, with this reason and detail."""

    shard_id: str
    url: str  # as shown and recorded: valid UTF-8 text
    reason: str
    detail: str


@dataclass
class Plan:
    todo: list[Shard]
    done: list[DoneShard]
    changed: list[Shard]  # done, but the input changed since (reported; redone only if asked)
    refused: list[Refused] = field(default_factory=list)  # not counted in len() or ids
    # failed before for what their unchanged input holds: planned, not run (dispatch_policy.keep_failed)
    kept_failed: list[Shard] = field(default_factory=list)

    def __len__(self) -> int:
        """Planned shards, each once (a changed shard to redo is in `todo` only)."""
        return len(self.todo) + len(self.done) + len(self.kept_failed)

    @property
    def all(self) -> list[Shard | DoneShard]:
        return sorted([*self.todo, *self.done, *self.kept_failed], key=attrgetter("shard_id"))

    @property
    def ids(self) -> set[str]:
        """The ids of every planned shard."""
        ids = {s.shard_id for s in self.todo}.union([s.shard_id for s in self.done])
        return ids.union(s.shard_id for s in self.kept_failed)


def shard_id(url: str) -> str:
    """The id of the shard read from `url` (as listed: an absolute local path or a full URL). A local name that
    is not UTF-8 is hashed as its bytes, and each of its bytes that is not UTF-8 shows as `_` in the stem."""
    stem = legacy_stem(url)
    try:
        raw = url.encode()
    except UnicodeEncodeError:
        raw = _raw(url)
        stem = _raw(stem).decode("utf-8", "replace").replace("\ufffd", "_")
    return f"{stem}-{hashlib.sha1(raw).hexdigest()[:8]}"


def is_text(name: str) -> bool:
    """Whether `name` is valid text: Python keeps the bytes of a local file name that are not UTF-8 as
    surrogate escapes, which no UTF-8 record (a marker, a Parquet file's metadata) can hold."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escape_name(name: str) -> str:
    """`name` as valid text to show and record: bytes that are not UTF-8 spelled `\\xNN` (as keys are)."""
    return _raw(name).decode("utf-8", "backslashreplace")


def _raw(name: str) -> bytes:
    try:
        return name.encode("utf-8", "surrogateescape")  # a file name's own bytes
    except UnicodeEncodeError:  # a surrogate no file name gives (a config file's string): its own spelling
        return name.encode("utf-8", "surrogatepass")


def _refused(sid: str, url: str) -> Refused:
    shown = storage.redact(escape_name(url))
    detail = (
        f"{shown}: the input's name is not UTF-8; OUT records every input's name as text (done markers, file "
        "metadata), so it is not tokenized under this name: rename it (e.g. with convmv) and rerun"
    )
    return Refused(sid, shown, "bad_input_name", detail)


def legacy_stem(url: str) -> str:
    """The file name without its tar suffix: format 1.0's id for an input whose name no other input shared."""
    name = url.rstrip("/").rpartition("/")[2]
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


_CHUNK = 8192  # committed inputs compared per batch (bounds the parsed fingerprints held at once)


@without_cyclic_gc
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
    listing of done/ and a read of each marker the index lacks). Per committed input this is an id, a lookup
    and a comparison of fingerprints; objects are made for the shards to run (and changed ones) only."""
    listed = sorted(((shard_id(u), u, fp) for u, fp in inputs), key=itemgetter(0))
    for a, b in zip(listed, listed[1:]):  # 8 hex digits under one stem: never seen, but never silently merged
        if a[0] == b[0]:
            raise ConfigError(f"inputs {storage.redact(a[1])} and {storage.redact(b[1])} get one id {a[0]}")
    if limit is not None:
        listed = listed[:limit]
    refused = [_refused(sid, u) for sid, u, _ in listed if not is_text(u)]
    if refused:  # each fails alone; the rest of the run goes on
        listed = [entry for entry in listed if is_text(entry[1])]
    index = committed if committed is not None else ledger.committed()
    position = index.position
    matched = [entry for entry in listed if entry[0] in position]
    new = [entry for entry in listed if entry[0] not in position]
    # A legacy (format-1.0) marker under the plain stem counts for the one input it recorded, at most once.
    # Asked of new inputs only: a rerun's committed inputs cost nothing here.
    legacy = [(sid, u, fp) for sid, u, fp in new if legacy_stem(u) in position]
    if legacy:
        taken = {entry[0] for entry in matched}
        adopted = set()
        for sid, u, fp in legacy:
            stem = legacy_stem(u)
            if stem not in taken and _legacy_match(index.input(stem), u, fp):
                matched.append((stem, u, fp))
                taken.add(stem)
                adopted.add(sid)
        new = [entry for entry in new if entry[0] not in adopted]
    plan = Plan(todo=[Shard(sid, u, fp) for sid, u, fp in new], done=[], changed=[], refused=refused)
    for start in range(0, len(matched), _CHUNK):
        chunk = matched[start : start + _CHUNK]
        recorded = index.input_fingerprints([sid for sid, _, _ in chunk])
        for (sid, u, fp), before in zip(chunk, recorded):
            if before != fp and _changed(before, fp):
                shard = Shard(sid, u, fp)
                plan.changed.append(shard)
                if reprocess_changed:
                    plan.todo.append(shard)
                    continue
            plan.done.append(DoneShard(sid, u))
    plan.todo.sort(key=attrgetter("shard_id"))
    plan.done.sort()
    return plan


def _legacy_match(recorded: InputRef, url: str, fingerprint: dict[str, Any]) -> bool:
    """Whether a format-1.0 marker under the plain stem is this input's commit: it recorded this URL (as
    written, credentials masked). Where masking hid part of the URL (`.../key=2024/part-0.tar`), the
    recorded size and ETag/mtime must match too, so another input that masks alike is not taken for it."""
    public = storage.redact(url)
    if recorded.url != public:
        return False
    if public == url:
        return True
    before, now = recorded.fingerprint, fingerprint
    keys = [k for k in ("size", "etag", "mtime") if k in before and k in now]
    return bool(keys) and all(before[k] == now[k] for k in keys)


def _changed(before: dict[str, Any], now: dict[str, Any]) -> bool:
    """True when the input's size, ETag or mtime differ from what the done marker recorded."""
    return any(before.get(k) != now.get(k) for k in ("size", "etag", "mtime") if k in before and k in now)
