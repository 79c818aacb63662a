"""Training-side read speed, measured in one run on one machine (docs/training.md has the results).

Builds an OUT with vqpipe's own schema, writer and ledger (var256 layout: 680 codes, var_input 679x32 float16;
random values, no model run), then measures in this one process:
  - a plain pyarrow read of the same files (read_table -> int64 codes, labels with nulls filled): the baseline;
  - vqpipe.data.TokenDataset through one DataLoader process (num_workers=0), shuffled, as single items collated
    by the DataLoader and as ready batches (TokenDataset(batch_size=...), DataLoader(batch_size=None));
  both for codes only and with var_input;
  - VarInputBuilder rows/s (var256 quantizer, CPU);
  - the candidate var_input layouts (format 1.0's fixed_shape_tensor, 1.1's nested lists, one flat list):
    pyarrow and Polars read -> (N, 679, 32) numpy, and file size.

    python benchmarks/bench_reader.py [--shards 8 --rows 2048 --vi-rows 512 --batch 256 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from timing import interleaved
from torch.utils.data import DataLoader

from vqpipe.data import TokenDataset, VarInputBuilder, fixed_list_to_numpy
from vqpipe.ledger import Ledger
from vqpipe.model import PRESETS
from vqpipe.schema import TokenLayout, data_schema, file_metadata
from vqpipe.writer import ShardWriter

P = PRESETS["var256"]


def write_out(out: Path, shards: int, rows: int, var_input: bool, rows_per_group: int = 512) -> list[str]:
    ledger = Ledger(str(out))
    ledger.start_run({"fingerprint": "bench", "output_settings": {}}, allow_change=False)
    layout = TokenLayout(P.patch_nums, P.vocab_size, P.z_channels, var_input, "float16")
    rng = np.random.default_rng(0)
    meta = dict(resolution=256, preset="var256", model_sha256="bench", precision={}, batch_size=16)
    for s in range(shards):
        sid = f"part-{s:06d}"
        schema = data_schema(layout, file_metadata(layout, shard={"id": sid}, vqpipe_version="bench", **meta))
        with ShardWriter(ledger.data_url(sid), ledger.errors_url(sid), schema, rows_per_group) as w:
            for b in range(0, rows, 64):
                n = min(64, rows - b)
                codes = rng.integers(0, P.vocab_size, (n, P.seq_len)).astype(np.uint16)
                vi = (
                    rng.standard_normal((n, *layout.var_input_shape)).astype(np.float16)
                    if var_input
                    else None
                )
                labels = [int(x) if x % 7 else None for x in rng.integers(0, 1000, n)]
                w.write([f"{sid}/{b + i:06d}" for i in range(n)], labels, [None] * n, codes, vi)
            w.commit()
        ledger.mark_done(sid, {"rows": rows, "samples": rows, "errors": 0})
    return [ledger.data_url(f"part-{s:06d}") for s in range(shards)]


def pyarrow_read(files: list[str], columns: list[str]) -> int:
    n = 0
    for f in files:
        t = pq.read_table(f, columns=["key", *columns])
        codes = torch.from_numpy(fixed_list_to_numpy(t["codes"]).astype(np.int64))
        labels = torch.from_numpy(t["label"].fill_null(-1).to_numpy().copy())
        keys = t["key"].to_pylist()
        if "var_input" in columns:
            torch.from_numpy(fixed_list_to_numpy(t["var_input"]))
        n += len(keys) + 0 * int(codes[0, 0]) + 0 * int(labels[0])
    return n


def loader_read(out: str, columns: tuple[str, ...], batch: int, batched: bool) -> int:
    if batched:
        ds = TokenDataset(out, columns=columns, batch_size=batch)
        loader = DataLoader(ds, batch_size=None)
    else:
        loader = DataLoader(TokenDataset(out, columns=columns), batch_size=batch)
    return sum(len(b["key"]) for b in loader)


def layouts(tmp: Path, rows: int, repeats: int) -> list[tuple[str, float, float, float]]:
    import polars as pl

    rng = np.random.default_rng(1)
    vi = rng.standard_normal((rows, 679, 32)).astype(np.float16)
    flat = pa.array(vi.reshape(-1))
    arrays = {
        "1.0 fixed_shape_tensor": pa.FixedShapeTensorArray.from_numpy_ndarray(vi),
        "1.1 nested fixed_size_list": pa.FixedSizeListArray.from_arrays(
            pa.FixedSizeListArray.from_arrays(flat, 32), 679
        ),
        "flat fixed_size_list[21728]": pa.FixedSizeListArray.from_arrays(flat, 679 * 32),
    }
    runs, sizes = {}, {}
    for i, (name, arr) in enumerate(arrays.items()):
        path = tmp / f"layout-{i}.parquet"
        # The writer's settings for var_input (vqpipe/writer.py): zstd, no statistics, no dictionary.
        pq.write_table(
            pa.table({"var_input": arr}),
            path,
            compression="zstd",
            row_group_size=512,
            write_statistics=False,
            use_dictionary=False,
        )
        sizes[name] = path.stat().st_size / rows / 1024
        runs[f"pyarrow {name}"] = lambda p=path: len(fixed_list_to_numpy(pq.read_table(p)["var_input"]))
        runs[f"polars {name}"] = lambda p=path: len(
            pl.read_parquet(p)["var_input"].to_numpy().reshape(rows, 679, 32)
        )
    rates = {name: rows / s for name, s in interleaved(runs, rows, repeats).items()}
    return [(name, rates[f"pyarrow {name}"], rates[f"polars {name}"], sizes[name]) for name in arrays]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=2048, help="rows per shard, codes-only OUT")
    ap.add_argument("--vi-rows", type=int, default=512, help="rows per shard of the OUT with var_input")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--builder-rows", type=int, default=512)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, var_input, rows in (
            ("codes only", False, args.rows),
            ("with var_input", True, args.vi_rows),
        ):
            out = tmp / label.replace(" ", "_")
            files = write_out(out, args.shards, rows, var_input)
            cols = ("codes", "label", "var_input") if var_input else ("codes", "label")
            n = args.shards * rows
            runs = {
                "pyarrow": lambda f=files, c=cols: pyarrow_read(f, list(c)),
                "items": lambda o=out, c=cols: loader_read(str(o), c, args.batch, False),
                "batches": lambda o=out, c=cols: loader_read(str(o), c, args.batch, True),
            }
            rates = {name: n / s for name, s in interleaved(runs, n, args.repeats).items()}
            results.append((label, n, rates["pyarrow"], rates["items"], rates["batches"]))
        layout_rows = layouts(tmp, args.vi_rows, args.repeats)
    builder = VarInputBuilder("var256")
    codes = torch.randint(0, P.vocab_size, (args.builder_rows, P.seq_len))
    builder(codes[:64])  # warm-up
    t = time.perf_counter()
    for i in range(0, args.builder_rows, 64):
        builder(codes[i : i + 64])
    builder_rps = args.builder_rows / (time.perf_counter() - t)

    print(
        f"# bench_reader: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), pyarrow {pa.__version__}; batch {args.batch}, "
        f"best of {args.repeats}\n"
    )
    print(
        "| read, samples/s (one process) | rows | plain pyarrow | TokenDataset items | TokenDataset batches | items / pyarrow | batches / pyarrow |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, n, base, items, batches in results:
        print(
            f"| {label} | {n} | {base:,.0f} | {items:,.0f} | {batches:,.0f} | {items / base:.2f}x | {batches / base:.2f}x |"
        )
    print(f"\nVarInputBuilder (var256, CPU, batches of 64): {builder_rps:,.0f} rows/s")
    print(f"load average during the run (1/5/15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| var_input layout | pyarrow -> numpy, rows/s | Polars -> numpy, rows/s | KiB per row (zstd) |")
    print("|---|---:|---:|---:|")
    for name, r_pa, r_pl, kib in layout_rows:
        print(f"| {name} | {r_pa:,.0f} | {r_pl:,.0f} | {kib:.1f} |")


if __name__ == "__main__":
    main()
