"""The run directory: run.json, plan.json, done markers (commit records), failure records, and the status summary.

Layout under OUT (see docs/format.md):
    run.json                 resolved config, output fingerprint, versions (written at the start)
    plan.json                the shards the latest run was asked to process (id -> input URL)
    lease.json               the run writing here now, if any (vqpipe/lease.py)
    data/<shard_id>.parquet  rows
    errors/<shard_id>.parquet one row per sample that is not in data/
    done/<shard_id>.json     the commit marker, written last
    failed/<shard_id>.json   why a shard failed in the latest run that tried it (removed once it is done)
Everything here reads OUT alone: no Ray, no access to the inputs.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from . import storage
from .errors import ConfigError
from .lease import read_lease

logger = logging.getLogger(__name__)

_SUBDIRS = ("data", "errors", "done", "failed")
_READ_THREADS = 32  # concurrent small reads; object-store latency, not bandwidth, bounds a status or plan


class Ledger:
    def __init__(self, output: str, storage_options: dict[str, Any] | None = None):
        self.output = output
        self.storage_options = storage_options

    def path(self, *parts: str) -> str:
        return storage.join(self.output, *parts)

    def data_url(self, shard_id: str) -> str:
        return self.path("data", f"{shard_id}.parquet")

    def errors_url(self, shard_id: str) -> str:
        return self.path("errors", f"{shard_id}.parquet")

    def done_url(self, shard_id: str) -> str:
        return self.path("done", f"{shard_id}.json")

    def failed_url(self, shard_id: str) -> str:
        return self.path("failed", f"{shard_id}.json")

    # -- run.json -------------------------------------------------------------------------------------------------

    def read_run(self) -> dict[str, Any] | None:
        url = self.path("run.json")
        return (
            storage.read_json(url, self.storage_options)
            if storage.exists(url, self.storage_options)
            else None
        )

    def start_run(self, run_record: dict[str, Any], allow_change: bool) -> None:
        """Write run.json, refusing to mix outputs of different settings in one OUT unless allowed."""
        previous = self.read_run()
        if previous and previous.get("fingerprint") != run_record["fingerprint"]:
            changed = sorted(
                k
                for k in set(previous.get("output_settings", {})) | set(run_record["output_settings"])
                if previous.get("output_settings", {}).get(k) != run_record["output_settings"].get(k)
            )
            if not allow_change:
                raise ConfigError(
                    f"{self.output} holds output of different settings (fingerprint {previous.get('fingerprint')} "
                    f"vs {run_record['fingerprint']}; changed: {', '.join(changed)}). Use a new --output, or "
                    "--allow-config-change to add shards made with the new settings"
                )
            logger.warning("output settings changed (%s); continuing as asked", ", ".join(changed))
            run_record = {**run_record, "previous_fingerprints": [previous["fingerprint"]]}
        self.remove_temporaries()
        storage.write_json_atomic(self.path("run.json"), run_record, self.storage_options)

    def remove_temporaries(self) -> None:
        """Remove what attempts killed mid-write left (temporary files/keys, unfinished uploads).

        Only safe while no attempt is writing: while this run holds the lease (no other run is live), at its
        start and after every attempt it started has returned."""
        storage.cleanup_temporaries(self.output, self.storage_options)
        for sub in _SUBDIRS:
            storage.cleanup_temporaries(self.path(sub), self.storage_options)

    def write_plan(self, shards: dict[str, str]) -> None:
        storage.write_json_atomic(self.path("plan.json"), {"shards": shards}, self.storage_options)

    # -- per-shard records ----------------------------------------------------------------------------------------

    def done_ids(self) -> set[str]:
        return {
            n[: -len(".json")] for n in storage.list_files(self.path("done"), ".json", self.storage_options)
        }

    def read_done(self, shard_id: str) -> dict[str, Any]:
        return storage.read_json(self.done_url(shard_id), self.storage_options)

    def read_done_many(self, shard_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Read many markers concurrently: on an object store each is a round trip."""
        with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
            return dict(zip(shard_ids, pool.map(self.read_done, shard_ids)))

    def is_done(self, shard_id: str) -> bool:
        return storage.exists(self.done_url(shard_id), self.storage_options)

    def mark_done(self, shard_id: str, record: dict[str, Any]) -> None:
        """The commit point of a shard: written after its data and error files are in place."""
        storage.write_json_atomic(self.done_url(shard_id), record, self.storage_options)
        storage.remove(self.failed_url(shard_id), self.storage_options)

    def mark_failed(self, shard_id: str, record: dict[str, Any]) -> None:
        storage.write_json_atomic(self.failed_url(shard_id), record, self.storage_options)

    def unmark_done(self, shard_id: str) -> None:
        """Forget a shard's commit (its input changed and the user asked to reprocess it)."""
        storage.remove(self.done_url(shard_id), self.storage_options)

    def remove_uncommitted(self, shard_id: str) -> None:
        """Remove data and error files of a shard that has no done marker: an attempt killed between its
        data commit and its marker left them. Only while holding the lease (no attempt is writing)."""
        storage.remove(self.data_url(shard_id), self.storage_options)
        storage.remove(self.errors_url(shard_id), self.storage_options)

    def failed_ids(self) -> set[str]:
        return {
            n[: -len(".json")] for n in storage.list_files(self.path("failed"), ".json", self.storage_options)
        }

    def read_plan(self) -> dict[str, str] | None:
        url = self.path("plan.json")
        if not storage.exists(url, self.storage_options):
            return None
        return storage.read_json(url, self.storage_options)["shards"]


@dataclass
class Status:
    """The latest plan's shards (done, failed, pending) and what OUT holds beyond that plan."""

    planned: int = 0
    done: list[str] = field(default_factory=list)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    samples: int = 0
    rows: int = 0
    errors_by_reason: Counter = field(default_factory=Counter)
    data_bytes: int = 0
    ignored_by_reason: Counter = field(default_factory=Counter)  # tar members in no sample
    # Shards of earlier runs that the latest plan does not name (e.g. a narrower pattern): their data stays
    # in OUT; their failure records are history, not this plan's failures.
    done_outside_plan: list[str] = field(default_factory=list)
    failed_outside_plan: dict[str, str] = field(default_factory=dict)  # id -> reason
    lease: dict[str, Any] | None = None  # the run writing into OUT now, if any

    @property
    def complete(self) -> bool:
        return not self.failed and not self.pending and bool(self.done)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": {
                "planned": self.planned,
                "done": len(self.done),
                "failed": len(self.failed),
                "pending": len(self.pending),
            },
            "samples": self.samples,
            "rows": self.rows,
            "errors": sum(self.errors_by_reason.values()),
            "errors_by_reason": dict(sorted(self.errors_by_reason.items())),
            "data_bytes": self.data_bytes,
            "failed_shards": {k: v.get("reason") for k, v in sorted(self.failed.items())},
            **ignored_members(self.ignored_by_reason),
            "outside_plan": {
                "done": len(self.done_outside_plan),
                "failed_shards": dict(sorted(self.failed_outside_plan.items())),
            },
            "active_run": self.lease,
        }


def ignored_members(by_reason: Counter) -> dict[str, Any]:
    """Status entries for tar members that are in no sample (directories, names without an extension, ...)."""
    return {"ignored_members": sum(by_reason.values()), "ignored_by_reason": dict(sorted(by_reason.items()))}


def read_status(ledger: Ledger) -> Status:
    """Done / failed / pending shards of the latest plan, rows and errors by reason of its done shards, and
    what OUT holds outside that plan; from OUT alone. Without a plan.json, every record counts as planned."""
    done = ledger.done_ids()
    failed_ids = ledger.failed_ids() - done
    plan = ledger.read_plan()
    planned = set(plan) if plan is not None else done | failed_ids
    st = Status(planned=len(planned))
    st.done = sorted(done & planned)
    st.done_outside_plan = sorted(done - planned)
    for rec in ledger.read_done_many(st.done).values():
        st.samples += rec["samples"]
        st.rows += rec["rows"]
        st.data_bytes += rec.get("data_bytes", 0)
        st.errors_by_reason.update(rec.get("errors_by_reason", {}))
        st.ignored_by_reason.update(rec.get("ignored_by_reason", {}))
    records = {i: storage.read_json(ledger.failed_url(i), ledger.storage_options) for i in sorted(failed_ids)}
    st.failed = {i: r for i, r in records.items() if i in planned}
    st.failed_outside_plan = {i: r.get("reason", "?") for i, r in records.items() if i not in planned}
    st.pending = sorted(planned - done - failed_ids)
    holder = read_lease(ledger.output, ledger.storage_options)
    if holder is not None:
        st.lease = {**asdict(holder), "description": holder.describe()}
    return st
