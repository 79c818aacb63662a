"""The numbers of `vqpipe inspect`'s stats.json: codebook usage per scale, summaries of per-sample quality, and
seconds per stage from the done markers. Plain numpy over plain records."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from .records import DoneRecord


def usage_stats(counts: list[np.ndarray], patch_nums: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per scale: codes used (of the vocabulary), entropy of the code distribution in bits, and perplexity."""
    out = []
    for k, (pn, c) in enumerate(zip(patch_nums, counts)):
        total = int(c.sum())
        p = c[c > 0] / max(total, 1)
        entropy = max(0.0, float(-(p * np.log2(p)).sum()))  # max: -0.0 when one code is used
        out.append(
            {
                "scale": k + 1,
                "patch_num": pn,
                "positions": total,
                "used": int((c > 0).sum()),
                "used_fraction": float((c > 0).mean()),
                "entropy_bits": entropy,
                "perplexity": float(2**entropy),
            }
        )
    return out


def summary_of(values: Sequence[float | None]) -> dict[str, float] | None:
    """mean, p5, p50, p95 of finite values, Nones skipped (None when there are none)."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return None
    p5, p50, p95 = np.percentile(v, [5, 50, 95])
    return {"mean": float(v.mean()), "p5": float(p5), "p50": float(p50), "p95": float(p95), "n": int(len(v))}


def stage_stats(markers: dict[str, DoneRecord]) -> dict[str, Any]:
    """Seconds per stage (summed over shards and threads), images per stage-second, and per shard."""
    seconds: Counter = Counter()
    rows = sum(rec.rows for rec in markers.values())
    for rec in markers.values():
        seconds.update(rec.seconds)
    wall = sum(rec.wall_seconds for rec in markers.values())
    return {
        "rows": rows,
        "seconds": dict(sorted(seconds.items())),
        "wall_seconds": wall,
        "images_per_stage_second": {s: rows / v for s, v in sorted(seconds.items()) if v > 0},
        "images_per_shard_wall_second": rows / wall if wall > 0 else None,
        "per_shard": {
            i: {
                "rows": rec.rows,
                "wall_seconds": rec.wall_seconds,
                "seconds": rec.seconds,
            }
            for i, rec in sorted(markers.items())
        },
    }
