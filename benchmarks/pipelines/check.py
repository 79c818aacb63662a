"""Every pipeline's output read back and compared row by row with the reference (codes and var_input)."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vqpipe.data import fixed_list_to_numpy


def read_outputs(directory: Path) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """key -> (codes, var_input) from every Parquet file under `directory` (vqpipe's or Ray Data's types)."""
    import ray.data  # noqa: F401 - registers Ray's tensor extension types for its files

    rows = {}
    for path in sorted(glob.glob(f"{directory}/**/*.parquet", recursive=True)):
        table = pq.read_table(path)
        if "codes" not in table.column_names:
            continue  # vqpipe's errors/ files
        keys = table.column("key").to_pylist()
        codes = _to_numpy(table.column("codes"), len(keys))
        vi = _to_numpy(table.column("var_input"), len(keys)) if "var_input" in table.column_names else None
        rows.update({k: (codes[i], None if vi is None else vi[i]) for i, k in enumerate(keys)})
    return rows


def _to_numpy(column: pa.ChunkedArray, n: int) -> np.ndarray:
    arr = column.combine_chunks()
    if isinstance(arr.type, pa.FixedShapeTensorType) or pa.types.is_fixed_size_list(arr.type):
        return fixed_list_to_numpy(arr)  # vqpipe's codes and var_input, format 1.0 or 1.1
    return np.asarray(arr.to_numpy())  # Ray's ArrowTensorArray


def compare(reference: dict, other: dict) -> dict[str, Any]:
    keys = sorted(reference)
    same_keys = set(reference) == set(other)
    codes = sum(np.array_equal(reference[k][0], other[k][0]) for k in keys if k in other)
    vi = sum(
        reference[k][1] is not None and np.array_equal(reference[k][1], other[k][1])
        for k in keys
        if k in other
    )
    return {"rows": len(other), "same_keys": same_keys, "codes_equal": int(codes), "var_input_equal": int(vi)}
