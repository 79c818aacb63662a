"""The run directory: run.json, plan.json, done markers (commit records) and failure records (the status summary:
status.py; which rows are committed and where: vqpipe/out/snapshot.py, the one reader of the listings made here).

Layout (vqpipe/out/layout.py, docs/format.md), format 2:
    data/<shard_id>.parquet           a shard's rows; a file here is a commit (it appears whole, or not at all)
    _vqpipe/run.json                  resolved config, output fingerprint, versions (written at the start)
    _vqpipe/plan.json                 the shards the latest run was asked to process (id -> input URL)
    _vqpipe/lease.json                the run writing here now, if any (vqpipe/lease.py)
    _vqpipe/errors/<shard_id>.pq      one row per sample that is not in data/ (written before the data file)
    _vqpipe/done/<shard_id>.json      the shard's record, written right after its data file
    _vqpipe/failed/<shard_id>.json    why a shard failed in the latest run that tried it (removed once it is done)
    _vqpipe/index/seg-*.pq            a summary row per done marker, derived from them (vqpipe/index.py)
Format-1.x OUTs (the same files beside data/, error files `.parquet`) are read through the same methods.
Everything here reads OUT alone: no Ray, no access to the inputs. The records are vqpipe/records.py's types.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from . import storage
from .errors import ConfigError, StorageError
from .gcpause import without_cyclic_gc
from .index import MAX_SEGMENTS, Committed, LedgerIndex, marker_key, row_of, stamped, verified
from .out.commit import read_commit_record
from .out.layout import Layout, detect
from .records import DoneRecord, FailedRecord, RunRecord

logger = logging.getLogger(__name__)

# Settings that change the shape of a row: one OUT never mixes them, --allow-config-change or not (two presets
# in one OUT made every reader fail mid-epoch; docs/format.md).
_LAYOUT_SETTINGS = ("preset", "var_input", "var_input_dtype", "var_input_layout", "views")
_READ_THREADS = 32  # concurrent small reads; object-store latency, not bandwidth, bounds a status or plan
# A run appends the commits it hears of to the index in batches: one write per this many, or this often.
_INDEX_FLUSH_ROWS = 1000
_INDEX_FLUSH_S = 60.0
_PLAN_WRITE_ENTRIES = 8192  # plan.json entries encoded per write
_READ_CHUNK = 1024  # markers read per batch (each batch by _READ_THREADS threads)


class Ledger:
    def __init__(
        self,
        output: str,
        storage_options: dict[str, Any] | None = None,
        run_id: str = "status",
        layout: Layout | None = None,
    ):
        """`layout`: the OUT's (None: found out with one or two existence checks; a new OUT is format 2)."""
        self.output = output.rstrip("/") if output.rstrip("/") else output
        self.storage_options = storage_options
        self.layout = layout if layout is not None else detect(self.output, storage_options)
        self.index = LedgerIndex(self.layout, storage_options, run_id)
        self._pending_rows: list[dict[str, Any]] = []  # commits reported to this driver, not yet in the index
        self._flushed_at = time.monotonic()

    def path(self, *parts: str) -> str:
        """A path under OUT (bookkeeping paths: `layout.meta`)."""
        return storage.join(self.output, *parts)

    def data_url(self, shard_id: str) -> str:
        return self.layout.data_url(shard_id)

    def errors_url(self, shard_id: str) -> str:
        return self.layout.errors_url(shard_id)

    def done_url(self, shard_id: str) -> str:
        return self.layout.done_url(shard_id)

    def failed_url(self, shard_id: str) -> str:
        return self.layout.failed_url(shard_id)

    # -- run.json -------------------------------------------------------------------------------------------------

    def read_run(self) -> dict[str, Any] | None:
        """run.json as written (any version), or None."""
        url = self.layout.run_url
        return (
            storage.read_json(url, self.storage_options)
            if storage.exists(url, self.storage_options)
            else None
        )

    def read_run_record(self) -> RunRecord | None:
        d = self.read_run()
        return RunRecord.from_json(d) if d is not None else None

    def start_run(
        self, run_record: RunRecord | Mapping[str, Any], allow_change: bool, previous: RunRecord | None = None
    ) -> None:
        """Write run.json, refusing to mix outputs of different settings in one OUT unless allowed.
        `previous`: run.json as the caller already read it (None: read it here)."""
        if not isinstance(run_record, RunRecord):  # a plain dict (test and benchmark helpers)
            run_record = RunRecord.from_json({"legacy_stem_ids": False, **run_record})
        previous = previous if previous is not None else self.read_run_record()
        if previous and previous.fingerprint != run_record.fingerprint:
            before, now = previous.output_settings, run_record.output_settings
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            reshaped = [k for k in changed if k in _LAYOUT_SETTINGS]
            if reshaped:  # not even when allowed: every reader of OUT reads one token layout
                raise ConfigError(
                    f"{self.output} holds tokens of another layout ({', '.join(f'{k}: {before.get(k)!r}' for k in reshaped)}"
                    f"; now {', '.join(f'{k}: {now.get(k)!r}' for k in reshaped)}). --allow-config-change is for "
                    "settings that keep the token layout; use a new --output"
                )
            if not allow_change:
                raise ConfigError(
                    f"{self.output} holds output of different settings (fingerprint {previous.fingerprint} "
                    f"vs {run_record.fingerprint}; changed: {', '.join(changed)}). Use a new --output, or "
                    "--allow-config-change to add shards made with the new settings"
                )
            logger.warning("output settings changed (%s); continuing as asked", ", ".join(changed))
            run_record.previous_fingerprints = [previous.fingerprint]
        self.remove_temporaries()
        storage.write_json_atomic(self.layout.run_url, run_record.to_json(), self.storage_options)

    def end_run(self, run_record: RunRecord) -> None:
        """run.json again, with how the run ended (`run_record.ended`), for `vqpipe status`."""
        storage.write_json_atomic(self.layout.run_url, run_record.to_json(), self.storage_options)

    def remove_temporaries(self) -> None:
        """Remove what attempts killed mid-write left (temporary files/keys, unfinished uploads).

        Only safe while no attempt is writing: while this run holds the lease (no other run is live), at its
        start and after every attempt it started has returned."""
        storage.cleanup_temporaries(self.output, self.storage_options)
        dirs = [self.layout.meta(), self.layout.data_dir]
        dirs += [self.layout.meta(sub) for sub in ("errors", "done", "failed", "index")]
        for d in dict.fromkeys(dirs):  # format 1.x: meta() is OUT itself
            storage.cleanup_temporaries(d, self.storage_options)

    @without_cyclic_gc
    def write_plan(self, shards: dict[str, str]) -> None:
        """plan.json: {"shards": {id: input URL}}, laid out as `write_json_atomic` does (indent 2, sorted keys)
        but encoded by json's C encoder (an indent selects the Python one: ~1 s at 100k shards) and written
        in parts (never the whole text at once: ~16 MB at 100k)."""
        ids = sorted(shards)
        with storage.atomic_write(self.layout.plan_url, self.storage_options) as f:
            f.write(b'{\n  "shards": {')
            for start in range(0, len(ids), _PLAN_WRITE_ENTRIES):
                part = {i: shards[i] for i in ids[start : start + _PLAN_WRITE_ENTRIES]}
                entries = json.dumps(part, separators=(",\n    ", ": "))[1:-1]  # in `ids` order: sorted
                f.write(f"{',' if start else ''}\n    {entries}".encode())
            f.write(b"\n  }\n}\n" if ids else b"}\n}\n")

    # -- per-shard records ----------------------------------------------------------------------------------------

    def done_ids(self) -> set[str]:
        return set(self.done_listing())

    def done_listing(self) -> dict[str, str]:
        """Shard id -> fingerprint of its done marker (size, mtime or ETag) as `index.marker_key` writes it,
        from one listing of done/ (one string per marker: 100k listing dicts would cost ~40 MB)."""
        listing = storage.iter_files_info(self.layout.meta("done"), ".json", self.storage_options)
        return {n[: -len(".json")]: marker_key(fp) for n, fp in listing}

    def read_done(self, shard_id: str) -> DoneRecord:
        url = self.done_url(shard_id)
        try:
            return DoneRecord.from_json(storage.read_json(url, self.storage_options))
        except (ValueError, TypeError) as e:  # not a record (edited by hand?): name the file
            raise StorageError(storage.redact(f"{url}: not a done record ({e})")) from None

    def read_done_many(self, shard_ids: list[str]) -> dict[str, DoneRecord]:
        """Many markers (`read_done` each), read concurrently: on an object store each is a round trip. For
        tools that want every key; `committed()` answers counts without reading markers."""
        return dict(self._read_records(shard_ids))

    def is_done(self, shard_id: str) -> bool:
        return storage.file_exists(self.done_url(shard_id), self.storage_options)

    def data_committed(self, shard_id: str) -> bool:
        """Whether the shard's data file exists: in format 2 that is its commit (one existence check)."""
        return storage.file_exists(self.data_url(shard_id), self.storage_options)

    def read_commit(self, shard_id: str) -> DoneRecord | None:
        """The shard's commit: its done marker, else (format 2) the commit record in its data file's footer, a
        crash having come between the data file and the marker; the marker is then written from it. None:
        not committed."""
        if self.is_done(shard_id):
            return self.read_done(shard_id)
        if self.layout.version < 2:
            return None
        record = self.commit_from_data(shard_id)
        if record is not None:
            logger.info(
                "%s: committed, but its done marker was lost; written again from its data file", shard_id
            )
            self.mark_done(shard_id, record)
        return record

    def commit_from_data(self, shard_id: str, size: int | None = None) -> DoneRecord | None:
        """The done record kept in a format-2 data file's footer (its `data_bytes`: `size`, else the file's),
        or None when the file is absent or carries none (a file vqpipe did not write)."""
        return read_commit_record(self.data_url(shard_id), shard_id, self.storage_options, size)

    def mark_done(
        self, shard_id: str, record: DoneRecord | Mapping[str, Any], clear_failed: bool = False
    ) -> None:
        """The commit point of a shard: written after its data and error files are in place. `clear_failed`:
        also remove its failure record (the driver does that for shards that had one; see job.py)."""
        if not isinstance(record, DoneRecord):
            record = DoneRecord.from_json(record)
        storage.write_json_atomic(self.done_url(shard_id), record.to_json(), self.storage_options)
        if clear_failed:
            self.clear_failed(shard_id)

    def clear_failed(self, shard_id: str) -> None:
        storage.remove(self.failed_url(shard_id), self.storage_options)

    def mark_failed(self, shard_id: str, record: FailedRecord | Mapping[str, Any]) -> None:
        if not isinstance(record, FailedRecord):
            record = FailedRecord.from_json(record)
        storage.write_json_atomic(self.failed_url(shard_id), record.to_json(), self.storage_options)

    def read_failed(self, shard_id: str) -> FailedRecord:
        url = self.failed_url(shard_id)
        try:
            return FailedRecord.from_json(storage.read_json(url, self.storage_options))
        except (ValueError, TypeError) as e:  # as read_done
            raise StorageError(storage.redact(f"{url}: not a failure record ({e})")) from None

    def unmark_done(self, shard_id: str) -> None:
        """Forget a shard's commit (its input changed and the user asked to reprocess it): its data file first,
        which is the commit, then its marker (a data file left without one would count as committed)."""
        storage.remove(self.data_url(shard_id), self.storage_options)
        storage.remove(self.done_url(shard_id), self.storage_options)

    def remove_uncommitted(self, shard_id: str) -> None:
        """Remove data and error files of a shard that has no done marker: an attempt killed between its
        data commit and its marker left them. Only while holding the lease (no attempt is writing)."""
        storage.remove(self.data_url(shard_id), self.storage_options)
        storage.remove(self.errors_url(shard_id), self.storage_options)

    def failed_ids(self) -> set[str]:
        return {
            n[: -len(".json")]
            for n in storage.list_files(self.layout.meta("failed"), ".json", self.storage_options)
        }

    def read_plan(self) -> dict[str, str] | None:
        url = self.layout.plan_url
        if not storage.exists(url, self.storage_options):
            return None
        return storage.read_json(url, self.storage_options)["shards"]

    # -- the index ------------------------------------------------------------------------------------------------

    @without_cyclic_gc
    def committed(
        self, maintain: bool = False, uncommitted_data: Mapping[str, int] | None = None
    ) -> Committed:
        """The committed shards: one listing of done/, the index, and a read of each listed marker the index
        lacks or holds stale. `uncommitted_data` (format 2): data files without a marker (id -> size), whose
        footers are read (a crash came between a data file, the commit, and its marker). `maintain` (only while
        holding the lease): write the lost markers again, and what was read, consolidated, back into the index,
        so that the next call reads no marker."""
        listing = self.done_listing()
        table, position, dirty = verified(self.index.load(), listing)
        missing = sorted(i for i in listing if i not in position)
        rows: list[dict[str, Any]] = []
        tables = [table]
        if missing:
            logger.info("reading %d done marker(s) the index lacks", len(missing))
            for i, rec in self._read_records(missing):  # a table per chunk: never 100k row dicts at once
                rows.append(row_of(self._summary(i, rec), listing[i]))
                if len(rows) == _READ_CHUNK:
                    tables.append(pa.Table.from_pylist(rows, schema=table.schema))
                    rows = []
        lost = {i: size for i, size in sorted((uncommitted_data or {}).items()) if i not in listing}
        for i, size in lost.items():  # rare: a crash's leftovers
            record = self.commit_from_data(i, size)
            if record is None:
                continue  # not vqpipe's commit (a file of format 1.x, or another program's): see Snapshot
            if maintain:
                logger.info("%s: committed, but its done marker was lost; writing it from its data file", i)
                self.mark_done(i, record)
            rows.append(row_of(record, None))
        if missing or rows:
            table = pa.concat_tables([*tables, pa.Table.from_pylist(rows, schema=table.schema)])
            position = {sid: n for n, sid in enumerate(table.column("shard_id").to_pylist())}
        if maintain and (dirty or missing or len(self.index.segments) > MAX_SEGMENTS):
            table = stamped(table, {**listing, **self.done_listing()} if lost else listing)
            self.index.replace(table, self.index.segments)
        return Committed(table, position)

    def _read_records(self, shard_ids: list[str]) -> Iterator[tuple[str, DoneRecord]]:
        """(id, record) of each, in order, read concurrently a chunk at a time (a caller that keeps less than
        the records never holds them all)."""
        with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
            for start in range(0, len(shard_ids), _READ_CHUNK):
                chunk = shard_ids[start : start + _READ_CHUNK]
                yield from zip(chunk, pool.map(self.read_done, chunk))

    @staticmethod
    def _summary(shard_id: str, record: DoneRecord) -> DoneRecord:
        record.shard_id = shard_id  # the file name is the id (a hand-made marker may lack the key)
        return record

    def note_committed(self, record: DoneRecord) -> None:
        """A commit this driver heard of (its marker is written): index it at the next flush, which happens
        here once enough rows or time have gathered (and at the run's end: `flush_index`)."""
        self._pending_rows.append(row_of(record, None))
        if (
            len(self._pending_rows) >= _INDEX_FLUSH_ROWS
            or time.monotonic() - self._flushed_at > _INDEX_FLUSH_S
        ):
            self.flush_index()

    def flush_index(self) -> None:
        """Append the commits noted since the last flush as one index segment (one write)."""
        rows, self._pending_rows = self._pending_rows, []
        self._flushed_at = time.monotonic()
        self.index.append(rows)
