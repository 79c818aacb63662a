"""Credentials never reach a message: `redact` masks anything that looks like one in text, and
`public_storage_options` makes storage options safe to write into run.json. Pure text (no fsspec), so any
module may use it."""

from __future__ import annotations

import re
from typing import Any

from ..errors import StorageError, StorageNotFoundError
from .failures import describe

# Option and parameter names that hold credentials: any name containing one of the long words (client_secret,
# aws_secret_access_key, X-Amz-Security-Token, AccountKey, ...), or exactly one of the short ones.
_SECRET_WORDS = (
    "secret",
    "token",
    "password",
    "passwd",
    "key",
    "signature",
    "credential",
    "auth",
    "session",
    "private",
)
_SECRET_SHORT = ("sig", "pwd", "sas", "pass", "connection_string")
_SECRET_NAME = (
    r"(?![\w.-]*(?:error|exception|warning)\b)"  # "KeyError: 'x'" is an exception, not a key
    r"(?!(?:bad|duplicate)_key\b)"  # vqpipe's sample error reasons: `{'bad_key': 2}` counts samples
    r"(?:[\w.-]*(?:" + "|".join(_SECRET_WORDS) + r")[\w.-]*|(?:" + "|".join(_SECRET_SHORT) + r")\b)"
)
_REDACTIONS: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"(?i)\bbearer\s+[\w.~+/-]+=*"), "Bearer ***"),
    # name=value, name: value, 'name': 'value', "name": "value" (query strings, dict reprs, JSON, configs):
    # only the value is masked, a quoted one up to its closing quote, a bare one up to the first space or
    # separator, so that what follows (the reason of an error, the next key of a dict) stays readable. The
    # opening quote is an optional *group*, not an optional character in a group: a group that matched the
    # empty string counts as matched for `(?(2)...)`, which then masked a bare value up to the next quote.
    (
        re.compile(
            r"""(?i)(["']?\b""" + _SECRET_NAME + r"""["']?\s*[=:]\s*)(["'])?(?(2)[^"'\n]*|[^\s"'&,;)}\]]+)"""
        ),
        lambda m: f"{m[1]}{m[2] or ''}***",
    ),
    # user:password@ in URLs
    (re.compile(r"(://[^/\s:@]+):[^/\s@]+@"), r"\1:***@"),
    # AWS access key ids (long-term AKIA, temporary ASIA, and the other documented prefixes)
    (re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AGPA|ANPA|ANVA|AIPA|A3T[A-Z0-9])[A-Z0-9]{16}\b"), "***"),
)
_SECRET_OPTION = re.compile("|".join(_SECRET_WORDS + _SECRET_SHORT), re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with anything that looks like a credential replaced by `***` (keys, secrets, tokens, passwords,
    signatures in query strings or dict reprs, `user:pass@` in URLs, AWS access key ids)."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def public_storage_options(opts: dict[str, Any] | None) -> dict[str, Any]:
    """A JSON-safe copy of `opts` for run.json: secret-looking keys keep their name but not their value
    (`***`), other strings are redacted, objects become `<TypeName>`."""

    def clean(key: str | None, value: Any) -> Any:
        if key is not None and _SECRET_OPTION.search(key) and value is not None:
            return "***"
        if isinstance(value, dict):
            return {str(k): clean(str(k), v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(None, v) for v in value]
        if isinstance(value, str):
            return redact(value)
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return f"<{type(value).__name__}>"

    return clean(None, dict(opts or {}))


def _error(message: str) -> StorageError:
    return StorageError(redact(message))


def _not_found(url: str) -> StorageError:
    return StorageNotFoundError(redact(f"{url}: no such file"))


def _describe(e: BaseException) -> str:
    """What happened, in one line (failures.describe): `timed out: ReadTimeoutError: ...`."""
    return describe(e)
