"""Throughput and memory of vqpipe next to its baselines, in one run, on one machine, model and set of shards.

    python benchmarks/bench.py                      # small256 preset on the CPU: a few minutes on 2 cores
    python benchmarks/bench.py --preset var256 --device cuda --precision exact

After starting a local Ray (timed, not counted) and the memory runs, each round measures, on the same generated
shards, model, precision, batch size and thread count:
  encoder only   the Encoder on pre-decoded uint8 batches (first batch excluded, median batch): the ceiling
  naive loop     read tar -> decode -> encode -> write Parquet, one thread of control, nothing overlapped
  vqpipe         the real job (`vqpipe.job.tokenize`, 1 replica with every CPU) on the local Ray
  Ray Data       read_webdataset(decoder=None) -> map_batches(preprocess) -> map_batches(encoder actor) -> Parquet,
                 with the preprocessing in CPU tasks and (CPU only) fused into the actor, Ray's default there
  Tokenize       read_webdataset(decoder=None) -> map_batches(vqpipe.raydata.Tokenize actor) -> good rows -> Parquet
  memory         (once, before the rounds) the job on one shard of N images, then on one of 10N (fresh actors):
                 the actor's peak RSS from the done markers
Then every output is checked row by row against the naive loop's (codes and var_input), and a Markdown table is
printed for the README. See benchmarks/README.md. This file is the command line and the order of the runs; each
pipeline, the output check and the report are modules of benchmarks/pipelines/.
"""

from __future__ import annotations

import os

# Ray reads these at import: every listener on loopback, no usage reporting.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster: no token file in ~/.ray
# Ray runs its workers at nice 15. The baselines run in this process at nice 0: on a machine with other work,
# the actors would get a fraction of the CPU the baselines get. Level the field (no effect on an idle machine).
os.environ.setdefault("RAY_worker_niceness", "0")
import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from pipelines.check import compare, read_outputs  # noqa: E402
from pipelines.common import allocator_tuned, cuda, job_dict, machine, make_shards  # noqa: E402
from pipelines.encoder_only import encoder_only  # noqa: E402
from pipelines.job import memory, start_ray, vqpipe_job  # noqa: E402
from pipelines.naive import naive  # noqa: E402
from pipelines.report import report  # noqa: E402

from vqpipe.config import CPU_ALLOCATOR_ENV, build_config  # noqa: E402
from vqpipe.encode import Encoder, build_encoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.allocator == "same" and not cuda(args) and not allocator_tuned():
        # vqpipe's CPU actors run with CPU_ALLOCATOR_ENV; give every pipeline (this process, whose baselines
        # run here, and the Ray it starts) the same allocator, or the comparison measures glibc, not pipelines.
        # glibc reads these once, at process start: start again with them.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CPU_ALLOCATOR_ENV})
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vqpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run(args, work)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(report(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(f"\nresults written to {args.out}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", default="small256", help="model preset (default small256: pipeline-bound on a CPU)"
    )
    p.add_argument("--checkpoint", help="VAR-format weights; default: the preset's fixed-seed random init")
    p.add_argument("--images", type=int, default=256, help="images in the throughput shards (default 256)")
    p.add_argument("--shards", type=int, default=4, help="throughput shards the images are split into")
    p.add_argument(
        "--mem-images", type=int, default=64, help="N: the memory runs use shards of N and 10N images"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="exact", choices=("exact", "tf32", "bf16"))
    p.add_argument("--channels-last", action="store_true", help="model.channels_last for every pipeline")
    p.add_argument("--compile", action="store_true", help="model.compile (torch.compile) for every pipeline")
    p.add_argument(
        "--allocator",
        default="same",
        choices=("same", "default", "shipped"),
        help="CPU only. same (default): every pipeline runs with the glibc settings vqpipe gives its CPU actors "
        "(run.tune_cpu_allocator); default: none does (vqpipe's tuning turned off); shipped: each as it comes, "
        "vqpipe's actors tuned, everything else (baselines, Ray Data) with glibc's defaults",
    )
    p.add_argument(
        "--cpus", type=int, default=len(os.sched_getaffinity(0)), help="CPUs for Ray and the replica"
    )
    p.add_argument("--repeat", type=int, default=1, help="rounds of the throughput runs; each keeps its best")
    p.add_argument("--skip", action="append", default=[], choices=("naive", "memory", "raydata", "tokenize"))
    p.add_argument("--quick", action="store_true", help="32 images in 2 shards, N=batch size: a smoke run")
    p.add_argument("--out", help="write all results to this JSON file")
    p.add_argument("--workdir", help="keep shards and outputs here (default: a temporary directory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.shards, args.mem_images = 32, 2, args.batch_size
    if args.images % args.shards:
        p.error("--images must be a multiple of --shards")
    if not {"raydata", "tokenize"} <= set(args.skip) and args.cpus < 2:
        # The recipe's encoder actor holds one CPU; its preprocessing tasks need another, or they never run.
        p.error("the Ray Data recipe needs --cpus 2 or more (or --skip raydata --skip tokenize)")
    if (
        "memory" not in args.skip and args.mem_images < args.batch_size
    ):  # a shard smaller than a batch runs smaller batches: less memory
        p.error("--mem-images must be at least --batch-size")
    return args


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    shards = make_shards(work, args)
    cfg_dict = job_dict(args, shards["throughput"], work / "out_vqpipe")
    torch.set_num_threads(args.cpus)
    encoder, _, resolution = build_encoder(build_config(cfg_dict))
    results: dict[str, Any] = {
        "settings": {
            "preset": args.preset,
            "checkpoint": args.checkpoint,
            "resolution": resolution,
            "images": args.images,
            "shards": args.shards,
            "batch_size": args.batch_size,
            "precision": encoder.mode.name,
            "cpus": args.cpus,
            "allocator": args.allocator,
        },
        "machine": machine(encoder),
    }
    loads = results["loadavg"] = []

    def step(name: str) -> None:
        loads.append((name, os.getloadavg()[0]))  # other work on the machine shows here
        print(
            f"[{time.strftime('%H:%M:%S')}] {name} (load average {loads[-1][1]:.2f})",
            file=sys.stderr,
            flush=True,
        )

    step("ray start")
    results["ray_start_s"] = start_ray(args.cpus, cfg_dict["run"]["gpus_per_replica"] > 0)
    rounds: list[dict[str, Any]] = []
    outputs: dict[str, dict] = {}
    try:
        if "memory" not in args.skip:
            step("memory: N, then 10N images in one shard")
            results["memory"] = memory(args, shards, work)
        # Rounds interleave the pipelines, so a burst of other work on the machine hits one round of each
        # rather than all rounds of one; each pipeline keeps its best round.
        for i in range(args.repeat):
            rounds.append(
                one_round(args, encoder, shards["throughput"], work / f"round{i}", resolution, step)
            )
            if i == 0:
                outputs = {name: result.pop("_outputs") for name, result in rounds[0].items()}
            for result in rounds[-1].values():
                result.pop("_outputs", None)
    finally:
        import ray

        ray.shutdown()
    for name in rounds[0]:
        results[name] = max((r[name] for r in rounds), key=lambda x: x["images_per_s"])
    results["rounds"] = rounds
    step("done")
    reference = outputs.get("naive", outputs["encoder_only"])
    results["output_check"] = {name: compare(reference, rows) for name, rows in outputs.items()}
    return results


def one_round(
    args: argparse.Namespace, encoder: Encoder, paths: list[str], work: Path, resolution: int, step
) -> dict:
    """Every throughput measurement once, each with its outputs (`_outputs`: key -> (codes, var_input))."""
    cfg = job_dict(args, paths, work / "vqpipe")
    r: dict[str, Any] = {}
    step("encoder only")
    r["encoder_only"] = encoder_only(encoder, paths, resolution, args.batch_size)
    if "naive" not in args.skip:
        step("naive loop")
        r["naive"] = naive(encoder, paths, work / "naive", resolution, args.batch_size)
        r["naive"]["_outputs"] = read_outputs(work / "naive" / "data")
    step("vqpipe job")
    r["vqpipe"] = vqpipe_job(build_config(cfg))
    r["vqpipe"]["_outputs"] = read_outputs(work / "vqpipe" / "data")
    if "raydata" not in args.skip:
        cuda = cfg["run"]["gpus_per_replica"] > 0  # a GPU actor never fuses with CPU tasks: one variant
        for name, fused in (("raydata", False),) + (() if cuda else (("raydata_fused", True),)):
            step(f"Ray Data recipe ({'decode fused into the actor' if fused else 'decode in CPU tasks'})")
            from pipelines.raydata import ray_data  # imports Ray Data: only when the recipe runs

            r[name] = ray_data(args, cfg, paths, work / name, resolution, fused)
            r[name]["_outputs"] = read_outputs(work / name)
    if "tokenize" not in args.skip:
        step("Ray Data with vqpipe.raydata.Tokenize")
        from pipelines.raydata import ray_tokenize

        r["raydata_tokenize"] = ray_tokenize(args, cfg, paths, work / "raydata_tokenize")
        r["raydata_tokenize"]["_outputs"] = read_outputs(work / "raydata_tokenize")
    return r


if __name__ == "__main__":
    sys.exit(main())
