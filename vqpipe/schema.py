"""The Parquet schema and file metadata of vqpipe's output (format documented in docs/format.md).

Plain Arrow types only, so pyarrow, Hugging Face `datasets`, Polars, DuckDB, pandas and Ray Data read the files
without vqpipe: `codes` is a fixed-size list and, since format 1.1, `var_input` a fixed-size list of fixed-size
lists (L - pn0² rows of Cvae values), which every one of them takes as a 2-D value per row. Format 1.0 stored
`var_input` as Arrow's `arrow.fixed_shape_tensor` extension, which `datasets` cannot open and Polars/DuckDB see
flat (CHANGELOG.md); `vqpipe.data` reads both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from . import scales
from .config import FORMAT_VERSION
from .views import DEFAULT_VIEWS

METADATA_KEY = b"vqpipe"

ERROR_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        # the key's exact bytes when the tar member name was not UTF-8 (reason bad_key); `key` is then the
        # bytes with invalid ones written as \xNN (docs/reliability.md, "Every member accounted")
        pa.field("key_raw", pa.binary()),
    ]
)


@dataclass(frozen=True)
class TokenLayout:
    """Everything about the shape of one row that follows from the tokenizer's configuration."""

    patch_nums: tuple[int, ...]
    vocab_size: int
    cvae: int
    var_input: bool
    var_input_dtype: str  # "float16" | "float32"

    @property
    def seq_len(self) -> int:
        return scales.seq_len(self.patch_nums)

    @property
    def scale_offsets(self) -> list[int]:
        """Start of each scale in `codes`, plus the end (VAR's gt_BL order)."""
        return list(scales.scale_offsets(self.patch_nums))

    @property
    def var_input_shape(self) -> tuple[int, int]:
        return (scales.var_input_len(self.patch_nums), self.cvae)

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.vocab_size <= 65536 else np.dtype(np.int32)


def data_schema(
    layout: TokenLayout, metadata: dict[str, Any] | None = None, view_column: bool = False
) -> pa.Schema:
    """`view_column`: rows are augmented views (`encode.views` other than `center` alone), named in `view`;
    (key, view) is then the unique row id. Default runs write no `view` column, so their files keep 1.0's schema."""
    code_type = pa.from_numpy_dtype(layout.code_dtype)
    cols = [pa.field("key", pa.string(), nullable=False)]
    if view_column:
        cols.append(pa.field("view", pa.string(), nullable=False))
    cols += [
        pa.field("label", pa.int64()),
        pa.field("meta", pa.string()),
        pa.field(
            "codes", pa.list_(pa.field("element", code_type, nullable=False), layout.seq_len), nullable=False
        ),
    ]
    if layout.var_input:
        cols.append(pa.field("var_input", var_input_type(layout), nullable=False))
    schema = pa.schema(cols)
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    return schema


def var_input_type(layout: TokenLayout) -> pa.DataType:
    """fixed_size_list<fixed_size_list<dtype>[Cvae]>[L - pn0²]: row-major, the shape in the type itself."""
    rows, cvae = layout.var_input_shape
    value = pa.field("element", pa.from_numpy_dtype(np.dtype(layout.var_input_dtype)), nullable=False)
    return pa.list_(pa.field("element", pa.list_(value, cvae), nullable=False), rows)


def nested_list_array(values: np.ndarray, list_type: pa.DataType) -> pa.Array:
    """A (B, d1, ..., dk) array as fixed-size lists nested k deep (zero-copy over the contiguous values)."""
    sizes = []
    t = list_type
    while pa.types.is_fixed_size_list(t):
        sizes.append(t.list_size)
        t = t.value_type
    arr = pa.array(np.ascontiguousarray(values).reshape(-1), t)
    for size in reversed(sizes):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    return arr


def data_table(
    schema: pa.Schema,
    keys: Sequence[str],
    labels: Sequence[int | None],
    metas: Sequence[str | None],
    codes: np.ndarray,
    var_input: np.ndarray | None,
    views: Sequence[str] | None = None,
) -> pa.Table:
    """One batch of rows; `codes` is (B, L) and `var_input` is (B, L - pn0², Cvae) already in the output dtype;
    `views` names each row's view when the schema has a `view` column."""
    columns = [pa.array(keys, pa.string())]
    if "view" in schema.names:
        columns.append(pa.array(views, pa.string()))
    columns += [
        pa.array(labels, pa.int64()),
        pa.array(metas, pa.string()),
        nested_list_array(codes, schema.field("codes").type),
    ]
    if "var_input" in schema.names:
        if var_input is None:
            raise ValueError("the schema has a var_input column but no var_input was given")
        columns.append(nested_list_array(var_input, schema.field("var_input").type))
    return pa.Table.from_arrays(columns, schema=schema)


def file_metadata(
    layout: TokenLayout,
    *,
    resolution: int,
    preset: str,
    model_sha256: str,
    precision: dict[str, Any],
    shard: dict[str, Any],
    batch_size: int,
    vqpipe_version: str,
    views: Sequence[str] = DEFAULT_VIEWS,
) -> dict[str, Any]:
    """The JSON stored under the `vqpipe` key of every data file's Parquet metadata."""
    mid = round(1.125 * resolution)
    crops = (
        [f"center crop {resolution} (torchvision offsets: int(round((size - crop) / 2)))"]
        if tuple(views) == DEFAULT_VIEWS
        else [
            f"views {', '.join(views)}: {resolution}x{resolution} crops of that one resize, one row each; "
            "center as CenterCrop (int(round((size - crop) / 2))), tl/tr/bl/br flush with those corners "
            "(torchvision FiveCrop); +hflip: that crop mirrored left-right (PIL FLIP_LEFT_RIGHT)"
        ]
    )
    return {
        "format_version": FORMAT_VERSION,
        "vqpipe_version": vqpipe_version,
        "model": {"preset": preset, "sha256": model_sha256},
        "patch_nums": list(layout.patch_nums),
        "scale_offsets": layout.scale_offsets,
        "seq_len": layout.seq_len,
        "vocab_size": layout.vocab_size,
        "cvae": layout.cvae,
        "resolution": resolution,
        "var_input": (
            {"shape": list(layout.var_input_shape), "dtype": layout.var_input_dtype}
            if layout.var_input
            else None
        ),
        "preprocessing": {
            "transform": "var_val" if tuple(views) == DEFAULT_VIEWS else "var_val_views",
            "steps": [
                "PIL Image.open(...).convert('RGB') (no EXIF transpose, alpha dropped)",
                f"resize shorter side to round(1.125*{resolution}) = {mid} with LANCZOS",
                *crops,
                "model input = uint8 / 255 * 2 - 1, float32 NCHW",
            ],
        },
        "views": list(views),
        "precision": precision,
        "batch_size": batch_size,
        "shard": shard,
    }


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The `vqpipe` metadata of a data file's schema (as read back by pyarrow)."""
    return json.loads((schema.metadata or {})[METADATA_KEY])
