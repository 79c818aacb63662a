"""S3 (s3fs, aiobotocore): every HTTP request ends by the current operation's deadline (`deadlines`).

aiohttp's read timeout (s3fs: `read_timeout`, 15 s) starts only once a request's body has been sent, and
botocore sends PUTs with `Expect: 100-continue`: against a store that reads the headers and never answers, the
body is never sent and the request waits for ever (`Lease.acquire` and data-file uploads hung so). This session
class, given to aiobotocore through its public `AioConfig(http_session_cls=...)` option (s3fs passes
`config_kwargs` to AioConfig), cuts each request off when the operation's deadline passes, and refuses new ones
after it: the client's own retries then end at once too (the error is not one botocore or s3fs retries).

Imported only for s3:// URLs: aiobotocore comes with the `s3` extra.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiobotocore.httpsession import AIOHTTPSession

from . import deadlines


class DeadlineSession(AIOHTTPSession):
    """aiobotocore's aiohttp session, each request bounded by the deadline of the vqpipe call that made it."""

    async def send(self, request: Any) -> Any:
        left = deadlines.remaining()
        if left is None:  # a call from outside vqpipe.storage: the client's own timeouts only
            return await super().send(request)
        if left <= 0:
            raise deadlines.DeadlineExceeded(deadlines.length() or 0.0)
        try:
            return await asyncio.wait_for(super().send(request), left)
        except asyncio.TimeoutError:
            if not deadlines.passed():  # the client's own timeout, not ours: let botocore retry it
                raise
            raise deadlines.DeadlineExceeded(deadlines.length() or 0.0) from None


def with_deadline_session(storage_options: dict[str, Any]) -> dict[str, Any]:
    """s3fs options whose client uses DeadlineSession (unless the options name a session class already).
    The config is copied a level deep: botocore rewrites a `retries` table in place, which changed the
    caller's options, and with them fsspec's cache key (a new client for the next call)."""
    config = {
        k: dict(v) if isinstance(v, dict) else v
        for k, v in (storage_options.get("config_kwargs") or {}).items()
    }
    config.setdefault("http_session_cls", DeadlineSession)
    return {**storage_options, "config_kwargs": config}
