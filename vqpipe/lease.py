"""The run lease: at most one run writes into an OUT at a time (docs/reliability.md, "Concurrent runs").

`OUT/lease.json` names the run that holds OUT: run id, host, pid, when it started, its last heartbeat and
when the lease expires. It is taken with a conditional write (local: an exclusive lock around
check-and-replace; S3: `If-None-Match`/`If-Match`), renewed by a heartbeat thread on the driver, and removed
when the run ends. A second run finds it and waits (`run.wait_for_lease_s`) or refuses with the holder named.
A lease whose holder is provably gone is taken over: its heartbeat stopped for longer than `run.lease_ttl_s`,
or its process no longer exists on this host. A holder that finds its lease taken (it stalled past expiry)
stops its run: the new holder has cleaned up what it was writing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from . import storage
from .errors import LeaseError

logger = logging.getLogger(__name__)

LEASE_NAME = "lease.json"


@dataclass(frozen=True)
class LeaseRecord:
    run_id: str
    host: str
    pid: int
    pid_namespace: str | None  # Linux: two containers may share a host name but not a pid namespace
    started: float  # wall-clock seconds (time.time), as all times here: compared across hosts
    heartbeat: float
    expires: float
    # What the run reported at its last heartbeat (for `vqpipe status`); None before it has replicas.
    replicas_live: int | None = None
    replicas_pending: int | None = None

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True, indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        """None for anything that is not a lease record (damaged by hand, or another program's file)."""
        try:
            d = json.loads(data)
            return cls(
                run_id=str(d["run_id"]),
                host=str(d["host"]),
                pid=int(d["pid"]),
                pid_namespace=d.get("pid_namespace"),
                started=float(d["started"]),
                heartbeat=float(d["heartbeat"]),
                expires=float(d["expires"]),
                replicas_live=_count(d.get("replicas_live")),
                replicas_pending=_count(d.get("replicas_pending")),
            )
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        left = self.expires - now
        expiry = f"expires in {left:.0f}s" if left >= 0 else f"expired {-left:.0f}s ago (that run is gone)"
        replicas = ""
        if self.replicas_live is not None:
            replicas = f", {self.replicas_live} replicas live, {self.replicas_pending or 0} pending"
        return (
            f"run {self.run_id} on host {self.host} (pid {self.pid}), started {now - self.started:.0f}s ago, "
            f"last heartbeat {now - self.heartbeat:.0f}s ago, {expiry}{replicas}"
        )


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_gone(rec: LeaseRecord) -> bool:
    """True only when the holder's process is provably not running: same host and pid namespace, and its
    pid is free (or a zombie). A pid reused by another process reads as alive: we then wait for expiry."""
    if rec.host != socket.gethostname() or rec.pid_namespace is None or rec.pid_namespace != _pid_namespace():
        return False
    try:
        os.kill(rec.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: alive
        return False
    with contextlib.suppress(OSError, IndexError), open(f"/proc/{rec.pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, not yet reaped
    return False


def read_lease(output: str, storage_options: dict[str, Any] | None = None) -> LeaseRecord | None:
    """The lease record in OUT, if any (for `vqpipe status`)."""
    got = storage.read_versioned(storage.join(output, LEASE_NAME), storage_options)
    return LeaseRecord.from_bytes(got[0]) if got else None


class Lease:
    """Hold OUT for one run: `acquire()`, then `check()` now and then; `release()` at the end (or `with`)."""

    def __init__(
        self,
        output: str,
        storage_options: dict[str, Any] | None = None,
        ttl_s: float = 120.0,
        run_id: str | None = None,
    ):
        self.url = storage.join(output, LEASE_NAME)
        self.output = output
        self.storage_options = storage_options
        self.ttl_s = ttl_s
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.started = time.time()
        self.record: LeaseRecord | None = None
        self._version: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._replicas: tuple[int, int] | None = None

    def report(self, live: int, pending: int) -> None:
        """The run's replicas, written with the next heartbeat (read by `vqpipe status`)."""
        self._replicas = (live, pending)

    def _new_record(self) -> LeaseRecord:
        now = time.time()
        live, pending = self._replicas or (None, None)
        return LeaseRecord(
            self.run_id,
            socket.gethostname(),
            os.getpid(),
            _pid_namespace(),
            self.started,
            now,
            now + self.ttl_s,
            live,
            pending,
        )

    def acquire(self, wait_s: float = 0.0, poll_s: float | None = None) -> None:
        """Take the lease, waiting up to `wait_s` seconds for a live holder to finish; LeaseError if it
        does not. Starts the heartbeat."""
        deadline = time.monotonic() + wait_s
        poll_s = poll_s if poll_s is not None else min(5.0, max(0.05, self.ttl_s / 10))
        said_waiting = False
        while True:
            current = storage.read_versioned(self.url, self.storage_options)
            holder = LeaseRecord.from_bytes(current[0]) if current else None
            if current is not None and holder is not None and holder.run_id == self.run_id:
                # Our own write went through but its answer was lost (a reset), and the client's retry then
                # failed its precondition: the lease is ours already.
                self.record, self._version = holder, current[1]
                break
            if current is not None and holder is not None and not self._gone(holder):
                if time.monotonic() >= deadline:
                    raise LeaseError(
                        f"{storage.redact(self.output)} is in use by {holder.describe()}. Wait for it, rerun with "
                        f"--wait-for-lease SECONDS, or, if that run is gone, rerun after the lease expires "
                        f"(or delete {storage.redact(self.url)})"
                    )
                if not said_waiting:
                    logger.info("waiting up to %.0fs for %s to end", wait_s, holder.describe())
                    said_waiting = True
                time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
                continue
            record = self._new_record()
            try:
                self._version = storage.write_if(
                    self.url,
                    record.to_bytes(),
                    self.storage_options,
                    if_version=current[1] if current else None,
                )
            except storage.WriteConflict:
                continue  # another run took or renewed it between our read and write: look again
            self.record = record
            if current is not None:
                why = "unreadable lease file" if holder is None else holder.describe()
                logger.warning("took over the lease of %s: %s", storage.redact(self.output), why)
            break
        logger.info("holding %s as run %s", storage.redact(self.url), self.run_id)
        self._thread = threading.Thread(target=self._heartbeat, name="vqpipe-lease", daemon=True)
        self._thread.start()

    @staticmethod
    def _gone(holder: LeaseRecord) -> bool:
        return time.time() > holder.expires or _process_gone(holder)

    def _heartbeat(self) -> None:
        interval = self.ttl_s / 4
        while not self._stop.wait(interval):
            try:
                self.renew()
            except Exception as e:  # never let the thread die silently: check() then notices the expiry
                logger.warning("lease heartbeat failed (%s); retrying", storage.redact(str(e)))
            if self._lost:
                return

    def renew(self) -> None:
        """Extend the lease (the heartbeat calls this). A lease already past its expiry is not renewed: another
        run may hold it now, so this run counts it as lost."""
        assert self.record is not None, "renew() before acquire()"
        if time.time() > self.record.expires:
            self._lose(f"its heartbeat stalled past expiry ({self.ttl_s:.0f}s)")
            return
        record = self._new_record()
        try:
            self._version = storage.write_if(
                self.url, record.to_bytes(), self.storage_options, if_version=self._version
            )
            self.record = record
        except storage.WriteConflict:
            current = storage.read_versioned(self.url, self.storage_options)
            holder = LeaseRecord.from_bytes(current[0]) if current else None
            if current is not None and holder is not None and holder.run_id == self.run_id:
                self.record, self._version = holder, current[1]  # our renewal landed; its answer was lost
                return
            self._lose(f"taken by {holder.describe()}" if holder else "removed")
        except storage.StorageError as e:  # a network blip: try again at the next beat, before expiry
            logger.warning("cannot renew the lease (%s); retrying", e)

    def _lose(self, why: str) -> None:
        self._lost = f"this run lost its lease on {storage.redact(self.output)}: {why}"
        logger.error("%s; stopping", self._lost)

    def check(self) -> None:
        """Raise LeaseError if the lease was lost, or ran out unrenewed: the run must stop writing."""
        if not self._lost and self.record is not None and time.time() > self.record.expires:
            self._lose(f"it was not renewed within {self.ttl_s:.0f}s")
        if self._lost:
            raise LeaseError(self._lost)

    @property
    def held(self) -> bool:
        return self.record is not None and not self._lost

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, unless another run holds it by now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        # A record always comes with its version.
        if self.record is None or self._version is None or self._lost:
            return
        try:
            storage.remove_if(self.url, self.storage_options, if_version=self._version)
        except storage.WriteConflict:
            logger.warning("%s: lease changed hands before release; left as it is", storage.redact(self.url))
        except storage.StorageError as e:
            logger.warning("cannot release the lease (%s); it expires in %.0fs", e, self.ttl_s)
        self.record = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
