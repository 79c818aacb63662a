"""Readers over many small shard files vs the same rows compacted (`vqpipe compact`), measured in one run.

Builds an OUT of N small shards with vqpipe's own schema, writer and ledger (var256 layout, codes only, random
values, no model run: 3 files per shard as a tokenize run leaves them), compacts it, then times alternately
(best of --repeats rounds, so that load from other processes hits both sides alike):
  - DuckDB `count(*)` over `data/*.parquet` before vs after compaction (the same glob: data/ holds every row);
  - DuckDB, a full scan of the codes column (sum of every code) over each;
  - pyarrow.dataset `count_rows()` over each;
  - one TokenDataset epoch (codes + label, shuffled, batches of 256, num_workers=0) before vs after compaction,
    with the dataset built inside the timing (the ledger index, the data/ listing and, compacted, the manifest) and
    without;
and prints each pair's ratio (docs/scale.md, "Compaction", has a run).

    python benchmarks/bench_compact.py [--shards 2000 --rows 4 --target-rows 65536 --repeats 3 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as pads
from timing import interleaved
from torch.utils.data import DataLoader

from vqpipe.compact import CompactOptions, compact
from vqpipe.data import TokenDataset
from vqpipe.ledger import Ledger
from vqpipe.model import PRESETS
from vqpipe.schema import TokenLayout, data_schema, file_metadata
from vqpipe.writer import ShardWriter

P = PRESETS["var256"]


def write_out(out: Path, shards: int, rows: int) -> None:
    ledger = Ledger(str(out))
    ledger.start_run({"fingerprint": "bench", "output_settings": {}}, allow_change=False)
    layout = TokenLayout(P.patch_nums, P.vocab_size, P.z_channels, False, "float16")
    rng = np.random.default_rng(0)
    meta = dict(resolution=256, preset="var256", model_sha256="bench", precision={}, batch_size=16)
    for s in range(shards):
        sid = f"shard-{s:07d}"
        schema = data_schema(layout, file_metadata(layout, shard={"id": sid}, vqpipe_version="bench", **meta))
        with ShardWriter(ledger.data_url(sid), ledger.errors_url(sid), schema, 512) as w:
            codes = rng.integers(0, P.vocab_size, (rows, P.seq_len)).astype(np.uint16)
            labels = [int(x) for x in rng.integers(0, 1000, rows)]
            w.write([f"{sid}/{i:04d}" for i in range(rows)], labels, [None] * rows, codes, None)
            record = {"shard_id": sid, "rows": rows, "samples": rows, "errors": 0, "started": time.time()}
            sizes = w.commit(record)
        ledger.mark_done(sid, {**record, **sizes})


def duckdb_count(glob: str) -> int:
    return duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()[0][0]


def duckdb_scan(glob: str) -> int:
    total, n = duckdb.sql(
        f"SELECT sum(list_sum(codes::INTEGER[])), count(*) FROM read_parquet('{glob}')"
    ).fetchall()[0]
    assert total > 0
    return n


def arrow_count(directory: str) -> int:
    return pads.dataset(directory, format="parquet").count_rows()


def dataset(out: str, batch: int) -> TokenDataset:
    return TokenDataset(out, columns=("codes", "label"), batch_size=batch, seed=0)


def epoch(ds: TokenDataset) -> int:
    return sum(len(b) for b in DataLoader(ds, batch_size=None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=4, help="rows per shard")
    ap.add_argument("--target-rows", type=int, default=65536, help="rows per compacted file")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="where to build the OUT (default: a temporary directory)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        before, after = Path(tmp) / "before", Path(tmp) / "after"
        t = time.perf_counter()
        write_out(before, args.shards, args.rows)
        build_s = time.perf_counter() - t
        shutil.copytree(before, after)  # the same shards; `after` is compacted (its data files replaced)
        t = time.perf_counter()
        res = compact(CompactOptions(str(after), target_rows=args.target_rows))
        compact_s = time.perf_counter() - t
        n = args.shards * args.rows
        ds_before, ds_after = dataset(str(before), args.batch), dataset(str(after), args.batch)
        pairs = {
            "DuckDB count(*)": (
                lambda: duckdb_count(f"{before}/data/*.parquet"),
                lambda: duckdb_count(f"{after}/data/*.parquet"),
            ),
            "DuckDB full codes scan": (
                lambda: duckdb_scan(f"{before}/data/*.parquet"),
                lambda: duckdb_scan(f"{after}/data/*.parquet"),
            ),
            "pyarrow.dataset count_rows": (
                lambda: arrow_count(f"{before}/data"),
                lambda: arrow_count(f"{after}/data"),
            ),
            "TokenDataset: build + epoch": (
                lambda: epoch(dataset(str(before), args.batch)),
                lambda: epoch(dataset(str(after), args.batch)),
            ),
            "TokenDataset: epoch of a built dataset": (lambda: epoch(ds_before), lambda: epoch(ds_after)),
        }
        best = interleaved(
            {
                f"{name}/{side}": fn
                for name, sides in pairs.items()
                for side, fn in zip(("before", "after"), sides)
            },
            n,
            args.repeats,
        )
        results = {name: (best[f"{name}/before"], best[f"{name}/after"]) for name in pairs}
    print(
        f"{args.shards} shards x {args.rows} rows (var256 codes only) built in {build_s:.1f}s; compacted into "
        f"{len(res.new_parts)} file(s) in {compact_s:.2f}s ({args.shards / compact_s:,.0f} shards/s); "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {platform.python_version()}"
    )
    print(
        f"\n| read ({n} rows) | {args.shards} shard files, s | {len(res.new_parts)} compacted, s | speed-up |"
    )
    print("|---|---:|---:|---:|")
    for name, (a, b) in results.items():
        print(f"| {name} | {a:.3f} | {b:.3f} | **{a / b:.1f}×** |")
    if args.json:
        out = {
            "shards": args.shards,
            "rows_per_shard": args.rows,
            "compacted_files": len(res.new_parts),
            "build_s": build_s,
            "compact_s": compact_s,
            "load": os.getloadavg()[0],
            "results": {
                k: {"many_files_s": a, "compacted_s": b, "ratio": a / b} for k, (a, b) in results.items()
            },
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
