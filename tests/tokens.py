"""Test helper: small vqpipe OUTs written with vqpipe's own schema, writer and ledger, no Ray and no images.

Codes are random (seeded) and `var_input` is the tiny model's `idxBl_to_var_input` of them, so a test can check
rows against what the model computes. `legacy=True` writes format 1.0 (`var_input` as `arrow.fixed_shape_tensor`).
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vqpipe import storage
from vqpipe.ledger import Ledger
from vqpipe.model import PRESETS, build_model
from vqpipe.schema import ERROR_SCHEMA, TokenLayout, data_schema, file_metadata
from vqpipe.writer import ShardWriter

TINY = PRESETS["tiny"]


def layout(var_input: bool = True) -> TokenLayout:
    return TokenLayout(TINY.patch_nums, TINY.vocab_size, TINY.z_channels, var_input, "float16")


def shard_rows(shard_id: str, n: int, seed: int, labeled: bool = True, var_input: bool = True):
    """keys, labels, metas, codes (n, 30) uint16, var_input (n, 29, 8) float16 of one synthetic shard."""
    rng = np.random.default_rng(seed)
    keys = [f"{shard_id}/{i:05d}" for i in range(n)]
    labels = (
        [int(x) if labeled and x % 5 else None for x in rng.integers(0, 1000, n)] if labeled else [None] * n
    )
    metas = [json.dumps({"i": i}) for i in range(n)]
    codes = rng.integers(0, TINY.vocab_size, (n, TINY.seq_len)).astype(np.uint16)
    vi = None
    if var_input:
        vi = var_input_of(codes).astype(np.float16) if n else np.zeros((0, 29, 8), np.float16)
    return keys, labels, metas, codes, vi


def var_input_of(codes: np.ndarray) -> np.ndarray:
    model = _model()
    t = torch.from_numpy(codes.astype(np.int64))
    offs = TINY.scale_offsets
    with torch.no_grad():
        return model.idxBl_to_var_input([t[:, a:b] for a, b in zip(offs[:-1], offs[1:])]).numpy()


_MODEL = []


def _model():
    if not _MODEL:
        _MODEL.append(build_model("tiny", seed=0))
    return _MODEL[0]


def write_out(
    out: Path | str,
    rows: dict[str, int],
    *,
    rows_per_group: int = 8,
    batch: int = 4,
    var_input: bool = True,
    labeled: bool = True,
    legacy: bool = False,
    uncommitted: dict[str, int] | None = None,
    storage_options: dict | None = None,
    views: tuple[str, ...] | None = None,
) -> dict[str, dict]:
    """An OUT with one committed shard per entry of `rows` (id -> row count), and for `uncommitted` what a kill
    while writing the data file leaves (its error file and a temporary in data/). Returns key -> {"label", "codes", "var_input"} of the committed rows.

    `views` (a `--views` run): `rows` counts images, each written as one row per view (a `view` column, the
    markers' `images` and `views`, `batch` rows per write as the job's crop batches), and the result is keyed by
    (key, view)."""
    ledger = Ledger(str(out), storage_options)
    ledger.start_run({"fingerprint": "test", "output_settings": {"var_input": var_input}}, allow_change=False)
    lay = layout(var_input)
    expected = {}
    n_views = len(views) if views else 1
    for seed, (shard_id, images) in enumerate([*rows.items(), *(uncommitted or {}).items()]):
        n = images * n_views
        keys, labels, metas, codes, vi = shard_rows(shard_id, n, seed, labeled, var_input)
        names = None
        if views:  # an image's rows share key, label and meta; codes differ per view
            keys, labels, metas = ([col[i - i % n_views] for i in range(n)] for col in (keys, labels, metas))
            names = [views[i % n_views] for i in range(n)]
        meta = file_metadata(
            lay,
            resolution=64,
            preset="tiny",
            model_sha256="test",
            precision={"mode": "exact"},
            shard={"id": shard_id, "url": f"/in/{shard_id}.tar"},
            batch_size=batch,
            vqpipe_version="test",
            **({"views": views} if views else {}),
        )
        schema = data_schema(lay, meta, view_column=bool(views))
        if legacy:
            schema = _legacy_schema(schema, lay)
        writer = ShardWriter(
            ledger.data_url(shard_id), ledger.errors_url(shard_id), schema, rows_per_group, storage_options
        )
        marker = {"shard_id": shard_id, "rows": n, "samples": images, "errors": 0}
        marker.update({"images": images, "views": list(views)} if views else {})
        if (
            shard_id not in rows
        ):  # killed while writing its data file: its error file and a temporary are left
            buf = io.BytesIO()
            pq.write_table(ERROR_SCHEMA.empty_table(), buf)
            storage.write_bytes_atomic(ledger.errors_url(shard_id), buf.getvalue(), storage_options)
            tmp = storage.join(ledger.layout.data_dir, f".tmp-{shard_id}.parquet.4242-0123456789ab")
            storage.write_bytes_atomic(tmp, b"PAR1 half a data file", storage_options)
            continue
        with writer:
            for s in range(0, n, batch):
                sl = slice(s, s + batch)
                if legacy:
                    writer._pending.append(
                        _legacy_table(schema, keys[sl], labels[sl], metas[sl], codes[sl], vi[sl])
                    )
                    writer._pending_rows += len(keys[sl])
                    writer.rows += len(keys[sl])
                    if writer._pending_rows >= rows_per_group:
                        writer._flush()
                else:
                    one = None if vi is None else vi[sl]
                    writer.write(keys[sl], labels[sl], metas[sl], codes[sl], one, names and names[sl])
            sizes = writer.commit(marker)
        ledger.mark_done(shard_id, {**marker, **sizes})
        for i, k in enumerate(keys):
            expected[(k, names[i]) if names else k] = {
                "label": labels[i],
                "codes": codes[i],
                "var_input": None if vi is None else vi[i],
                "meta": metas[i],
            }
    return expected


def _legacy_schema(schema: pa.Schema, lay: TokenLayout) -> pa.Schema:
    meta = json.loads(schema.metadata[b"vqpipe"])
    meta["format_version"] = "1.0"
    i = schema.get_field_index("var_input")
    tensor = pa.fixed_shape_tensor(pa.float16(), lay.var_input_shape)
    schema = schema.set(i, pa.field("var_input", tensor, nullable=False))
    return schema.with_metadata({b"vqpipe": json.dumps(meta).encode()})


def _legacy_table(schema, keys, labels, metas, codes, vi) -> pa.Table:
    cols = [
        pa.array(keys, pa.string()),
        pa.array(labels, pa.int64()),
        pa.array(metas, pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1), pa.uint16()), codes.shape[1]),
        pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(vi)),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


__all__ = ["TINY", "replace", "shard_rows", "var_input_of", "write_out"]


def assert_split_like_distributed_sampler(
    seen: Counter, expected: Collection, world: int, drop_last: bool
) -> None:
    """What `world` ranks read together in one epoch (`seen`: item -> times) is what DistributedSampler gives:
    with drop_last every item at most once and fewer than `world` left out; without, every item, padded by
    repeats up to a multiple of `world`."""
    n = len(expected)
    if drop_last:
        assert max(seen.values()) == 1 and n - len(seen) < world
    else:
        assert set(seen) == set(expected) and sum(seen.values()) == world * -(-n // world)
