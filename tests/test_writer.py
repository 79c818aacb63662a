"""vqpipe.writer in-process on a local directory: rows and errors committed atomically, nothing on failure."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from vqpipe import schema
from vqpipe.writer import ShardWriter

LAYOUT = schema.TokenLayout((1, 2), 16, 4, True, "float32")


def writer(tmp_path, rows_per_group: int = 4) -> ShardWriter:
    sch = schema.data_schema(LAYOUT)
    return ShardWriter(
        str(tmp_path / "data" / "s.parquet"), str(tmp_path / "errors" / "s.parquet"), sch, rows_per_group
    )


def batch(keys: list[str]) -> tuple:
    n = len(keys)
    codes = np.arange(n * 5, dtype=np.uint16).reshape(n, 5) % 16
    var_input = np.ones((n, 4, 4), np.float32)
    return keys, list(range(n)), ["{}"] * n, codes, var_input


@pytest.mark.parametrize("per_write", [3, 5, 17])
def test_every_row_group_has_rows_per_group_rows_but_the_last(tmp_path, per_write):
    """Issue 22: --rows-per-group 8 gave groups of 10/11/11 (a group was whatever had piled up)."""
    with writer(tmp_path, rows_per_group=8) as w:
        for i in range(0, 35, per_write):
            w.write(*batch([f"k{j}" for j in range(i, min(35, i + per_write))]))
        w.commit()
    meta = pq.ParquetFile(tmp_path / "data" / "s.parquet").metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    assert sizes == [8, 8, 8, 8, 3]
    keys = pq.read_table(tmp_path / "data" / "s.parquet", columns=["key"])["key"].to_pylist()
    assert keys == [f"k{j}" for j in range(35)]  # in the order written


def test_rows_and_errors_are_committed_in_row_groups(tmp_path):
    with writer(tmp_path, rows_per_group=4) as w:
        for i in range(5):
            w.write(*batch([f"k{i}a", f"k{i}b"]))
        w.add_error("bad", "decode_error", "not an image")
        sizes = w.commit()
    data = pq.ParquetFile(tmp_path / "data" / "s.parquet")
    assert data.metadata.num_rows == 10 == w.rows
    assert data.metadata.num_row_groups == 3  # 4 + 4 + 2: memory bounded by the group size
    assert sizes["data_bytes"] == (tmp_path / "data" / "s.parquet").stat().st_size
    errors = pq.read_table(tmp_path / "errors" / "s.parquet").to_pylist()
    assert errors == [{"key": "bad", "reason": "decode_error", "detail": "not an image", "key_raw": None}]


def test_an_exception_leaves_nothing_under_the_final_names(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), writer(tmp_path) as w:
        w.write(*batch(["a", "b", "c", "d", "e"]))  # a row group already flushed
        raise RuntimeError("boom")
    assert not (tmp_path / "data" / "s.parquet").exists()
    assert not (tmp_path / "errors").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == []  # no temporary left either


def test_a_row_arrow_refuses_becomes_that_samples_error(tmp_path):
    keys, labels, metas, codes, var_input = batch(["a", "b", "c"])
    labels[1] = "not a label"  # pyarrow refuses this value in the int64 column
    with writer(tmp_path) as w:
        w.write(keys, labels, metas, codes, var_input)
        w.commit()
    rows = pq.read_table(tmp_path / "data" / "s.parquet").column("key").to_pylist()
    assert rows == ["a", "c"]
    [error] = pq.read_table(tmp_path / "errors" / "s.parquet").to_pylist()
    assert error["key"] == "b" and error["reason"] == "sample_error" and "row not writable" in error["detail"]


def test_keys_that_are_not_utf8_keep_their_bytes(tmp_path):
    raw = b"caf\xe9"
    key = raw.decode("utf-8", "surrogateescape")  # as tarfile hands it over
    with writer(tmp_path) as w:
        w.add_error(key, "bad_key", "member name is not UTF-8")
        w.commit()
    [error] = pq.read_table(tmp_path / "errors" / "s.parquet").to_pylist()
    assert error["key"] == "caf\\xe9" and error["key_raw"] == raw
