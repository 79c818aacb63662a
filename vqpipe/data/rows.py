"""Arrow record batches of a vqpipe data file -> numpy columns, for every format version (1.0 and 1.1).

Format 1.0 stored `var_input` as the `arrow.fixed_shape_tensor` extension type, 1.1 as nested fixed-size lists;
both hold the same contiguous values, so either becomes one (N, L - pn0², Cvae) array without a per-row copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

COLUMNS = ("key", "label", "codes", "var_input", "meta")


@dataclass
class RowBlock:
    """Rows of one row group (or a slice of several) as numpy arrays; absent columns are None."""

    keys: np.ndarray | None  # (N,) object (str)
    labels: np.ndarray | None  # (N,) int64, nulls replaced by the fill value
    codes: np.ndarray | None  # (N, L) as stored (uint16 or int32)
    var_input: np.ndarray | None  # (N, L - pn0², Cvae) as stored (float16 or float32)
    metas: np.ndarray | None  # (N,) object (str or None)
    # Any other column asked for (e.g. `view`): numpy for fixed-size lists, else objects.
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        for col in (self.keys, self.labels, self.codes, self.var_input, self.metas):
            if col is not None:
                return len(col)
        return 0

    def take(self, index: np.ndarray | slice) -> RowBlock:
        def pick(col: np.ndarray | None) -> np.ndarray | None:
            return None if col is None else col[index]

        return RowBlock(
            keys=pick(self.keys),
            labels=pick(self.labels),
            codes=pick(self.codes),
            var_input=pick(self.var_input),
            metas=pick(self.metas),
            extra={k: v[index] for k, v in self.extra.items()},
        )

    @staticmethod
    def concat(blocks: list[RowBlock]) -> RowBlock:
        if len(blocks) == 1:
            return blocks[0]
        return RowBlock(
            keys=_concat([b.keys for b in blocks]),
            labels=_concat([b.labels for b in blocks]),
            codes=_concat([b.codes for b in blocks]),
            var_input=_concat([b.var_input for b in blocks]),
            metas=_concat([b.metas for b in blocks]),
            extra={k: np.concatenate([b.extra[k] for b in blocks]) for k in blocks[0].extra},
        )


def _concat(cols: list[np.ndarray | None]) -> np.ndarray | None:
    """One column of several blocks; blocks read with the same columns all have it or all lack it."""
    present = [c for c in cols if c is not None]
    if not present:
        return None
    if len(present) != len(cols):
        raise ValueError("cannot concatenate row blocks that were read with different columns")
    return np.concatenate(present)


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size list column (nested any depth) or a fixed_shape_tensor column -> (N, *shape) numpy."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr.type, pa.FixedShapeTensorType):
        return arr.to_numpy_ndarray()
    n = len(arr)
    shape = []
    while pa.types.is_fixed_size_list(arr.type):
        if arr.offset or arr.null_count:
            arr = pa.concat_arrays([arr])  # normalise a sliced array so that flatten() is the values
        shape.append(arr.type.list_size)
        arr = arr.flatten()
    if not shape:
        raise TypeError(f"expected a fixed-size list or tensor column, got {arr.type}")
    return arr.to_numpy(zero_copy_only=False).reshape(n, *shape)


def to_block(batch: pa.Table | pa.RecordBatch, label_fill: int) -> RowBlock:
    names = batch.schema.names

    def col(name: str):
        return batch.column(name) if name in names else None

    keys = col("key")
    labels = col("label")
    metas = col("meta")
    return RowBlock(
        keys=None if keys is None else np.asarray(keys.to_pylist(), dtype=object),
        labels=None if labels is None else _labels(labels, label_fill),
        codes=None if col("codes") is None else fixed_list_to_numpy(col("codes")),
        var_input=None if col("var_input") is None else fixed_list_to_numpy(col("var_input")),
        metas=None if metas is None else np.asarray(metas.to_pylist(), dtype=object),
        extra={name: _any_column(batch.column(name)) for name in names if name not in COLUMNS},
    )


def _any_column(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if pa.types.is_fixed_size_list(column.type) or isinstance(column.type, pa.FixedShapeTensorType):
        return fixed_list_to_numpy(column)
    values = np.empty(len(column), dtype=object)  # element-wise: a list of lists stays a list of lists
    values[:] = column.to_pylist()
    return values


def _labels(column: pa.ChunkedArray | pa.Array, fill: int) -> np.ndarray:
    # Unlabeled shards (no .cls) store nulls; numpy would make them NaN in a float array.
    return column.fill_null(fill).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
