"""The dataset card of an OUT: `OUT/.huggingface.yaml`, rewritten by every run and compaction.

Hugging Face `datasets` reads it (locally, and from a dataset repository on the Hub): its `configs` say the data
is `data/*.parquet`, so `load_dataset(OUT)` reads every committed row once and no bookkeeping file. A YAML file
whose name starts with "." rather than a `README.md`: pyarrow and pandas read OUT as a dataset only while every
file they see there is Parquet, and they skip names starting with "." or "_". Its comments and `vqpipe` block are
the human summary: model, checkpoint sha256, rows, format version, how to read it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import yaml

from .. import __version__, storage
from ..config import FORMAT_VERSION
from ..errors import StorageError
from .layout import DATA_DIR
from .snapshot import Snapshot

logger = logging.getLogger(__name__)

CARD_NAME = ".huggingface.yaml"


def render(snapshot: Snapshot, rows: int, shards: int, failed: int, errors: int) -> str:
    """The card's text for an OUT of `rows` committed rows in `shards` shards."""
    settings: dict[str, Any] = snapshot.run.output_settings if snapshot.run is not None else {}
    preset, sha = settings.get("preset"), settings.get("model_sha256")
    summary: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "vqpipe_version": __version__,
        "model": {"preset": preset, "sha256": sha},
        "precision": settings.get("precision"),
        "var_input": settings.get("var_input"),
        "views": settings.get("views", ["center"]),
        "rows": rows,
        "shards": shards,
        "failed_shards": failed,
        "sample_errors": errors,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    card = {
        "pretty_name": f"vqpipe tokens ({preset})",
        "tags": ["vqpipe", "var", "image-tokens"],
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/*.parquet"}]}
        ],
        "vqpipe": summary,
    }
    head = (
        f"# VAR multi-scale token indices made by vqpipe (format {FORMAT_VERSION}): one row per image and view.\n"
        f"# Model {preset}, checkpoint sha256 {sha}.\n"
        f"# {rows} committed rows from {shards} shards ({failed} shards failed, {errors} samples not encoded).\n"
        "# Read: datasets.load_dataset(OUT), pyarrow.dataset.dataset(OUT), pandas.read_parquet(OUT),\n"
        "#   duckdb 'OUT/data/*.parquet', vqpipe.data.TokenDataset(OUT), vqpipe.raydata.read_tokens(OUT).\n"
        "# Columns and metadata: docs/format.md of vqpipe. Rewritten by every vqpipe run and compaction.\n"
    )
    return head + yaml.safe_dump(card, sort_keys=False)


def write_quietly(snapshot: Snapshot, failed: int) -> None:
    """Write the card of this snapshot (`failed`: shards whose latest run failed) if it changed; a failure is a
    warning (the card is a convenience: the data and its bookkeeping are committed already)."""
    ids = snapshot.shard_ids
    totals = snapshot.committed.totals(ids)
    text = render(
        snapshot,
        rows=totals["rows"],
        shards=len(ids),
        failed=failed,
        errors=sum(totals["errors_by_reason"].values()),
    )
    url = storage.join(snapshot.output, CARD_NAME)
    try:
        got = storage.read_versioned(url, snapshot.ledger.storage_options)
        if got is not None and _without_date(got[0].decode("utf-8", "replace")) == _without_date(text):
            return
        storage.write_bytes_atomic(url, text.encode(), snapshot.ledger.storage_options)
    except StorageError as e:
        logger.warning("cannot write the dataset card %s (%s)", storage.redact(url), e)


def _without_date(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("written:"))
