"""A fault-injecting HTTP proxy on 127.0.0.1 for object-store tests: `with fault_proxy(upstream, ...) as p`.

It forwards every request to `upstream` (moto's S3 server or the GCS emulator) and, on a seeded schedule,
answers a fraction of them with what a struggling object store sends instead:

- "slowdown": 503 with the store's throttling body (S3: `<Code>SlowDown</Code>`; GCS: JSON error 503),
  the request is not forwarded;
- "internal": 500 (S3: `<Code>InternalError</Code>`; GCS: JSON error 500), not forwarded;
- "reset": the connection is reset. A response with a body is forwarded upstream first and cut off after
  half of its body (the dropped-connection-mid-shard case); other requests are reset before they are
  forwarded, so a retried upload never meets its own completed twin;
- "slow": forwarded, but answered after `delay_s` (not a failure: it only tests patience);
- "forbidden": 403 (S3: `<Code>AccessDenied</Code>`), a permanent error no layer may retry. Only used in
  `script`, a list of faults applied to the next requests in order, before the seeded schedule resumes;
- "silent": the request's headers are read and it is never answered: the connection stays open, silent,
  until the proxy stops. A request sent with `Expect: 100-continue` (s3fs's PUTs) gets no `100 Continue`,
  so its body is never sent; others are read whole. Nothing is forwarded;
- "stall": forwarded, and a response with a body sends its headers and half the body, then nothing more
  until the proxy stops (a store that stalls mid-body); a response without one is never answered.

`down = True` answers every request with a 503 (a store that stays unavailable; `down_as = "silent"` makes it
one that never answers); `down_after = n` does so from the n+1-th request on; `down_methods = ("PUT",)` limits
it to those methods (a store that lists and reads but never answers an upload). `stats` counts requests
and injected faults per kind so a test can check the fault rate it actually ran at.

Requests are forwarded unchanged, Host header included: clients sign for the proxy's address and the test
servers do not verify signatures. Only plain HTTP/1.1 with Content-Length or chunked bodies is handled,
which is what s3fs (aiobotocore) and gcsfs (aiohttp) send.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAILURES = ("slowdown", "internal", "reset", "forbidden", "silent", "stall")
_STATUS = {"slowdown": 503, "internal": 500, "forbidden": 403}
_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    403: ("AccessDenied", "Access Denied"),
}
_REASONS = {503: "Service Unavailable", 500: "Internal Server Error", 403: "Forbidden"}
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}


@dataclass
class ProxyStats:
    """What the proxy saw: requests in total and faults injected, by kind."""

    requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, fault or "")

    @property
    def failed(self) -> int:
        """Requests that the client saw fail (slow ones succeeded)."""
        return sum(self.faults[k] for k in FAILURES)

    @property
    def failure_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.faults.items()))
        return f"{self.requests} requests, {self.failed} failed ({self.failure_rate:.0%}; {kinds})"


@dataclass
class FaultProxy:
    """A running proxy: clients talk to `endpoint_url`; `rate`, `kinds` and `down` may change while it runs."""

    upstream: str
    flavor: str  # "s3" or "gcs": the error bodies to answer with
    rate: float
    kinds: dict[str, float]
    seed: int
    delay_s: float
    endpoint_url: str = ""
    down: bool = False
    down_after: int | None = None  # go down for good once this many requests were served
    down_as: str = "slowdown"  # the fault every request gets while down
    down_methods: tuple[str, ...] = ()  # while down, only requests with these methods fail (empty: all)
    script: list[str] = field(default_factory=list)
    stats: ProxyStats = field(default_factory=ProxyStats)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self.closing = threading.Event()  # set when the proxy stops: silent and stalled connections end

    def next_fault(self, method: str, path: str) -> str:
        """The fault for the next request ("" for none), drawn from the seeded schedule, and counted."""
        with self._lock:
            self.stats.requests += 1
            if self.down_after is not None and self.stats.requests > self.down_after:
                self.down = True
            if self.down and (not self.down_methods or method in self.down_methods):
                fault = self.down_as
            elif self.script:
                fault = self.script.pop(0)
            elif self._rng.random() < self.rate:
                fault = self._rng.choices(list(self.kinds), weights=list(self.kinds.values()))[0]
            else:
                fault = ""
            if fault:
                self.stats.faults[fault] += 1
            self.stats.log.append((method, path, fault))
            return fault

    def error_body(self, status: int, path: str) -> tuple[bytes, str]:
        code, message = _ERRORS[status]
        if self.flavor == "gcs":
            body = {"error": {"code": status, "message": message, "errors": [{"message": message}]}}
            return json.dumps(body).encode(), "application/json; charset=UTF-8"
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><Resource>{path}</Resource>"
            "<RequestId>FAULTPROXY</RequestId></Error>"
        )
        return xml.encode(), "application/xml"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real stores do
    server: _ProxyServer

    _drawn: str | None = None  # the fault of the request being handled, drawn before its body is read

    def log_message(self, *args: Any) -> None:
        pass

    def handle_expect_100(self) -> bool:
        # Called while parsing a request that waits for `100 Continue` before it sends its body: the fault is
        # drawn here, so that a silent store sends no 100 either.
        self._drawn = self.server.proxy.next_fault(self.command, self.path)
        return True if self._drawn == "silent" else super().handle_expect_100()

    def _hang(self) -> None:
        """Say nothing more on this connection until the proxy stops, then drop it."""
        self.server.proxy.closing.wait()
        self._reset()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout: close() sends RST, as a dropped connection does.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        up = urlsplit(self.server.proxy.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body if body or self.command != "GET" else None,
                         headers=headers)  # fmt: skip
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _send(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes, cut: bool) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() not in _HOP_BY_HOP and k.lower() not in ("content-length", "server", "date"):
                self.send_header(k, v)
        # A HEAD answer has no body but tells the object's length.
        length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
        self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            data = b""
        self.wfile.write(data[: len(data) // 2] if cut else data)
        self.wfile.flush()

    def _handle(self) -> None:
        proxy = self.server.proxy
        fault, self._drawn = self._drawn, None
        if fault == "silent":  # waiting for a 100 Continue: its body never comes
            self._hang()
            return
        body = self._read_body()
        if fault is None:
            fault = proxy.next_fault(self.command, self.path)
        if fault == "silent":
            self._hang()
            return
        if fault in _STATUS:
            status = _STATUS[fault]
            data, ctype = proxy.error_body(status, urlsplit(self.path).path)
            self._send(status, _REASONS[status], [("Content-Type", ctype)], data, cut=False)
            return
        if fault == "reset" and self.command not in ("GET",):
            self._reset()  # the request is lost before it reaches the store
            return
        if fault == "slow":
            time.sleep(proxy.delay_s)
        try:
            status, reason, headers, data = self._forward(body)
        except OSError:
            self._reset()
            return
        if fault in ("reset", "stall"):
            if len(data) < 2:  # nothing to cut in half: drop the connection (or say nothing) instead
                self._hang() if fault == "stall" else self._reset()
                return
            self._send(status, reason, headers, data, cut=True)
            self._hang() if fault == "stall" else self._reset()
            return
        self._send(status, reason, headers, data, cut=False)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, proxy: FaultProxy):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.proxy = proxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # a socket this proxy reset on purpose: no traceback
            super().handle_error(request, client_address)


@contextlib.contextmanager
def fault_proxy(
    upstream: str,
    *,
    flavor: str = "s3",
    rate: float = 0.15,
    kinds: dict[str, float] | None = None,
    seed: int = 0,
    delay_s: float = 0.2,
    script: list[str] | None = None,
) -> Iterator[FaultProxy]:
    """Run a proxy to `upstream` on a free 127.0.0.1 port that fails `rate` of the requests, drawing each
    fault's kind from `kinds` (weights; default: the three failures equally, plus some slow answers)."""
    kinds = kinds or {"slowdown": 1.0, "internal": 1.0, "reset": 1.0, "slow": 0.5}
    proxy = FaultProxy(upstream, flavor, rate, kinds, seed, delay_s, script=list(script or []))
    server = _ProxyServer(proxy)
    host, port = server.server_address[:2]
    assert host == "127.0.0.1", host
    proxy.endpoint_url = f"http://127.0.0.1:{port}"
    thread = threading.Thread(target=server.serve_forever, name="fault-proxy", daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
