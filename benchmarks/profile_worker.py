"""Profile one replica without Ray: ShardWorker in this process, over a grid of thread settings.

    python benchmarks/profile_worker.py                       # small256, 128 images in 4 shards
    python benchmarks/profile_worker.py --grid 2,2,2 1,1,1    # torch threads, decode threads, shards in flight

Each setting runs the real per-shard pipeline (reader thread, decode pool, batched encode, writer thread) on the
same generated shards; shards in flight > 1 runs that many shards at once on one worker, as an actor does with
`run.in_flight_per_replica`. Prints images/s and the per-stage milliseconds per image from the done records (decode summed over threads).
With several shards in flight a shard's `encode` also counts the time it waits for the other shard's batch.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from vqpipe import storage
from vqpipe.config import build_config
from vqpipe.ledger import Ledger
from vqpipe.plan import make_plan
from vqpipe.sample import write_sample_dataset
from vqpipe.worker import ShardWorker

STAGES = ("read", "decode", "wait_input", "encode", "write")


def run_one(
    args: argparse.Namespace, shards: Path, out: Path, torch_threads: int, decode: int, flight: int
) -> str:
    torch.set_num_threads(torch_threads)
    cfg = build_config(
        {
            "inputs": [str(shards)],
            "output": str(out),
            "model": {"preset": args.preset, "random_weights": True, "device": args.device},
            "encode": {"batch_size": args.batch_size, "decode_threads": decode},
        }
    )
    worker = ShardWorker.from_config(cfg, slots=flight)
    try:
        todo = make_plan(
            storage.expand_inputs_with_info([str(shards)], None), Ledger(str(out)), None, False
        ).todo
        t = time.perf_counter()
        with ThreadPoolExecutor(flight) as pool:
            records = list(pool.map(worker.process, todo))
        wall = time.perf_counter() - t
    finally:
        worker.close()
    n = sum(r.rows for r in records)
    ms = {s: sum(r.seconds.get(s, 0.0) for r in records) * 1000 / n for s in STAGES}
    cells = " | ".join(f"{ms[s]:.1f}" for s in STAGES)
    return f"| {torch_threads} | {decode} | {flight} | {n / wall:.2f} | {cells} |"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small256")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grid", nargs="*", default=["2,2,2", "2,2,1", "2,1,1", "1,1,1", "1,1,2"])
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vqpipe-profile-"))
    try:
        shards = work / "shards"
        write_sample_dataset(shards, args.shards, args.images // args.shards, seed=1)
        print("| torch threads | decode threads | shards in flight | images/s | " + " | ".join(STAGES) + " |")
        print("|---:|---:|---:|---:|" + "---:|" * len(STAGES))
        for i, spec in enumerate(args.grid):
            torch_threads, decode, flight = (int(x) for x in spec.split(","))
            print(run_one(args, shards, work / f"out{i}", torch_threads, decode, flight), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
