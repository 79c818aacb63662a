"""A GCS JSON API on 127.0.0.1 for tests (gcp-storage-emulator, through gcsfs): `with gcs_server() as gcs`.

The emulator keeps everything in memory and serves it from a threaded HTTP server on an OS-chosen loopback
port; the server records (method, path?query) of every request it answers.

One gap is filled here: gcp-storage-emulator 2026.7.19 has no route for DELETE on a resumable upload's
session URI, which is how GCS cancels an upload (and what gcsfs's `discard()` sends). It answers
501 Not Implemented, which gcsfs retries six times (~30 s) before giving up. The route added below does
what GCS documents: it drops the session and its received bytes and answers 499.
"""

from __future__ import annotations

import contextlib
import os
import threading
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import ThreadingHTTPServer
from typing import Any

# gcsfs >= 2025.10 asks GCS over gRPC whether a bucket is "zonal" before many calls; an emulator has no
# gRPC endpoint, so each ask waits 60 s. Turn the experimental path off before gcsfs is first imported
# (tests/conftest.py sets it too, for Ray workers).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from gcp_storage_emulator import server as emulator  # noqa: E402
from gcp_storage_emulator import settings as emulator_settings  # noqa: E402
from gcp_storage_emulator.exceptions import NotFound  # noqa: E402
from gcp_storage_emulator.handlers import buckets  # noqa: E402
from gcp_storage_emulator.storage import RESUMABLE_DIR, Storage  # noqa: E402

_CANCELLED = types.SimpleNamespace(value=499, phrase="Client Closed Request")


def _cancel_resumable_upload(
    request: Any, response: Any, storage: Storage, *args: Any, **kwargs: Any
) -> None:
    upload_id = request.query.get("upload_id", [""])[0]
    try:
        storage.delete_resumable_file_obj(upload_id)
    except NotFound:
        response.status = emulator.HTTPStatus.NOT_FOUND
        return
    with contextlib.suppress(Exception):  # the bytes received so far, if any chunk arrived
        storage._store.remove_file(f"{RESUMABLE_DIR}/{storage.safe_id(upload_id)}")
    response.status = _CANCELLED


def _add_cancel_route() -> None:
    upload_route = rf"^{emulator_settings.UPLOAD_API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o$"
    for regex, handlers in emulator.HANDLERS:
        if regex == upload_route:
            handlers.setdefault(emulator.DELETE, _cancel_resumable_upload)
            return
    raise RuntimeError("gcp-storage-emulator's upload route moved: update tests/gcsserver.py")


@dataclass
class GCSServer:
    """A running emulator: its endpoint, a fresh bucket, gcsfs options, the requests it has served."""

    endpoint_url: str
    bucket: str
    storage: Storage
    requests: list[tuple[str, str]] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)  # the Authorization header of each request

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "token": "anon", "project": "vqpipe-test"}

    def url(self, key: str = "") -> str:
        """gs://<bucket>/<key>"""
        return f"gs://{self.bucket}/{key}"

    def seed(self, objects: dict[str, bytes]) -> None:
        """Create objects (key -> content) with gcsfs."""
        import gcsfs

        fs = gcsfs.GCSFileSystem(**self.storage_options, skip_instance_cache=True)
        fs.pipe({f"{self.bucket}/{k}": v for k, v in objects.items()})

    def keys(self, prefix: str = "") -> set[str]:
        """Every committed object name under `prefix`, straight from the emulator's state."""
        return {k for k in self.storage.objects.get(self.bucket, {}) if k.startswith(prefix)}

    def resumable_sessions(self) -> list[str]:
        """Object names of resumable uploads started and neither finished nor cancelled."""
        return [obj.get("name", "?") for obj in self.storage.resumable.values()]


class _RequestHandler(emulator.RequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.server.request_log.append((self.command, self.path))  # type: ignore[attr-defined]
            self.server.auth_log.append(self.headers.get("Authorization", ""))  # type: ignore[attr-defined]
        return ok


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up early (a reset, a cancelled read) is not an emulator failure worth a traceback.
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def gcs_server() -> Iterator[GCSServer]:
    """Start the emulator on 127.0.0.1 (free port, in memory), create a bucket, yield, stop it."""
    _add_cancel_route()
    storage = Storage(use_memory_fs=True)
    log: list[tuple[str, str]] = []
    auth: list[str] = []
    httpd = _Server(("127.0.0.1", 0), partial(_RequestHandler, storage))
    httpd.request_log, httpd.auth_log = log, auth  # type: ignore[attr-defined]
    host, port = httpd.server_address[:2]
    assert host == "127.0.0.1", host
    thread = threading.Thread(target=httpd.serve_forever, name="gcs-emulator", daemon=True)
    thread.start()
    saved = os.environ.get("NO_PROXY")
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    gcs = GCSServer(f"http://127.0.0.1:{port}", f"vqpipe-{uuid.uuid4().hex[:12]}", storage, log, auth)
    try:
        buckets.create_bucket(gcs.bucket, storage)
        yield gcs
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
        if saved is None:
            os.environ.pop("NO_PROXY", None)
        else:
            os.environ["NO_PROXY"] = saved
