"""`storage.redact` masks the secret value and nothing else: property tests over names, quoting styles and the
text around them (Hypothesis, derandomized: the same examples in every CI run)."""

from __future__ import annotations

import re
import string

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vqpipe.storage import redact

# Names whose values are secrets, as they appear in query strings, dict reprs, JSON, configs and connection
# strings.
SECRET_NAMES = [
    "key",
    "secret",
    "token",
    "password",
    "passwd",
    "pwd",
    "sig",
    "aws_secret_access_key",
    "aws_session_token",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "X-Amz-Credential",
    "AccountKey",
    "client_secret",
    "private_key_id",
]
# What secret values are made of: base64 and URL-safe base64, percent-encoding, JWT dots.
SECRET_CHARS = string.ascii_letters + string.digits + "/+=_.~-%"
# The text around them: no quotes (they end a quoted value), no "@" or "://" (user:password@ URLs).
TEXT_CHARS = string.ascii_letters + string.digits + " .,;:=()[]{}!?#-_/\n"
# A bare value ends at whitespace or at one of these.
DELIMITERS = [" ", "\n", "&", ",", ";", ")", "}", "]"]
_LOOKS_SECRET = re.compile(
    r"secret|token|passw|pwd|key|sig|credential|auth|session|private|sas|pass|connection_string|bearer"
    r"|A[A-Z0-9]{3}[A-Z0-9]{16}",
    re.IGNORECASE,
)

secrets = st.text(SECRET_CHARS, min_size=8, max_size=40)
plain = st.text(TEXT_CHARS, max_size=40).filter(lambda t: not _LOOKS_SECRET.search(t))


@st.composite
def secret_in_text(draw: st.DrawFn) -> tuple[str, str, str, str]:
    """(text, the secret in it, the text before the secret's name, the text after its value)."""
    name = draw(st.sampled_from(SECRET_NAMES))
    name = draw(st.sampled_from([name, name.upper(), name.lower()]))
    secret = draw(secrets)
    # The name is a word of its own (short names such as `sig` match only whole: `design: 3` is no secret).
    before = draw(
        st.just("") | st.builds(str.__add__, plain, st.sampled_from([" ", "?", "&", "{", "(", "\n", ", "]))
    )
    style = draw(st.sampled_from(["bare=", "bare: ", "single", "double", "json"]))
    if style.startswith("bare"):
        middle = f"{name}{style[4:]}{secret}"
        after = draw(st.sampled_from(DELIMITERS)) + draw(plain)
    else:
        quote = "'" if style == "single" else '"'
        secret = draw(st.sampled_from([secret, f"{secret} {draw(secrets)}"]))  # quoted values may hold spaces
        middle = f"{quote}{name}{quote}: {quote}{secret}{quote}" if style != "json" else f'{name}="{secret}"'
        after = draw(plain)
    assume(not any(part in before + after for part in secret.split(" ")))
    return before + middle + after, secret, before, after


@settings(max_examples=120, derandomize=True, deadline=None)
@given(secret_in_text())
def test_a_secret_never_survives_and_the_text_around_it_does(case: tuple[str, str, str, str]) -> None:
    text, secret, before, after = case
    out = redact(text)
    assert secret not in out
    for part in secret.split(" "):
        assert part not in out
    assert out.startswith(before) and out.endswith(after), (text, out)
    assert "***" in out


@settings(max_examples=120, derandomize=True, deadline=None)
@given(plain)
def test_text_without_a_secret_is_left_as_it_is(text: str) -> None:
    assert redact(text) == text


def test_an_error_keeps_its_reason_and_the_next_key() -> None:
    """The value of an unquoted `name=value` used to swallow everything up to the next quote."""
    assert (
        redact("errors {'bad_key': 2, 'unresolved_link': 1}") == "errors {'bad_key': 2, 'unresolved_link': 1}"
    )
    assert redact("{'key': 1, 'reason': 'unresolved_link'}") == "{'key': ***, 'reason': 'unresolved_link'}"
    presigned = (
        "https://b.s3.amazonaws.com/k.tar?X-Amz-Signature=0a1b2c3d&X-Amz-Expires=3600: 403 Forbidden "
        "(Request has expired)"
    )
    assert redact(presigned) == (
        "https://b.s3.amazonaws.com/k.tar?X-Amz-Signature=***&X-Amz-Expires=3600: 403 Forbidden "
        "(Request has expired)"
    )
