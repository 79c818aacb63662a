"""Augmented views: images/s and rows/s of one replica with `encode.views` = crops10 (and others) beside center.

    python benchmarks/views_bench.py                                   # small256 on the CPU, 64 images
    python benchmarks/views_bench.py --preset var256 --device cuda --images 512 --views center crops10

Each setting runs the real per-shard pipeline of one replica (`ShardWorker` in this process, as an actor runs
it: reader thread, decode pool, batched encode, writer thread) on the same generated shards, with the same
model, batch size (crops per encoder call) and threads. Views multiply encoder work, not decode work: the table
shows images/s, rows/s, and decode milliseconds per image (one decode and one resize, then the crops) and encode
milliseconds per row from the done records. Settings run in interleaved rounds (`--repeat`), each keeping its
fastest, so a busy machine hurts them alike. The last column checks that the center-view rows of each setting
carry the same codes as the center-only run (bitwise results are defined per batch composition, SPEC §4, so a
mismatch on some device is possible, not an error).

A second table times preprocessing alone on one thread (best of `--repeat`, every sample image): the centre
crop, all views from one decode and resize (what the job does), and the same views decoded once per view (what
running the job once per view would cost). See docs/views.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from vqpipe import storage
from vqpipe.config import CPU_ALLOCATOR_ENV, build_config
from vqpipe.ledger import Ledger
from vqpipe.model import get_preset
from vqpipe.plan import make_plan
from vqpipe.preprocess import preprocess, preprocess_views
from vqpipe.reader import iter_samples
from vqpipe.sample import write_sample_dataset
from vqpipe.views import parse_views
from vqpipe.worker import ShardWorker


def run_one(args: argparse.Namespace, shards: Path, out: Path, views: str) -> dict:
    cfg = build_config(
        {
            "inputs": [str(shards)],
            "output": str(out),
            "model": {"preset": args.preset, "random_weights": True, "device": args.device},
            "encode": {"batch_size": args.batch_size, "decode_threads": args.threads, "views": views},
        }
    )
    worker = ShardWorker.from_config(cfg)
    try:
        # Untimed warm-up batch (allocator, kernels): the first batch would otherwise weigh more on settings
        # with fewer batches.
        side = worker.resolution
        worker.encoder(np.zeros((args.batch_size, 3, side, side), dtype=np.uint8))
        todo = make_plan(
            storage.expand_inputs_with_info([str(shards)], None), Ledger(str(out)), None, False
        ).todo
        t = time.perf_counter()
        records = [worker.process(shard) for shard in todo]
        wall = time.perf_counter() - t
    finally:
        worker.close()
    images, rows = sum(r["images"] for r in records), sum(r["rows"] for r in records)
    seconds = {s: sum(r["seconds"].get(s, 0.0) for r in records) for s in ("decode", "encode")}
    return {
        "views": views,
        "n_views": len(cfg.encode.views),
        "images": images,
        "rows": rows,
        "errors": sum(r["errors"] for r in records),
        "wall_s": round(wall, 3),
        "images_per_s": images / wall,
        "rows_per_s": rows / wall,
        "decode_ms_per_image": seconds["decode"] * 1000 / max(images, 1),
        "encode_ms_per_row": seconds["encode"] * 1000 / max(rows, 1),
        "center_codes": _center_codes(out),
    }


def _center_codes(out: Path) -> dict[str, bytes]:
    codes = {}
    for path in sorted((out / "data").glob("*.parquet")):
        table = pq.read_table(path)
        keys = table.column("key").to_pylist()
        views = table.column("view").to_pylist() if "view" in table.column_names else ["center"] * len(keys)
        flat = np.asarray(table.column("codes").combine_chunks().flatten()).reshape(table.num_rows, -1)
        codes.update({k: c.tobytes() for k, v, c in zip(keys, views, flat) if v == "center"})
    return codes


def preprocessing(args: argparse.Namespace, shards: Path) -> list[dict]:
    """ms per image on one thread: centre only, every view from one decode, and one decode per view."""
    images = []
    for path in sorted(shards.glob("*.tar")):
        with open(path, "rb") as f:
            images += [s.image for s in iter_samples(f, path.stem) if s.image is not None]
    resolution = get_preset(args.preset).resolution
    rows = []
    for setting in args.views:
        views = parse_views(setting)
        ways = {"one decode": lambda b, v=views: preprocess_views(b, resolution, v)}
        if len(views) > 1:
            ways["a decode per view"] = lambda b, v=views: [preprocess(b, resolution) for _ in v]
        for way, fn in ways.items():
            best = min(_timed(fn, images) for _ in range(args.repeat))
            rows.append({"views": setting, "way": way, "ms_per_image": best * 1000 / len(images)})
    return rows


def _timed(fn, images: list[bytes]) -> float:
    t = time.perf_counter()
    for data in images:
        fn(data)
    return time.perf_counter() - t


def report(results: list[dict], prep: list[dict], args: argparse.Namespace) -> str:
    base = results[0]
    lines = [
        f"preset {args.preset}, device {args.device}, batch {args.batch_size} crops, {args.threads} threads, "
        f"{base['images']} images",
        "",
        "| views | rows/image | images/s | rows/s | images/s vs center | rows/s vs center "
        "| decode ms/image | encode ms/row | center rows = center run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        same = sum(r["center_codes"].get(k) == c for k, c in base["center_codes"].items())
        lines.append(
            f"| {r['views']} | {r['n_views']} | {r['images_per_s']:.2f} | {r['rows_per_s']:.2f} "
            f"| {r['images_per_s'] / base['images_per_s']:.2f}x | {r['rows_per_s'] / base['rows_per_s']:.2f}x "
            f"| {r['decode_ms_per_image']:.1f} | {r['encode_ms_per_row']:.1f} "
            f"| {same}/{len(base['center_codes'])} |"
        )
    lines += ["", "| preprocessing, one thread | ms/image | vs center |", "|---|---:|---:|"]
    for r in prep:
        lines.append(
            f"| {r['views']}, {r['way']} | {r['ms_per_image']:.1f} | {r['ms_per_image'] / prep[0]['ms_per_image']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small256")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="crops per encoder call")
    p.add_argument("--threads", type=int, default=2, help="torch threads and decode threads")
    p.add_argument("--views", nargs="+", default=["center", "crops10"], help="settings to run; center first")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; each setting keeps its fastest")
    p.add_argument("--out", help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.views[0] != "center":
        p.error("--views: the first setting is the baseline and must be center")
    if args.device == "cpu" and any(os.environ.get(k) != v for k, v in CPU_ALLOCATOR_ENV.items()):
        # A CPU replica runs with these glibc settings (read at process start): start again with them.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CPU_ALLOCATOR_ENV})
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vqpipe-views-"))
    try:
        shards = work / "shards"
        write_sample_dataset(shards, args.shards, max(1, args.images // args.shards), seed=1)
        best: dict[str, dict] = {}
        for round_ in range(args.repeat):
            for i, v in enumerate(args.views):
                r = run_one(args, shards, work / f"out{round_}-{i}", v)
                if v not in best or r["images_per_s"] > best[v]["images_per_s"]:
                    best[v] = r
        results = [best[v] for v in args.views]
        prep = preprocessing(args, shards)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(results, prep, args))
    if args.out:
        public = [{k: v for k, v in r.items() if k != "center_codes"} for r in results]
        record = {"args": vars(args), "results": public, "preprocessing": prep, "load": os.getloadavg()}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
