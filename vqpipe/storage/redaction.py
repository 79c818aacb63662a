"""Credentials never reach a message: `redact` masks anything that looks like one in text, and
`public_storage_options` makes storage options safe to write into run.json. Pure text (no fsspec), so any
module may use it."""

from __future__ import annotations

import re
from typing import Any

from ..errors import StorageError

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
    r"(?:[\w.-]*(?:" + "|".join(_SECRET_WORDS) + r")[\w.-]*|(?:" + "|".join(_SECRET_SHORT) + r")\b)"
)
_REDACTIONS = (
    (re.compile(r"(?i)\bbearer\s+[\w.~+/-]+=*"), "Bearer ***"),
    # name=value, name: value, 'name': 'value', "name": "value" (query strings, dict reprs, JSON, configs);
    # a quoted value is masked up to its closing quote.
    (
        re.compile(
            r"""(?i)(["']?\b""" + _SECRET_NAME + r"""["']?\s*[=:]\s*)(["']?)(?(2)[^"'\n]*|[^\s"'&,;)}\]]+)"""
        ),
        r"\1\2***",
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


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"
