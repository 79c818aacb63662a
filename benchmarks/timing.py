"""The timing loop the benchmarks share: best of several rounds, the measured runs alternating within a round.

On a shared machine, load from other processes comes in bursts; running every contender once per round and
keeping each one's fastest round lets a burst slow one round of all of them alike instead of one contender's
whole measurement. Each run returns how many rows it read, checked against what it should have read, so a
fast wrong answer is an error, not a result.

    from timing import interleaved   # benchmarks run as `python benchmarks/NAME.py`: this folder is on sys.path
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


def interleaved(runs: Mapping[str, Callable[[], int]], rows: int, repeats: int) -> dict[str, float]:
    """Best wall seconds of each run over `repeats` rounds, in the order of `runs` within each round; every
    call must return `rows`."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            got = fn()
            times[name].append(time.perf_counter() - start)
            if got != rows:
                raise RuntimeError(f"{name}: read {got} rows, expected {rows}")
    return {name: min(ts) for name, ts in times.items()}
