"""Format 1.1 as other tools read it, each with the recipe docs/training.md gives: pyarrow, Hugging Face
`datasets`, Polars, DuckDB and pandas (Ray Data: tests/test_job.py, on a Ray-made OUT). The OUT is written by
vqpipe's own writer, with labels that include nulls, and checked row by row against what was written."""

import numpy as np
import pytest
from tokens import write_out

ROWS = {"a": 11, "b": 0, "c": 6}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    return d, write_out(d, ROWS, rows_per_group=4)


def check(keys, labels, codes, var_input, expected):
    assert sorted(keys) == sorted(expected)
    for i, k in enumerate(keys):
        want = expected[k]
        assert labels[i] == (-1 if want["label"] is None else want["label"])
        assert np.array_equal(codes[i], want["codes"])
        assert var_input[i].shape == (29, 8)
        assert np.array_equal(np.asarray(var_input[i], dtype=np.float16), want["var_input"])
    assert any(expected[k]["label"] is None for k in keys)


def test_pyarrow(out):
    import pyarrow.parquet as pq

    d, expected = out
    t = pq.read_table(d / "data")
    n = t.num_rows
    codes = t["codes"].combine_chunks().flatten().to_numpy().reshape(n, -1).astype(np.int64)
    vi = t["var_input"].combine_chunks().flatten().flatten().to_numpy().reshape(n, 29, 8)
    labels = t["label"].fill_null(-1).to_numpy()
    check(t["key"].to_pylist(), labels, codes, vi, expected)


def test_hugging_face_datasets(out, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import torch

    d, expected = out
    ds = datasets.load_dataset(
        "parquet", data_files=str(d / "data" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    ds = ds.map(lambda b: {"label": [-1 if x is None else x for x in b["label"]]}, batched=True)
    ds = ds.with_format("torch", columns=["label", "codes", "var_input"], output_all_columns=True)
    b = ds[:]
    assert b["codes"].dtype == b["label"].dtype == torch.int64
    assert b["var_input"].shape == (len(ds), 29, 8)
    check(b["key"], b["label"].numpy(), b["codes"].numpy(), b["var_input"].numpy(), expected)


def test_polars(out):
    import polars as pl

    d, expected = out
    df = pl.read_parquet(d / "data" / "*.parquet").with_columns(pl.col("label").fill_null(-1))
    assert df.schema["var_input"] == pl.Array(pl.Float16, (29, 8))
    vi = df["var_input"].to_numpy()
    assert vi.shape == (len(df), 29, 8)
    check(df["key"].to_list(), df["label"].to_numpy(), df["codes"].to_numpy(), vi, expected)


def test_duckdb(out):
    import duckdb

    d, expected = out
    rows = duckdb.sql(
        f"select key, coalesce(label, -1), codes, var_input from '{d}/data/*.parquet'"
    ).fetchall()
    keys, labels, codes, vi = zip(*rows)
    assert {len(v) for v in vi} == {29} and {len(r) for v in vi for r in v} == {8}  # 2-D, not 232 flat
    check(list(keys), labels, [np.array(c) for c in codes], [np.array(v) for v in vi], expected)


def test_pandas(out):
    import pandas as pd

    d, expected = out
    df = pd.read_parquet(d / "data")
    labels = df["label"].fillna(-1).astype("int64").to_numpy()
    codes = np.stack(df["codes"].to_numpy()).astype(np.int64)
    vi = np.stack([np.stack(v) for v in df["var_input"]])
    assert vi.shape == (len(df), 29, 8)
    check(df["key"].tolist(), labels, codes, vi, expected)
