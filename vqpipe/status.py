"""`vqpipe status`: what the latest plan's shards are (done, failed, pending) and what OUT holds beyond that plan.

Read from OUT alone (its Snapshot: the ledger's index and the markers it lacks, the data/ listing; failure records,
the lease); no Ray, no inputs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .gcpause import without_cyclic_gc
from .lease import read_lease
from .out.snapshot import Snapshot
from .records import FailedRecord, RunEnd


@dataclass
class Status:
    """The latest plan's shards (done, failed, pending) and what OUT holds beyond that plan."""

    planned: int = 0
    done: list[str] = field(default_factory=list)
    failed: dict[str, FailedRecord] = field(default_factory=dict)
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
    # Files committed rows need that are missing (from the listings; `--verify` reads every file).
    damaged: list[str] = field(default_factory=list)
    # A compaction moving rows is unfinished: readers of data/ fail until `vqpipe compact` finishes it.
    incomplete: bool = False
    format_version: int = 2  # of the OUT's layout (1: format 1.x, read as it is; `vqpipe migrate` moves it)
    last_run: RunEnd | None = None  # how the latest run ended (run.json), unless it is running or was killed

    @property
    def complete(self) -> bool:
        return (
            not self.failed
            and not self.pending
            and bool(self.done)
            and not self.damaged
            and not self.incomplete
        )

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
            "failed_shards": {k: v.reason for k, v in sorted(self.failed.items())},
            **ignored_members(self.ignored_by_reason),
            "outside_plan": {
                "done": len(self.done_outside_plan),
                "failed_shards": dict(sorted(self.failed_outside_plan.items())),
            },
            "active_run": self.lease,
            "damaged": list(self.damaged),
            "incomplete_compaction": self.incomplete,
            "layout_version": self.format_version,
            "last_run": self.last_run.to_json() if self.last_run else None,
        }


def ignored_members(by_reason: Counter) -> dict[str, Any]:
    """Status entries for tar members that are in no sample (directories, names without an extension, ...)."""
    return {"ignored_members": sum(by_reason.values()), "ignored_by_reason": dict(sorted(by_reason.items()))}


@without_cyclic_gc
def read_status(snapshot: Snapshot, planned: set[str] | None = None) -> Status:
    """Done / failed / pending shards of the latest plan, rows and errors by reason of its done shards, and
    what OUT holds outside that plan; from OUT alone (`snapshot`). Without a plan.json, every record counts as
    planned. `planned`: the ids of the plan.json the caller wrote, instead of reading it back."""
    ledger, committed = snapshot.ledger, snapshot.committed
    done = committed.ids
    failed_ids = ledger.failed_ids() - done
    if planned is None:
        plan = ledger.read_plan()
        planned = set(plan) if plan is not None else done | failed_ids
    st = Status(planned=len(planned))
    st.done = sorted(done & planned)
    st.done_outside_plan = sorted(done - planned)
    totals = committed.totals(st.done)
    st.samples, st.rows, st.data_bytes = totals["samples"], totals["rows"], totals["data_bytes"]
    st.errors_by_reason.update(totals["errors_by_reason"])
    st.ignored_by_reason.update(totals["ignored_by_reason"])
    records = {i: ledger.read_failed(i) for i in sorted(failed_ids)}
    st.failed = {i: r for i, r in records.items() if i in planned}
    st.failed_outside_plan = {i: r.reason for i, r in records.items() if i not in planned}
    st.pending = sorted(planned - done - failed_ids)
    holder = read_lease(ledger.output, ledger.storage_options, ledger.layout)
    if holder is not None:
        st.lease = {**asdict(holder), "description": holder.describe()}
    st.damaged = [d.describe() for d in snapshot.missing()]
    st.incomplete = snapshot.incomplete
    st.format_version = ledger.layout.version
    st.last_run = snapshot.run.ended if snapshot.run is not None else None
    return st
