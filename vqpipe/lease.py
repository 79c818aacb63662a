"""The run lease: at most one run writes into an OUT at a time (docs/reliability.md, "Concurrent runs").

`OUT/_vqpipe/lease.json` names the run that holds OUT: run id, host, pid, when it started, its last heartbeat and
when the lease expires. It is taken with a conditional write (local: an exclusive lock around
check-and-replace; S3: `If-None-Match`/`If-Match`), renewed by a heartbeat thread on the driver, and removed
when the run ends. A second run finds it and waits (`run.wait_for_lease_s`) or refuses with the holder named.
A lease whose holder is provably gone is taken over: its heartbeat is older than the reader's own
`run.lease_ttl_s` (whatever expiry the record claims), the file stayed unchanged that long while the reader
waited (a holder whose clock runs ahead), or its process no longer exists on this host. A record that is no lease
(unparsable, a time that is not finite, a heartbeat a day or more ahead of this host's clock) is taken over
with a warning naming the file. A holder that finds its lease taken (it stalled past expiry) stops its run: the
new holder has cleaned up what it was writing.

One module although over 300 lines: the record, its checks and the take/renew/release protocol are one piece of
reasoning about who may write OUT, and are read together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from . import storage
from .errors import LeaseError
from .out.layout import Layout, detect

logger = logging.getLogger(__name__)

# A holder renews every TTL/4 but at least this often, so that a reader with a shorter TTL than the holder's
# (it judges the heartbeat's age by its own TTL) does not take a live lease for gone: any TTL above twice this
# is safe whatever TTL the holder runs with.
MAX_HEARTBEAT_INTERVAL_S = 30.0
# How long a driver that was stopped by a signal tries to remove its lease before it exits.
QUICK_RELEASE_S = 5.0
# A heartbeat this far ahead of the reader's clock is no lease (a hand-edited file, or a clock off by a day).
MAX_CLOCK_AHEAD_S = 86400.0


class InvalidLease(ValueError):
    """lease.json holds something that is not a usable lease record; the message says what."""


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
    def parse(cls, data: bytes, now: float | None = None) -> LeaseRecord:
        """The record in `data`; InvalidLease saying what is wrong for anything that is not a usable lease
        (damaged by hand, another program's file, times that are not finite or lie a day ahead of `now`)."""
        try:
            d = json.loads(data)
            record = cls(
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
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise InvalidLease(f"not a lease record ({type(e).__name__}: {e})") from None
        times = {"started": record.started, "heartbeat": record.heartbeat, "expires": record.expires}
        for name, value in times.items():
            if not math.isfinite(value) or value < 0:
                raise InvalidLease(f"{name} is {value}, not a time")
        if record.expires < record.heartbeat:
            raise InvalidLease(
                f"it expires {record.heartbeat - record.expires:.0f}s before its own heartbeat"
            )
        now = time.time() if now is None else now
        if record.heartbeat - now > MAX_CLOCK_AHEAD_S:
            raise InvalidLease(f"its heartbeat is {record.heartbeat - now:.0f}s ahead of this host's clock")
        return record

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseRecord | None:
        """None for anything that is not a usable lease record (see `parse`)."""
        try:
            return cls.parse(data)
        except InvalidLease:
            return None

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        left = self.expires - now
        expiry = f"expires in {left:.0f}s" if left >= 0 else f"expired {-left:.0f}s ago (that run is gone)"
        age = now - self.heartbeat
        heartbeat = (
            f"last heartbeat {age:.0f}s ago"
            if age >= 0
            else f"heartbeat {-age:.0f}s ahead of this host's clock"
        )
        replicas = ""
        if self.replicas_live is not None:
            replicas = f", {self.replicas_live} replicas live, {self.replicas_pending or 0} pending"
        return (
            f"run {self.run_id} on host {self.host} (pid {self.pid}), started {now - self.started:.0f}s ago, "
            f"{heartbeat}, {expiry}{replicas}"
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


def read_lease(
    output: str, storage_options: dict[str, Any] | None = None, layout: Layout | None = None
) -> LeaseRecord | None:
    """The lease record in OUT, if any (for `vqpipe status`)."""
    layout = layout if layout is not None else detect(output, storage_options)
    got = storage.read_versioned(layout.lease_url, storage_options)
    return LeaseRecord.from_bytes(got[0]) if got else None


class Lease:
    """Hold OUT for one run: `acquire()`, then `check()` now and then; `release()` at the end (or `with`)."""

    def __init__(
        self,
        output: str,
        storage_options: dict[str, Any] | None = None,
        ttl_s: float = 120.0,
        run_id: str | None = None,
        layout: Layout | None = None,
    ):
        """`layout`: OUT's (None: found out; the lease of a format-1.x OUT is where format 1.x kept it)."""
        layout = layout if layout is not None else detect(output, storage_options)
        self.url = layout.lease_url
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
        seen: tuple[str, float] | None = (
            None  # the holder's version, and since when (monotonic) it is unchanged
        )
        while True:
            current = storage.read_versioned(self.url, self.storage_options)
            holder, invalid = self._parse(current)
            if current is not None and holder is not None and holder.run_id == self.run_id:
                # Our own write went through but its answer was lost (a reset), and the client's retry then
                # failed its precondition: the lease is ours already.
                self.record, self._version = holder, current[1]
                break
            if current is not None and (seen is None or seen[0] != current[1]):
                seen = (current[1], time.monotonic())
            unchanged_s = time.monotonic() - seen[1] if seen is not None else 0.0
            gone = self._gone(holder, unchanged_s) if holder is not None else None
            if current is not None and holder is not None and gone is None:
                if time.monotonic() >= deadline:
                    raise LeaseError(
                        f"{storage.redact(self.output)} is in use by {holder.describe()}. Wait for it, rerun with "
                        f"--wait-for-lease SECONDS (a lease left unchanged for longer than the lease TTL, "
                        f"{self.ttl_s:.0f}s, is taken over), or, if that run is gone, rerun after the lease expires "
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
                why = (
                    f"{storage.redact(self.url)}: {invalid}"
                    if holder is None
                    else f"{holder.describe()}: {gone}"
                )
                logger.warning("took over the lease of %s: %s", storage.redact(self.output), why)
            break
        logger.info("holding %s as run %s", storage.redact(self.url), self.run_id)
        self._thread = threading.Thread(target=self._heartbeat, name="vqpipe-lease", daemon=True)
        self._thread.start()

    @staticmethod
    def _parse(current: tuple[bytes, str] | None) -> tuple[LeaseRecord | None, str | None]:
        """The holder's record, or why the file there is no lease."""
        if current is None:
            return None, None
        try:
            return LeaseRecord.parse(current[0]), None
        except InvalidLease as e:
            return None, f"not a valid lease, {e}"

    def _gone(self, holder: LeaseRecord, unchanged_s: float) -> str | None:
        """Why `holder` is provably gone, or None while it may be alive. Its own expiry is believed only
        when it says expired: a heartbeat older than this run's TTL, or a record this run saw unchanged for
        that long, is gone whatever expiry it claims (a clock running ahead, a hand-edited file)."""
        now = time.time()
        if now - holder.heartbeat > self.ttl_s:
            return f"its heartbeat is older than this run's lease TTL ({self.ttl_s:.0f}s)"
        if unchanged_s > self.ttl_s:
            return f"it stayed unchanged for {unchanged_s:.0f}s, longer than this run's lease TTL ({self.ttl_s:g}s)"
        if now > holder.expires:
            return "it expired"
        if _process_gone(holder):
            return "its process no longer exists on this host"
        return None

    def _heartbeat(self) -> None:
        interval = min(self.ttl_s / 4, MAX_HEARTBEAT_INTERVAL_S)
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

    def release(self, within_s: float | None = None) -> None:
        """Stop the heartbeat and remove the lease, unless another run holds it by now. `within_s`: give up
        after that long (a stopped driver must not wait out a silent store; the lease then expires)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(within_s)
        # A record always comes with its version.
        if self.record is None or self._version is None or self._lost:
            return
        options = self.storage_options
        if within_s is not None:
            options = {**(options or {}), storage.DEADLINE_OPTION: within_s}
        try:
            storage.remove_if(self.url, options, if_version=self._version)
        except storage.WriteConflict:
            logger.warning("%s: lease changed hands before release; left as it is", storage.redact(self.url))
        except storage.StorageError as e:
            logger.warning("cannot release the lease (%s); it expires in %.0fs", e, self.ttl_s)
        self.record = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        # After a stop signal (stop.Interrupted, KeyboardInterrupt: not Exceptions) the release gets a few
        # seconds; a lease left behind is taken over at once by the next run on this host (its pid is gone).
        stopped = exc_type is not None and not issubclass(exc_type, Exception)
        self.release(QUICK_RELEASE_S if stopped else None)
