"""The driver's tail loop: cost of one speculation check as the number of finished shards grows.

Before: the median shard time was `sorted(durations)[n // 2]` on every loop once the queue was empty, O(n log n)
per loop. Now `dispatch_policy.RunningMedian` keeps it: O(log n) per finished shard, O(1) per read. Prints the
seconds per loop of each and their ratio, measured in this run.

    python benchmarks/dispatch_tail.py [--shards 1000 100000 1000000]
"""

from __future__ import annotations

import argparse
import random
import time

from vqpipe.dispatch_policy import DispatchPolicy, Running


def per_loop(fn, loops: int) -> float:
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t0) / loops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    p.add_argument("--running", type=int, default=64, help="shards in flight (replicas x in-flight)")
    args = p.parse_args()
    rng = random.Random(0)
    print(f"{'finished shards':>16} {'sort per loop':>14} {'policy per loop':>16} {'ratio':>8}")
    for n in args.shards:
        durations = [rng.lognormvariate(4, 0.5) for _ in range(n)]
        policy = DispatchPolicy(max_attempts=3, retry_backoff_s=2.0)
        for d in durations:
            policy.durations.add(d)
        running = [Running(f"r-{i}", i, 0.0) for i in range(args.running)]
        loops = max(3, min(1000, 10_000_000 // n))
        old = per_loop(lambda d=durations: sorted(d)[len(d) // 2], loops)
        new = per_loop(lambda p=policy, r=running: p.to_speculate(r, True, now=1.0), loops)
        print(f"{n:>16} {old * 1e3:>12.3f}ms {new * 1e3:>14.3f}ms {old / new:>7.0f}x")


if __name__ == "__main__":
    main()
