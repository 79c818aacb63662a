"""vqpipe as a Ray Data / Ray Train citizen (docs/ray.md): `Tokenize`, the job's exact tokenizer as a callable class
for `Dataset.map_batches`, and `read_tokens`, the committed rows of an OUT as a `ray.data.Dataset`.

`Tokenize` takes the batches of `ray.data.read_webdataset(urls, decoder=None)` (raw member bytes) and runs the
job's own per-sample code on them: `reader.sample_of` (the reader's member rules and reasons), the exact PIL
preprocessing of `preprocess.preprocess_views`, and the replica's `encode.Encoder`. What it gives up against the
job (one shard = one commit, resume, per-shard accounting, the lease) is in docs/ray.md. Ray is imported here and
in the job's distribution layer only. Somewhat over 300 lines: both directions of the Ray side live in this one
module so that Ray Data and Ray Train users import one place (a package split comes with the layout rework).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.util.torch_utils import convert_ndarray_to_torch_tensor

from .config import MAX_IMAGE_PIXELS, build_config
from .data.rows import RowBlock, to_block
from .data.shards import open_source, row_segments
from .encode import build_encoder
from .errors import SampleError, StorageError
from .manifest import Source
from .out.snapshot import Snapshot
from .preprocess import IMAGE_EXTENSIONS, preprocess_views
from .reader import META_EXTENSIONS, RawSample, sample_of
from .schema import TokenLayout, data_schema, nested_list_array
from .views import DEFAULT_VIEWS

logger = logging.getLogger(__name__)

# The members Tokenize reads; each must reach it as the bytes stored in the tar.
_READ_MEMBERS = frozenset((*IMAGE_EXTENSIONS, "cls", *META_EXTENSIONS))
# build_config wants inputs and an output; a Tokenize has neither (Ray reads, the pipeline writes).
_NO_PATH = "<ray data pipeline>"
_RAW_ONLY = (
    "vqpipe.raydata.Tokenize takes raw member bytes: read the shards with "
    "ray.data.read_webdataset(urls, decoder=None). Ray's decoders (decoder=True, and decoder=False too) open "
    ".jpg/.png with PIL without VAR's convert('RGB') (a palette image keeps its indices, CMYK its four "
    "channels), re-type .cls/.json, and abort the whole read on one truncated image"
)


class Tokenize:
    """`ds.map_batches(Tokenize, fn_constructor_kwargs={...}, compute=ActorPoolStrategy(size=N), num_gpus=1, ...)`.

    One model per actor, built in `__init__` on the GPU Ray assigned (the runtime context's accelerator ids), else on the CPU. The
    settings are the job's (`vqpipe tokenize` flags, validated by the same config code): `model` is the preset.
    Each call returns a `pyarrow.Table` with one row per sample (one per sample and view with `views`), in input
    order: `key`, `view` (with views), `label`, `meta`, `codes` and `var_input` typed exactly as the job's data
    files, and `error`/`error_detail`: null, or the job's reason (`truncated`, `not_an_image`, `missing_image`, …)
    and its detail, with null codes. A bad sample never raises; a batch that is not raw bytes does.
    """

    def __init__(
        self,
        model: str = "var256",
        checkpoint: str | None = None,
        *,
        random_weights: bool = False,
        precision: str = "exact",
        channels_last: bool = False,
        compile: bool = False,
        var_input: bool = True,
        var_input_dtype: str = "float16",
        views: Sequence[str] = DEFAULT_VIEWS,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        decode_threads: int = 0,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        # The GPUs Ray assigned to this actor (CUDA_VISIBLE_DEVICES is then Ray's choice); none in a driver or
        # without Ray (ray.get_gpu_ids() would assert in a driver process).
        gpu = ray.is_initialized() and bool(ray.get_runtime_context().get_accelerator_ids().get("GPU"))
        cfg = build_config(
            {
                "inputs": [_NO_PATH],
                "output": _NO_PATH,
                "model": {
                    "preset": model,
                    "checkpoint": checkpoint,
                    "random_weights": random_weights,
                    "precision": precision,
                    "channels_last": channels_last,
                    "compile": compile,
                    "device": "cuda" if gpu else "cpu",
                },
                "encode": {
                    "var_input": var_input,
                    "var_input_dtype": var_input_dtype,
                    "views": list(views),
                    "max_image_pixels": max_image_pixels,
                    "decode_threads": decode_threads,
                },
                "storage_options": storage_options or {},
            }
        )
        self.encoder, self.model_sha256, self.resolution = build_encoder(cfg)
        self.views, self.max_image_pixels = cfg.encode.views, cfg.encode.max_image_pixels
        self.schema = output_schema(self.encoder.layout, view_column=self.views != DEFAULT_VIEWS)
        self._logged = False
        # As the job's replica: a batch's images decode in parallel (PIL releases the GIL), one thread per CPU
        # Ray gave the actor unless decode_threads says.
        threads = cfg.encode.decode_threads or _assigned_cpus()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="decode") if threads > 1 else None

    def __call__(self, batch: Any) -> pa.Table:
        columns = _columns(batch)
        if "__key__" not in columns:
            raise ValueError(f"{_RAW_ONLY} (the batch has no __key__ column: {sorted(columns)})")
        keys = columns.pop("__key__")
        members = {name: values for name, values in columns.items() if not name.startswith("__")}
        work = [(key, _members_of(members, i, key)) for i, key in enumerate(keys)]
        done = list(self._pool.map(self._one, work) if self._pool is not None else map(self._one, work))
        crops = [c for _, c in done if isinstance(c, np.ndarray)]
        codes = var_input = None
        if crops:  # the job's encoder call on the job's uint8 crops: (N·V, 3, R, R) -> codes, var_input
            codes, var_input = self.encoder(np.concatenate(crops))
        return self._table(done, codes, var_input)

    def _one(self, item: tuple[str, list[tuple[str, bytes]]]) -> tuple[RawSample, np.ndarray | SampleError]:
        """One sample's crops (V, 3, R, R), or its error: nothing one sample holds raises."""
        key, members = item
        sample = RawSample(key)
        try:
            sample = sample_of(key, members)
            if sample.error is not None:
                return sample, sample.error
            assert sample.image is not None  # sample_of gives an image or an error
            return sample, preprocess_views(sample.image, self.resolution, self.views, self.max_image_pixels)
        except SampleError as e:
            return sample, e
        except Exception as e:  # noqa: BLE001 - as the job's decode stage: a bug shows in the log, not as a crash
            if not self._logged:
                self._logged = True
                logger.exception("key %r: unexpected error decoding", key)
            return sample, SampleError("sample_error", f"{type(e).__name__}: {e}"[:300])

    def _table(
        self,
        done: list[tuple[RawSample, np.ndarray | SampleError]],
        codes: np.ndarray | None,
        var_input: np.ndarray | None,
    ) -> pa.Table:
        rows: list[tuple[RawSample, str | None, SampleError | None]] = []
        for sample, result in done:
            if isinstance(result, SampleError):
                rows.append((sample, None, result))
            else:
                rows += [(sample, view, None) for view in self.views]
        valid = np.array([error is None for _, _, error in rows], dtype=bool)
        layout = self.encoder.layout
        arrays = [pa.array([s.key for s, _, _ in rows], pa.string())]
        if "view" in self.schema.names:
            arrays.append(pa.array([v for _, v, _ in rows], pa.string()))
        arrays += [
            pa.array([s.label for s, _, _ in rows], pa.int64()),
            pa.array([s.meta for s, _, _ in rows], pa.string()),
            _masked(codes, (layout.seq_len,), layout.code_dtype, valid, self.schema.field("codes").type),
        ]
        if layout.var_input:
            dtype = np.dtype(layout.var_input_dtype)
            vi_type = self.schema.field("var_input").type
            arrays.append(_masked(var_input, layout.var_input_shape, dtype, valid, vi_type))
        arrays += [
            pa.array([e.reason if e else None for _, _, e in rows], pa.string()),
            pa.array([e.detail if e else None for _, _, e in rows], pa.string()),
        ]
        return pa.Table.from_arrays(arrays, schema=self.schema)


def _assigned_cpus() -> int:
    """The CPUs Ray reserved for this actor (1 outside Ray, and in a driver, which has no reservation)."""
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return 1
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def output_schema(layout: TokenLayout, view_column: bool) -> pa.Schema:
    """Tokenize's rows: the job's data schema (same codes and var_input types), nullable for error rows, plus
    `error` and `error_detail`."""
    fields = [f if f.name == "key" else f.with_nullable(True) for f in data_schema(layout, None, view_column)]
    return pa.schema([*fields, pa.field("error", pa.string()), pa.field("error_detail", pa.string())])


def _masked(
    values: np.ndarray | None,
    shape: tuple[int, ...],
    dtype: np.dtype,
    valid: np.ndarray,
    list_type: pa.DataType,
) -> pa.Array:
    """Rows of `values` where `valid`, null elsewhere, as the job's nested fixed-size lists."""
    full = np.zeros((len(valid), *shape), dtype=dtype)
    if values is not None:
        full[valid] = values
    values = nested_list_array(full, list_type).values.cast(list_type.value_type)  # the schema's field names
    return pa.FixedSizeListArray.from_arrays(values, type=list_type, mask=pa.array(~valid))


def _columns(batch: Any) -> dict[str, list[Any]]:
    """A batch in any of Ray's formats (numpy dict, pandas, pyarrow) as column -> Python values."""
    if isinstance(batch, pa.Table):
        return {name: batch.column(name).to_pylist() for name in batch.column_names}
    if isinstance(batch, dict):
        return {name: np.asarray(values, dtype=object).tolist() for name, values in batch.items()}
    import pandas as pd

    if isinstance(batch, pd.DataFrame):
        return {str(name): batch[name].tolist() for name in batch.columns}
    raise TypeError(f"{_RAW_ONLY} (got a batch of type {type(batch).__name__})")


def _members_of(columns: dict[str, list[Any]], i: int, key: str) -> list[tuple[str, bytes]]:
    """Sample i's members: the columns holding bytes for it (absent members are None or NaN in Ray's batches)."""
    members = []
    for name, values in columns.items():
        value = values[i]
        if isinstance(value, bytes | bytearray | memoryview):
            members.append((name, bytes(value)))
        elif name.lower() in _READ_MEMBERS and not (
            value is None or (isinstance(value, float) and math.isnan(value))
        ):
            raise TypeError(f"{_RAW_ONLY} (sample {key!r}: .{name} is a {type(value).__name__})")
    return members


# -- the training side --------------------------------------------------------------------------------------------

_FIELDS = {"key": "keys", "label": "labels", "codes": "codes", "var_input": "var_input", "meta": "metas"}


def read_tokens(
    out: str,
    columns: Sequence[str] = ("key", "label", "codes"),
    storage_options: dict[str, Any] | None = None,
    *,
    label_fill: int = -1,
) -> ray.data.Dataset:
    """The committed rows of OUT, each exactly once, as a Dataset: `codes` int64 (L,), `var_input` (L - pn0², Cvae)
    as stored, `label` int64 (null -> `label_fill`, VAR's "no class" is then up to the trainer), `key`/`meta` strings,
    any other column the files have. Every row of an OUT written with views (one per view). Strings break Ray's
    default torch collate: `iter_torch_batches(collate_fn=TokenCollate())`, or leave key and meta out."""
    columns = tuple(dict.fromkeys(columns))
    sources = [s for s in _committed_sources(out, storage_options) if s.rows]
    if not sources:
        raise StorageError(f"{out}: no committed rows (no done shard with rows; is it a vqpipe OUT?)")
    _close(*open_source(sources[0], storage_options, columns))  # a wrong column fails here, not in a task
    read = functools.partial(
        _read, sources=sources, columns=columns, storage_options=storage_options, label_fill=label_fill
    )
    reader = ray.data.from_items([{"source": i} for i in range(len(sources))])
    # One source per call, which yields a block per row group: memory is a row group, whatever the file's size.
    return reader.map_batches(read, batch_size=1, batch_format="numpy")


def _committed_sources(out: str, storage_options: dict[str, Any] | None) -> list[Source]:
    """Which files (and row ranges) hold OUT's committed rows: the OUT's one owner of that answer."""
    return Snapshot.open(out, storage_options).sources()


def _read(
    batch: dict[str, np.ndarray],
    sources: list[Source],
    columns: tuple[str, ...],
    storage_options: dict[str, Any] | None,
    label_fill: int,
) -> Iterator[dict[str, np.ndarray]]:
    for index in batch["source"]:
        src = sources[int(index)]
        file, stream = open_source(src, storage_options, columns)
        try:
            meta = file.metadata
            group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            for g, lo, hi in row_segments(group_rows, src.ranges):
                table = file.read_row_group(g, columns=list(columns)).slice(lo, hi - lo)
                yield _arrays(to_block(table, label_fill), columns)
        finally:
            _close(file, stream)


def _close(*files: Any) -> None:
    for f in files:
        if f is not None:
            f.close()


def _arrays(block: RowBlock, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    out = {}
    for name in columns:
        values = getattr(block, _FIELDS[name]) if name in _FIELDS else block.extra[name]
        out[name] = values.astype(np.int64) if name == "codes" else values
    return out


class TokenCollate(NumpyBatchCollateFn):
    """`iter_torch_batches(collate_fn=TokenCollate())` over `read_tokens`: numbers as tensors (codes int64 (B, L),
    var_input (B, L - pn0², Cvae), label (B,)), strings (key, meta) as lists, which Ray's default collate refuses.
    The batch is then not moved to Ray Train's device: `vqpipe.data.var_batch(batch, device=...)` does that."""

    # Ray annotates the return as a bare TypeVar (CollatedData), which no concrete type matches.
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:  # type: ignore[override]
        out: dict[str, torch.Tensor | list[Any]] = {}
        for name, values in batch.items():
            strings = values.dtype.kind in "OUS"  # Ray gives str columns as object or numpy str arrays
            out[name] = values.tolist() if strings else convert_ndarray_to_torch_tensor(values)
        return out
