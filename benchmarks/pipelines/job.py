"""vqpipe's own job on a local Ray, and the memory runs (one shard of N images, then one of 10N)."""

from __future__ import annotations

import argparse
import glob
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from vqpipe.config import JobConfig, build_config

from .common import job_dict


def start_ray(cpus: int, cuda: bool) -> float:
    import ray

    t = time.perf_counter()
    ray.init(
        address="local",  # always a new private cluster, never one already running on this machine
        num_cpus=cpus,
        num_gpus=torch.cuda.device_count() if cuda else 0,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return time.perf_counter() - t


def vqpipe_job(cfg: JobConfig) -> dict[str, Any]:
    """The real job; images/s from its wall time and from the actors' own clocks (done markers)."""
    from vqpipe.job import tokenize

    t, started = time.perf_counter(), time.time()
    summary = tokenize(cfg)
    wall, ended = time.perf_counter() - t, time.time()
    if not summary.ok:
        raise RuntimeError(f"vqpipe job did not finish every shard: {summary.failed}")
    records = [
        json.loads(Path(p).read_text()) for p in sorted(glob.glob(f"{cfg.output}/_vqpipe/done/*.json"))
    ]
    images = sum(r["rows"] for r in records)
    first, last = min(r["started"] for r in records), max(r["started"] + r["wall_seconds"] for r in records)
    span = last - first
    stages = Counter()
    for r in records:
        stages.update(r["seconds"])
    return {
        "images": images,
        "errors": sum(r["errors"] for r in records),
        "seconds": wall,
        "images_per_s": images / wall,
        "actor_span_s": span,
        "before_first_shard_s": first - started,  # plan, actor process start, imports, model build
        "after_last_commit_s": ended - last,  # collect, kill actors, read the status
        "images_per_s_actor_span": images / span,
        "stage_seconds": dict(stages),
        "shard_wall_seconds": [r["wall_seconds"] for r in records],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in records),
        "pids": sorted({r["pid"] for r in records}),
    }


def memory(args: argparse.Namespace, shards: dict[str, list[str]], work: Path) -> dict[str, Any]:
    """One shard of N images, then one of 10N: each tokenize call starts (and kills) its own actor."""
    runs = {}
    for name in ("mem_small", "mem_large"):
        cfg = build_config(job_dict(args, shards[name], work / f"out_{name}"))
        runs[name] = vqpipe_job(cfg)
    small, large = runs["mem_small"], runs["mem_large"]
    if set(small["pids"]) & set(large["pids"]):
        raise RuntimeError("the memory runs shared an actor process; peak RSS would carry over")
    return {
        "n_small": small["images"],
        "n_large": large["images"],
        "peak_rss_small": small["peak_rss_bytes"],
        "peak_rss_large": large["peak_rss_bytes"],
        "ratio": large["peak_rss_bytes"] / small["peak_rss_bytes"],
    }
