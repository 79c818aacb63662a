"""The records vqpipe writes into OUT, as types: a shard's done marker, its failure record, and run.json.

Each has `to_json()` (the dict written, same keys as the README's "Output format" plus `record_version`) and
`from_json()`, which reads every version written so far: keys a marker lacks (an older vqpipe) take their
defaults, and keys this version does not know (a newer one) are kept in `extra` and written back unchanged.
Nothing here touches storage; `ledger.py` reads and writes these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# 1: the first versioned record (vqpipe 1.1). Markers without the key were written by earlier versions; they
# have the same keys minus `members`/`ignored_*` (format 1.0) and read as version 0.
RECORD_VERSION = 1


def _split(cls: type, d: Mapping[str, Any], nested: dict[str, Any] | None = None) -> dict[str, Any]:
    """Constructor arguments for `cls` from `d`; unknown keys go to `extra`."""
    if not isinstance(d, Mapping):
        raise ValueError(f"a {cls.__name__} is a JSON object, not {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
    kwargs = {k: v for k, v in d.items() if k in names}
    for key, convert in (nested or {}).items():
        if key in kwargs:
            kwargs[key] = convert(kwargs[key])
    kwargs["extra"] = {k: v for k, v in d.items() if k not in names}
    kwargs.setdefault("record_version", 0)
    return kwargs


_Check = Callable[[str, Any], None]  # (field name, value) -> None, or ValueError naming both


# What a record read back may hold, field by field: a hand-edited marker with `rows: -4` or `"rows": "5"` is
# refused here, naming the field and the value (the ledger adds the file), instead of skewing every count.
def _count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} is {value!r}, not a count (an integer >= 0)")


def _seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"{name} is {value!r}, not a number of seconds (finite, >= 0)")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} is {value!r}, not a string")


def _views(name: str, value: Any) -> None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} is {value!r}, not a list of view names")


def _object_of(check: _Check, what: str) -> _Check:
    """An object whose every value passes `check`."""

    def checked(name: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"{name} is {value!r}, not an object of {what}")
        for key, v in value.items():
            check(f"{name}[{key!r}]", v)

    return checked


def _or_null(check: _Check) -> _Check:
    """`check`, and null allowed too (a field markers from before it existed lack)."""

    def checked(name: str, value: Any) -> None:
        if value is not None:
            check(name, value)

    return checked


def _check(record: Any, checks: Mapping[str, _Check]) -> None:
    for name, check in checks.items():
        check(name, getattr(record, name))


def _as_json(record: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {**record.extra}
    for f in dataclasses.fields(record):
        if f.name == "extra" or f.name in skip:
            continue
        value = getattr(record, f.name)
        out[f.name] = value.to_json() if hasattr(value, "to_json") else value
    return out


@dataclass
class InputRef:
    """The input a shard was read from: URL (credentials masked) and the fingerprint of the version read."""

    url: str = ""
    fingerprint: dict[str, Any] = field(default_factory=dict)  # size, mtime or ETag (storage._fingerprint)

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "fingerprint": dict(self.fingerprint)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> InputRef:
        d = d or {}
        if not isinstance(d, Mapping) or not isinstance(d.get("fingerprint") or {}, Mapping):
            raise ValueError(f"input is {d!r}, not an object with a url and a fingerprint")
        _text("input.url", d.get("url", ""))
        return cls(url=d.get("url", ""), fingerprint=dict(d.get("fingerprint") or {}))


@dataclass
class DoneRecord:
    """`done/<shard_id>.json`: the commit of one shard, written after its data and error files."""

    shard_id: str = ""
    input: InputRef = field(default_factory=InputRef)
    samples: int = 0
    images: int | None = None  # encoded (+ errors = samples); None in markers from before views (= rows)
    rows: int = 0  # one per image and view
    views: list[str] = field(default_factory=lambda: ["center"])
    errors: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    members: int | None = None  # tar members read; None in format-1.0 markers
    ignored_members: int = 0
    ignored_by_reason: dict[str, int] = field(default_factory=dict)
    input_bytes: int = 0
    data_bytes: int = 0
    error_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, summed over threads
    precision: str | None = None
    decode: str | None = None
    agreement_with_exact: dict[str, Any] | None = None
    wall_seconds: float = 0.0
    started: float | None = None
    attempt: int = 1
    host: str | None = None
    peak_rss_bytes: int | None = None
    decode_threads: int | None = None
    allocator_env: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    vqpipe_version: str | None = None
    record_version: int = RECORD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer version, kept as read
    # Not part of the marker: set on the record a worker returns when another attempt had committed the
    # shard first (the record is that attempt's marker; this attempt wrote nothing).
    skipped: bool = field(default=False, compare=False)
    # Not part of the marker either: the JSON it was read from, for what hashes a marker as written (the
    # compaction manifest: a default filled in for a key an older marker lacks must not change its hash).
    as_written: Mapping[str, Any] | None = field(default=None, init=False, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return _as_json(self, skip=("skipped", "as_written"))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DoneRecord:
        kwargs = _split(cls, d, {"input": InputRef.from_json})
        kwargs.pop("skipped", None)
        record = cls(**kwargs)
        _check(record, _DONE_CHECKS)
        record.as_written = d
        return record

    def summary(self) -> dict[str, Any]:
        """The keys a status, a plan and a training reader need: what the ledger index keeps per shard."""
        return {k: v for k, v in self.to_json().items() if k in SUMMARY_KEYS}

    def commit_fingerprint(self) -> str:
        """A short hash of the fields that identify this commit of the shard, as written (a key an older marker
        lacks hashes as null, not as the default filled in): what a compaction manifest entry records, and the
        ledger index keeps, so that readers match the two without reading markers. A subset of the fields, so
        that fields a later vqpipe adds do not invalidate every compacted entry; a new commit of the shard
        always changes `started`."""
        marker = self.as_written if self.as_written is not None else self.to_json()
        identity = {k: marker.get(k) for k in _COMMIT_IDENTITY}
        text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:24]


# The marker fields that identify one commit of a shard (DoneRecord.commit_fingerprint).
_COMMIT_IDENTITY = ("shard_id", "rows", "samples", "started", "attempt", "input", "data_bytes")


# The fields counts, sums and readers rely on (timings and host facts are informational, but the report
# sums `seconds`).
_DONE_CHECKS: dict[str, _Check] = {
    "shard_id": _text,
    **dict.fromkeys(
        ("samples", "rows", "errors", "ignored_members", "input_bytes", "data_bytes", "error_bytes"), _count
    ),
    **dict.fromkeys(("images", "members"), _or_null(_count)),
    "views": _views,
    **dict.fromkeys(("errors_by_reason", "ignored_by_reason"), _object_of(_count, "counts by reason")),
    "seconds": _object_of(_seconds, "seconds by stage"),
    "wall_seconds": _seconds,
    "attempt": _count,
    "record_version": _count,
}


# What `DoneRecord.summary` keeps (and the index stores): identity, counts, sizes; not timings or host facts.
SUMMARY_KEYS = (
    "shard_id",
    "input",
    "samples",
    "rows",
    "images",
    "views",
    "errors",
    "errors_by_reason",
    "members",
    "ignored_members",
    "ignored_by_reason",
    "data_bytes",
    "error_bytes",
    "record_version",
)


# Why a shard failed, as the next run needs it: "input" when the input's bytes alone decide (the same bytes fail
# the same way: errors.INPUT_SHARD_REASONS), "transient" when a retry may succeed; None in older records.
FailureKind = Literal["input", "transient"]


@dataclass
class FailedRecord:
    """`failed/<shard_id>.json`: why a shard failed in the latest run that tried it, and the version of its input
    that failed (a rerun leaves an input failure of an unchanged input alone: dispatch_policy.keep_failed)."""

    shard_id: str = ""
    url: str = ""
    reason: str = "?"
    detail: str = ""
    attempts: int = 0
    kind: FailureKind | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)  # the input's size, mtime or ETag when planned
    record_version: int = RECORD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        # an older record read back is written as it was: without the keys it lacked
        return _as_json(self, skip=() if self.kind else ("kind", "fingerprint"))

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FailedRecord:
        record = cls(**_split(cls, d))
        _check(record, _FAILED_CHECKS)
        return record


_FAILED_CHECKS: dict[str, _Check] = {
    **dict.fromkeys(("shard_id", "url", "reason", "detail"), _text),
    **dict.fromkeys(("attempts", "record_version"), _count),
}


RunResult = Literal["complete", "within_allowance", "failed", "no_capacity", "interrupted", "error"]


@dataclass
class RunEnd:
    """How the run that wrote run.json ended (its `ended` key), for `vqpipe status`: the result, the exit code
    it gave, the failed shards and how many were allowed, and what ended it (no capacity, a storage error)."""

    result: RunResult = "complete"
    exit_code: int = 0
    failed_shards: int = 0
    allowed_failures: int = 0
    detail: str = ""
    at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunEnd:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RunRecord:
    """`run.json`: the resolved settings and fingerprint of the latest run into OUT."""

    fingerprint: str = ""
    output_settings: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    started: float | None = None
    run_id: str | None = None
    # True when the OUT was begun by a version that named shards by plain stem (sticky; see plan.py).
    legacy_stem_ids: bool = False
    previous_fingerprints: list[str] = field(default_factory=list)
    ended: RunEnd | None = None  # written when the run ends; None while it runs (or if it was killed)
    record_version: int = RECORD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = _as_json(self)
        if not self.previous_fingerprints:  # written only after a --allow-config-change, as before
            del out["previous_fingerprints"]
        if self.ended is None:
            del out["ended"]
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunRecord:
        kwargs = _split(cls, d, {"ended": lambda e: RunEnd.from_json(e) if e else None})
        # Before vqpipe 1.1 run.json had no such key, and every such OUT may hold plain-stem ids.
        kwargs.setdefault("legacy_stem_ids", True)
        return cls(**kwargs)
