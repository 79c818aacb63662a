"""A real S3 API (moto's server) on 127.0.0.1 for tests: `with s3_server() as s3: ... s3.storage_options`.

The server runs in-process on an OS-chosen loopback port and counts the HTTP requests it serves, so a test
can check how many requests an operation costs. While it runs, AWS_* variables point at dummy credentials,
instance-metadata lookups are off and loopback bypasses any proxy: no request leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
_UNSET = (
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


@dataclass
class S3Server:
    """A running server: its endpoint, a fresh bucket, s3fs options, and the requests it has served."""

    endpoint_url: str
    bucket: str
    requests: list[tuple[str, str]] = field(default_factory=list)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def url(self, key: str = "") -> str:
        """s3://<bucket>/<key>"""
        return f"s3://{self.bucket}/{key}"

    def seed(self, objects: dict[str, bytes]) -> None:
        """Create objects (key -> content) quickly: straight into moto's in-process backend, which the
        server serves from (an HTTP PUT costs ~12 ms here), falling back to PUTs if moto's layout changed."""
        try:
            from moto.s3.models import s3_backends

            backend = s3_backends["123456789012"]["aws"]
            for key, data in objects.items():
                backend.put_object(self.bucket, key, data)
        except (ImportError, KeyError, AttributeError, TypeError):
            client = self.boto3_client()
            for key, data in objects.items():
                client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def boto3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args: Any) -> None:  # one stderr line per request drowns test output
        pass


class _CountingMotoServer(ThreadedMotoServer):
    """ThreadedMotoServer whose WSGI app records (method, path?query) of every request."""

    def __init__(self, log: list[tuple[str, str]]):
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self._log = log
        self._lock = threading.Lock()

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def counting_app(environ: dict[str, Any], start_response: Any) -> Any:
            query = environ.get("QUERY_STRING", "")
            with self._lock:
                self._log.append(
                    (environ["REQUEST_METHOD"], environ["PATH_INFO"] + (f"?{query}" if query else ""))
                )

            def one_server_header(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
                # moto sets "Server: AmazonS3" and werkzeug adds its own; aiohttp >= 3.14 (s3fs's HTTP
                # client) rejects a response with two Server headers ("Duplicate 'Server' header found").
                headers = [(k, v) for k, v in headers if k.lower() != "server"]
                return start_response(status, headers, *exc_info)

            return app(environ, one_server_header)

        self._server = make_server(
            self._ip_address, self._port, counting_app, True, request_handler=_QuietHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()


@contextlib.contextmanager
def _aws_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in (*_ENV, *_UNSET)}
    os.environ.update(_ENV)
    for k in _UNSET:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start moto's S3 server on 127.0.0.1 (free port), create a bucket, yield, reset moto and stop it."""
    with _aws_env():
        log: list[tuple[str, str]] = []
        server = _CountingMotoServer(log)
        server.start()
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1", host
        s3 = S3Server(
            endpoint_url=f"http://127.0.0.1:{port}", bucket=f"vqpipe-{uuid.uuid4().hex[:12]}", requests=log
        )
        try:
            s3.boto3_client().create_bucket(Bucket=s3.bucket)
            yield s3
        finally:
            # moto keeps state per process, shared by every server in it: drop this server's bucket only (a
            # global /moto-api/reset would wipe the buckets of the session-wide server too).
            with contextlib.suppress(Exception):
                _drop_bucket(s3)
            server.stop()


def _drop_bucket(s3: S3Server) -> None:
    client = s3.boto3_client()
    for upload in client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=s3.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket):
        if page.get("Contents"):  # one request per page of 1000 (one per object took seconds at session end)
            objects = [{"Key": obj["Key"]} for obj in page["Contents"]]
            client.delete_objects(Bucket=s3.bucket, Delete={"Objects": objects, "Quiet": True})
    client.delete_bucket(Bucket=s3.bucket)
