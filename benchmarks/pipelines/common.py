"""What every pipeline shares: the job settings from the command line, the machine's description, the shards."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vqpipe.config import CPU_ALLOCATOR_ENV, EncodeConfig
from vqpipe.encode import Encoder
from vqpipe.sample import write_sample_dataset

STAGES = ("read", "decode", "wait_input", "encode", "write")
ROWS_PER_GROUP = EncodeConfig().rows_per_group  # the job's default


def cuda(args: argparse.Namespace) -> bool:
    return args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())


def allocator_tuned() -> bool:
    return all(os.environ.get(k) == v for k, v in CPU_ALLOCATOR_ENV.items())


def job_dict(args: argparse.Namespace, inputs: list[str], output: Path) -> dict[str, Any]:
    model = {
        "preset": args.preset,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "device": args.device,
    }
    model.update({"checkpoint": args.checkpoint} if args.checkpoint else {"random_weights": True})
    on_gpu = cuda(args)
    return {
        "inputs": inputs,
        "output": str(output),
        "model": model,
        "encode": {"batch_size": args.batch_size},
        "run": {
            "replicas": 1,
            "cpus_per_replica": args.cpus,
            "gpus_per_replica": 1 if on_gpu else 0,
            "speculative": False,
            "progress_interval_s": 3600,
            "tune_cpu_allocator": args.allocator != "default",
        },
    }


def _proc_field(path: str, name: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine(encoder: Encoder) -> dict[str, Any]:
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU"
    mem_kib = _proc_field("/proc/meminfo", "MemTotal").split()
    device = str(encoder.device)
    if encoder.device.type == "cuda":
        device = f"{torch.cuda.get_device_name(encoder.device)} ({device})"
    import ray

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_bytes": int(mem_kib[0]) * 1024 if mem_kib else 0,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "python": platform.python_version(),
        "ray": ray.__version__,
        # glibc malloc settings change CPU encoder speed a lot (see README); every process here inherits them.
        "env": {
            k: v for k, v in sorted(os.environ.items()) if k.startswith(("MALLOC_", "OMP_", "GLIBC_TUNABLES"))
        },
    }


def make_shards(work: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    t = time.perf_counter()
    shards = {
        "throughput": write_sample_dataset(work / "shards", args.shards, args.images // args.shards, seed=1),
        "mem_small": write_sample_dataset(work / "mem_small", 1, args.mem_images, seed=2),
        "mem_large": write_sample_dataset(work / "mem_large", 1, 10 * args.mem_images, seed=3),
    }
    print(f"generated shards in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return shards
