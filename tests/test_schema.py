"""vqpipe.schema in-process: the token layout, the Arrow types, rows and file metadata (no Ray, no torch)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vqpipe import scales, schema
from vqpipe.config import FORMAT_VERSION

VAR256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def layout(var_input: bool = True, dtype: str = "float16", vocab: int = 4096) -> schema.TokenLayout:
    return schema.TokenLayout(VAR256, vocab, 32, var_input, dtype)


def test_layout_of_vars_schedule():
    lay = layout()
    assert lay.seq_len == 680  # VAR's L for 256 px
    assert lay.scale_offsets[:4] == [0, 1, 5, 14] and lay.scale_offsets[-1] == 680
    assert lay.var_input_shape == (679, 32)  # L minus the first scale, Cvae channels
    assert tuple(lay.scale_offsets) == scales.scale_offsets(VAR256)
    assert lay.code_dtype == np.uint16 and layout(vocab=70_000).code_dtype == np.int32


@pytest.mark.parametrize("var_input", [True, False])
def test_rows_round_trip_through_the_schema(var_input):
    lay = layout(var_input)
    sch = schema.data_schema(lay, metadata={"x": 1})
    assert sch.names == ["key", "label", "meta", "codes"] + (["var_input"] if var_input else [])
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4096, (3, 680)).astype(np.uint16)
    vi = rng.standard_normal((3, 679, 32)).astype(np.float16) if var_input else None
    table = schema.data_table(sch, ["a", "b", "c"], [1, None, 3], ["{}", None, ""], codes, vi)
    assert table.schema.equals(sch, check_metadata=True)
    assert table.column("key").to_pylist() == ["a", "b", "c"]
    assert table.column("label").to_pylist() == [1, None, 3]
    back = np.asarray(table.column("codes").combine_chunks().flatten()).reshape(3, 680)
    assert np.array_equal(back, codes)
    if var_input:
        vi_back = table.column("var_input").combine_chunks().flatten().flatten()
        assert np.array_equal(np.asarray(vi_back).reshape(3, 679, 32), vi)
        assert sch.field("var_input").type.value_type.list_size == 32


def test_file_metadata_round_trips_and_states_the_layout():
    lay = layout()
    meta = schema.file_metadata(
        lay,
        resolution=256,
        preset="var256",
        model_sha256="ab" * 32,
        precision={"name": "exact"},
        shard={"id": "part-000000"},
        batch_size=16,
        vqpipe_version="0",
    )
    sch = schema.data_schema(lay, meta)
    back = schema.read_metadata(sch)
    assert back == meta
    assert back["format_version"] == FORMAT_VERSION
    assert back["model"] == {"preset": "var256", "sha256": "ab" * 32}
    assert back["seq_len"] == 680 and back["var_input"] == {"shape": [679, 32], "dtype": "float16"}


def test_error_schema_keeps_raw_key_bytes():
    assert schema.ERROR_SCHEMA.field("key_raw").type == pa.binary()
    assert not schema.ERROR_SCHEMA.field("reason").nullable
