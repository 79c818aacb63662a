"""Per-shard overhead: the same images as big shards and as tiny ones, through the real job, in one run.

    python benchmarks/bench_small_shards.py                         # small256, 1024 images: 4 x 256 vs 512 x 2
    python benchmarks/bench_small_shards.py --small 2 16 --in-flight 2 8 16

The images are generated once (`vqpipe.sample`, shards of `--big` images) and re-packed, member bytes unchanged,
into shards of each `--small` size, so every run encodes the same samples under the same keys. Each set runs
through `vqpipe.job.tokenize` on a local Ray (1 replica with every CPU, bench.py's settings), once per
`--in-flight` value (run.in_flight_per_replica, which the driver raises for small shards) for the small sets. Throughput is images per second of actor time
(first shard start to last commit, from the done markers: no Ray or model start-up), and each small set's is
printed as a ratio of the big set's (the goal: >= 0.7 for 2-image shards). `--repeat K` interleaves K rounds and
keeps each configuration's best (a shared machine has bursts of other work). Every run's codes are checked
against the big-shard run's, key by key. See benchmarks/README.md and docs/scale.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_worker_niceness", "0")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
from pipelines.common import allocator_tuned, job_dict  # noqa: E402  (benchmarks/pipelines)
from pipelines.job import start_ray, vqpipe_job  # noqa: E402

from vqpipe.config import CPU_ALLOCATOR_ENV, build_config  # noqa: E402
from vqpipe.sample import write_sample_dataset  # noqa: E402


def repack(big: list[str], out: Path, per_shard: int) -> list[str]:
    """The samples of `big`, in order, as shards of `per_shard` samples (member bytes and names unchanged)."""
    out.mkdir(parents=True, exist_ok=True)
    samples: list[list[tuple[tarfile.TarInfo, bytes]]] = []
    for path in big:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key = m.name.split(".", 1)[0]
                if not samples or samples[-1][0][0].name.split(".", 1)[0] != key:
                    samples.append([])
                samples[-1].append((m, tar.extractfile(m).read()))
    paths = []
    for n, start in enumerate(range(0, len(samples), per_shard)):
        path = out / f"part-{n:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples[start : start + per_shard]:
                for info, data in sample:
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def median_in_flight(output: str) -> float:
    """Shards running on the actor at each shard's start, median over shards (from the done markers)."""
    spans = []
    for path in Path(output, "_vqpipe", "done").glob("*.json"):
        r = json.loads(path.read_text())
        spans.append((r["started"], r["started"] + r["wall_seconds"]))
    return statistics.median(sum(1 for a, b in spans if a <= start < b) for start, _ in spans)


def codes_by_key(output: str) -> dict[str, list[int]]:
    table = pq.read_table(f"{output}/data", columns=["key", "codes"])
    return dict(zip(table.column("key").to_pylist(), table.column("codes").to_pylist()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small256")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--big", type=int, default=256, help="images per shard of the reference set")
    p.add_argument("--small", type=int, nargs="+", default=[2], help="images per shard of the small sets")
    p.add_argument(
        "--in-flight",
        type=int,
        nargs="+",
        default=[2],
        help="run.in_flight_per_replica for the small sets (the driver raises it for small shards)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    if not allocator_tuned():  # the actors run with it; so does everything here (bench.py --allocator same)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CPU_ALLOCATOR_ENV})
    logging.basicConfig(level=logging.WARNING)
    # bench.job_dict's other settings: exact fp32 on the CPU, one replica, no speculation
    args.device, args.precision, args.channels_last, args.compile = "cpu", "exact", False, False
    args.checkpoint, args.allocator = None, "same"
    work = Path(tempfile.mkdtemp(prefix="vqpipe-small-shards-"))
    try:
        big = write_sample_dataset(work / "big", args.images // args.big, args.big, seed=1)
        sets = {(args.big, 2): big}  # the big set runs with the default in-flight (2)
        for size in args.small:
            paths = repack(big, work / f"small{size}", size)
            sets.update({(size, k): paths for k in args.in_flight})
        print(f"ray start {start_ray(args.cpus, False):.1f}s", file=sys.stderr)
        best: dict[tuple[int, int], dict] = {}
        for round_ in range(args.repeat):
            for (size, flight), paths in sets.items():
                out = work / f"out-{size}-{flight}-{round_}"
                job = job_dict(args, paths, out)
                job["run"]["in_flight_per_replica"] = flight
                result = vqpipe_job(build_config(job))
                result["codes"] = codes_by_key(str(out))
                result["in_flight"] = median_in_flight(str(out))
                shutil.rmtree(out)
                print(
                    f"{size}-image shards, {flight} in flight: {result['images_per_s_actor_span']:.1f} images/s",
                    file=sys.stderr,
                )
                if (size, flight) not in best or result["images_per_s_actor_span"] > best[(size, flight)][
                    "images_per_s_actor_span"
                ]:
                    best[(size, flight)] = result
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = best[(args.big, 2)]
    print(
        f"\n{args.images} images, preset {args.preset}, batch {args.batch_size}, {args.cpus} CPUs, best of {args.repeat}\n"
    )
    print(
        "| shards | images/shard | in flight (configured) | in flight (median, measured) "
        "| images/s (actor time) | ratio to big shards | codes equal to big-shard run |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|")
    for (size, flight), r in best.items():
        same = r["codes"] == reference["codes"]
        print(
            f"| {args.images // size} | {size} | {flight} | {r['in_flight']:g} | {r['images_per_s_actor_span']:.1f} "
            f"| {r['images_per_s_actor_span'] / reference['images_per_s_actor_span']:.2f} | {'yes' if same else 'NO'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
