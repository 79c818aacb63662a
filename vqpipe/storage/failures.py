"""What went wrong with a storage call, in a word and a line: timed out, connection lost, throttled, store
unavailable, not found, permission denied (or, for anything else, the error as it came).

Client libraries wrap and re-wrap their errors, and sometimes fail while handling one: s3fs 2026.9 reports a
body read that timed out as `IndexError: tuple index out of range` (it indexes the timeout's empty `args`), and
a throttled request as a plain `OSError` whose cause holds the store's code. So the chain of causes is searched
for the first error that says what happened. Client libraries are recognised by class names and response
codes, never imported: none of them is a dependency of this module.
"""

from __future__ import annotations

import enum
import http.client
from collections.abc import Iterator


class Failure(enum.Enum):
    """The kind of a storage failure; its value is the phrase messages use."""

    TIMEOUT = "timed out"
    CONNECTION = "connection lost"
    THROTTLED = "throttled by the store"
    UNAVAILABLE = "store unavailable"
    NOT_FOUND = "not found"
    PERMISSION = "permission denied"
    OTHER = "failed"


# Error codes of S3 (botocore's ClientError.response) and HTTP statuses (gcsfs's HttpError.code).
_CODES = {
    Failure.THROTTLED: {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
    },
    Failure.UNAVAILABLE: {"InternalError", "ServiceUnavailable", "BadGateway", "GatewayTimeout"},
    Failure.PERMISSION: {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"},
    Failure.NOT_FOUND: {"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound"},
}
_STATUSES = {429: Failure.THROTTLED, 401: Failure.PERMISSION, 403: Failure.PERMISSION, 404: Failure.NOT_FOUND}
# Class names (anywhere in an error's MRO) of dropped or refused connections in the stdlib, botocore, aiohttp
# and requests. Timeouts are any class whose name says "Timeout" (TimeoutError, botocore's ReadTimeoutError,
# aiohttp's ServerTimeoutError, requests' ReadTimeout, fsspec's FSTimeoutError).
_CONNECTION_NAMES = {
    "ConnectionError",
    "ClientConnectionError",
    "ClientPayloadError",
    "ChunkedEncodingError",
    "ConnectionClosedError",
    "IncompleteRead",
}


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = e
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _kind_of_one(e: BaseException) -> Failure:
    names = {cls.__name__ for cls in type(e).__mro__}
    if "DeadlineExceeded" in names or any("Timeout" in n for n in names):
        return Failure.TIMEOUT
    response = getattr(e, "response", None)
    code = (response.get("Error", {}).get("Code") if isinstance(response, dict) else None) or None
    status = getattr(e, "code", None)
    if isinstance(response, dict) and code is None:
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    for kind, codes in _CODES.items():
        if code in codes:
            return kind
    if isinstance(status, int) and not isinstance(status, bool):
        if status in _STATUSES:
            return _STATUSES[status]
        if 500 <= status < 600:
            return Failure.UNAVAILABLE
    if isinstance(e, FileNotFoundError):
        return Failure.NOT_FOUND
    if isinstance(e, PermissionError):
        return Failure.PERMISSION
    if isinstance(e, http.client.IncompleteRead) or names & _CONNECTION_NAMES:
        return Failure.CONNECTION
    return Failure.OTHER


def classify(e: BaseException) -> tuple[Failure, BaseException]:
    """The kind of failure `e` is, and the error in its chain of causes that says so (`e` itself if none
    does)."""
    for link in _chain(e):
        kind = _kind_of_one(link)
        if kind is not Failure.OTHER:
            return kind, link
    return Failure.OTHER, e


def describe(e: BaseException) -> str:
    """One line saying what happened: `timed out: ReadTimeoutError: Read timeout on endpoint URL ...`, or the
    error as it came (`ValueError: bad range`) when it is none of the kinds above."""
    kind, said_by = classify(e)
    text = " ".join(f"{type(said_by).__name__}: {said_by}".split()).rstrip(": ")
    return text if kind is Failure.OTHER else f"{kind.value}: {text}"
