"""Where the VAR golden fixtures come from.

The small ones are committed under tests/data/ (copied from ../shared/var/, see its README), so the exactness
tests run in every clone. The large ones live only in ../shared/var/ beside this team's checkouts: a test that
needs one skips without it on a user's machine, but fails under CI=true, where a missing fixture would
otherwise turn the headline guarantee into a silent skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
SHARED_VAR = Path(__file__).resolve().parents[2] / "shared" / "var"


def committed(name: str) -> Path:
    """A fixture committed under tests/data/."""
    path = DATA / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is part of the repository and missing")
    return path


def shared(name: str) -> Path:
    """A large fixture from ../shared/var/: skipped where absent, a failure under CI=true."""
    path = SHARED_VAR / name
    if not path.is_file():
        message = f"golden fixture not found at {path} (it lives in ../shared/var/ beside the repository)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + "; CI must run every exactness test", pytrace=False)
        pytest.skip(message)
    return path
