"""One replica per encoder mode on one device, without Ray: encoder-only vs end-to-end images/s and agreement.

    python benchmarks/gpu_check.py --preset var256 --device cuda --images 1024 --shards 8 --batch-size 64
    python benchmarks/gpu_check.py --modes exact bf16+channels_last --decode pil device --out gpu.json

Made for a short lease on a GPU machine that has torch but not Ray: it needs only what the actor needs (vqpipe's
worker, webdataset, pyarrow, fsspec). For each (mode, decoder): the encoder alone on pre-decoded batches (the
ceiling), then `ShardWorker` - the code each Ray actor runs - over every shard with two shards in flight and one
decode thread per CPU, as an actor with every CPU would. Agreement with `exact` (per scale) comes from the done
records: each shard measures it on its first batch. bench.py is the full comparison (Ray Data, naive loop,
memory); this script answers "does the device wait for the pipeline, and what does each mode cost in codes?".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench import encoder_only  # noqa: E402 - benchmarks/ is sys.path[0] when run as a script

from vqpipe import storage
from vqpipe.config import build_config
from vqpipe.ledger import Ledger
from vqpipe.plan import make_plan
from vqpipe.sample import write_sample_dataset
from vqpipe.worker import ShardWorker


def config(args: argparse.Namespace, shards: Path, out: Path, mode: str, decode: str) -> Any:
    precision, *flags = mode.split("+")
    model = {"preset": args.preset, "precision": precision, "device": args.device}
    model.update({"channels_last": "channels_last" in flags, "compile": "compile" in flags})
    model.update({"checkpoint": args.checkpoint} if args.checkpoint else {"random_weights": True})
    return build_config(
        {
            "inputs": [str(shards)],
            "output": str(out),
            "model": model,
            "encode": {"batch_size": args.batch_size, "decode": decode, "decode_threads": args.cpus},
        }
    )


def measure(args: argparse.Namespace, shards: Path, out: Path, mode: str, decode: str) -> dict[str, Any]:
    cfg = config(args, shards, out, mode, decode)
    worker = ShardWorker.from_config(cfg)
    try:
        paths = sorted(str(p) for p in shards.glob("*.tar"))
        ceiling = encoder_only(worker.encoder, paths, worker.resolution, args.batch_size)  # also warms up
        todo = make_plan(
            storage.expand_inputs_with_info([str(shards)], None), Ledger(str(out)), None, False
        ).todo
        t = time.perf_counter()
        with ThreadPoolExecutor(cfg.run.in_flight_per_replica) as pool:
            records = [r.to_json() for r in pool.map(worker.process, todo)]
        wall = time.perf_counter() - t
    finally:
        worker.close()
    rows = sum(r["rows"] for r in records)
    agreements = [r["agreement_with_exact"] for r in records if r.get("agreement_with_exact")]
    stages = {
        s: round(sum(r["seconds"].get(s, 0.0) for r in records) * 1000 / rows, 3)
        for s in records[0]["seconds"]
    }
    result = {
        "mode": mode,
        "decode": decode,
        "encoder_only_images_per_s": ceiling["images_per_s"],
        "end_to_end_images_per_s": rows / wall,
        "ratio": rows / wall / ceiling["images_per_s"],
        "rows": rows,
        "errors": sum(r["errors"] for r in records),
        "stage_ms_per_image": stages,
    }
    if agreements:
        result["agreement_overall"] = float(np.mean([a["overall"] for a in agreements]))
        result["agreement_per_scale"] = (
            np.mean([a["per_scale"] for a in agreements], axis=0).round(4).tolist()
        )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="var256")
    p.add_argument("--checkpoint")
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)), help="decode threads")
    p.add_argument("--modes", nargs="+", default=["exact", "tf32", "bf16", "bf16+channels_last"])
    p.add_argument("--decode", nargs="+", default=["pil"], choices=("pil", "device"))
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vqpipe-gpu-check-"))
    results = []
    try:
        shards = work / "shards"
        write_sample_dataset(shards, args.shards, args.images // args.shards, seed=1)
        print(
            f"| mode | decode | encoder only img/s | end to end img/s | ratio | agreement | per scale ({args.preset}) |"
        )
        print("|---|---|---:|---:|---:|---:|---|")
        for i, (mode, decode) in enumerate((m, d) for m in args.modes for d in args.decode):
            r = measure(args, shards, work / f"out{i}", mode, decode)
            results.append(r)
            scales = " ".join(f"{x:.3f}" for x in r.get("agreement_per_scale", []))
            print(
                f"| {mode} | {decode} | {r['encoder_only_images_per_s']:.1f} | {r['end_to_end_images_per_s']:.1f} | "
                f"{r['ratio']:.2f} | {r.get('agreement_overall', 1.0):.4f} | {scales or 'exact'} |",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        meta = {"device": device, "torch": torch.__version__, "cpus": args.cpus, "args": vars(args)}
        Path(args.out).write_text(json.dumps({"machine": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
