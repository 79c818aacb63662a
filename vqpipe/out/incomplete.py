"""`data/INCOMPLETE-run-vqpipe-compact.parquet`: present while rows are being moved between files of data/ (a
compaction, a migration) or while some rows are in two of them (shards tokenized again after compaction, until
the next compaction rewrites their old file). A reader of the directory that knows nothing of vqpipe — pyarrow,
pandas, Polars, DuckDB, Ray Data, Hugging Face `datasets` — fails on it loudly, naming it, instead of reading a
row twice or not at all; vqpipe's own readers follow the manifest and ignore it. Not Parquet: plain text that
says what to do."""

from __future__ import annotations

import logging
from typing import Any

from .. import storage
from .layout import Layout

logger = logging.getLogger(__name__)

_TEXT = """This file is not Parquet, on purpose: vqpipe is moving rows between the files of this directory, or
an earlier move was interrupted ({why}). Until it is finished a reader of the directory could read a row twice
or miss it, so every such reader fails here instead. To finish: `vqpipe compact OUT` (it removes this file).
vqpipe's own readers (vqpipe.data.TokenDataset, vqpipe.raydata.read_tokens, vqpipe inspect) read every committed
row exactly once meanwhile. See docs/format.md.
"""


def mark_incomplete(layout: Layout, storage_options: dict[str, Any] | None, why: str) -> None:
    """Put the file in place (before the first file of a move changes). Only while holding OUT's lease."""
    storage.write_bytes_atomic(layout.incomplete_url, _TEXT.format(why=why).encode(), storage_options)
    logger.info("%s: readers of data/ fail until this is finished (%s)", storage.redact(layout.output), why)


def clear_incomplete(layout: Layout, storage_options: dict[str, Any] | None) -> None:
    """Remove the file (after the last file of a move changed). Only while holding OUT's lease."""
    storage.remove(layout.incomplete_url, storage_options)
