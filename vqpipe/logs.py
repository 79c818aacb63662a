"""Logging for entry points (CLI, Ray job, actors). The library itself configures nothing at import."""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s -- %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Ray-style log lines on stderr; level from the argument, VQPIPE_LOG_LEVEL, or INFO."""
    level = (level or os.environ.get("VQPIPE_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger("vqpipe")
    root.setLevel(level)
    if not any(getattr(h, "_vqpipe", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._vqpipe = True  # type: ignore[attr-defined]  # marks the handler this function added
        root.addHandler(handler)
