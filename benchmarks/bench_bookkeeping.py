"""What bookkeeping costs at 1k-100k shards: a no-op rerun, `vqpipe status` and building a `TokenDataset` (whole
process: wall seconds, peak RSS), and on a real S3 API (moto on 127.0.0.1) the requests per committed shard and of
a no-op rerun.

    python benchmarks/bench_bookkeeping.py                         # 1k, 10k, 100k locally; 300 on moto
    python benchmarks/bench_bookkeeping.py --before /work/main     # also the code in that checkout, same sets
    python benchmarks/bench_bookkeeping.py --sizes 200 --s3-shards 30 --s3-committed 3   # smoke run

Shard sets: one real tar (two tiny PNGs) tokenized once by the real worker (tiny preset, random weights);
then N inputs (hard links of that tar: no disk) and N done markers cloned from the real one with the id, URL
and fingerprint of each input substituted, data/errors files hard-linked. That is an OUT as a finished run
leaves it, without running N shards, in the layout the measured code writes (format 2: bookkeeping under
_vqpipe/; an older checkout given as --before: format 1.x). Each measurement is a fresh `python -m vqpipe.cli` process with
PYTHONPATH at the code measured; RSS is that process's peak (wait4). "after, 1st" is the first run of this
code on an OUT that has no index yet (it reads every marker once and writes the index); "after" is the next.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_tar(path: str) -> None:
    """Two 16x16 PNGs with labels: a real WebDataset shard, ~3 KB."""
    import numpy as np
    from PIL import Image

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(2):
            png = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(png, format="PNG")
            for suffix, data in (("png", png.getvalue()), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{suffix}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def config(
    inputs: list[str], out: str, storage_options: dict | None = None, checkpoint: str | None = None
) -> Any:
    from vqpipe.config import build_config

    data: dict[str, Any] = {
        "inputs": inputs,
        "output": out,
        "model": {"preset": "tiny", "checkpoint": checkpoint}
        if checkpoint
        else {"preset": "tiny", "random_weights": True},
        "encode": {"batch_size": 2},
        "run": {"replicas": 1, "cpus_per_replica": 1},
    }
    if storage_options:
        data["storage_options"] = storage_options
    return build_config(data)


def template_marker(work: str) -> tuple[str, dict[str, Any], str, str]:
    """Tokenize one real shard with the real worker; its tar, marker (JSON), data and errors files."""
    from vqpipe import storage
    from vqpipe.ledger import Ledger
    from vqpipe.plan import Shard, shard_id
    from vqpipe.worker import ShardWorker

    tar = os.path.join(work, "template.tar")
    tiny_tar(tar)
    out = os.path.join(work, "template-out")
    worker = ShardWorker.from_config(config([tar], out), cpus=1)
    try:
        sid = shard_id(tar)
        worker.process(Shard(sid, tar, storage.input_version(tar)))
    finally:
        worker.close()
    ledger = Ledger(out)
    with open(ledger.done_url(sid)) as f:
        marker = json.load(f)
    return tar, marker, ledger.data_url(sid), ledger.errors_url(sid)


_LINKS_PER_FILE = 50_000


def _copy(path: str, i: int) -> str:
    copy = f"{path}.{i}"
    shutil.copy2(path, copy)  # content and mtime: the same fingerprint
    return copy


def layout_version(code: str) -> int:
    """The OUT layout the code at `code` reads and writes: 2 since vqpipe/out/layout.py exists, else 1."""
    return 2 if os.path.exists(os.path.join(code, "vqpipe", "out", "layout.py")) else 1


def build_local(
    root: str, n: int, template: tuple[str, dict[str, Any], str, str], version: int = 2
) -> tuple[str, str]:
    """N inputs and an OUT holding all N committed (markers cloned from the real one), in layout `version`."""
    from vqpipe import storage
    from vqpipe.plan import shard_id

    tar, marker, data, errors = template
    inp, out = os.path.join(root, "in"), os.path.join(root, "out")
    meta = os.path.join(out, "_vqpipe") if version >= 2 else out
    table = ".pq" if version >= 2 else ".parquet"
    for sub in ("done", "errors"):
        os.makedirs(os.path.join(meta, sub), exist_ok=True)
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    os.makedirs(inp, exist_ok=True)
    fingerprint = None
    for i in range(n):
        if i and i % _LINKS_PER_FILE == 0:  # ext4 allows 65,000 links to a file: continue from a copy
            tar, data, errors = (_copy(f, i) for f in (tar, data, errors))
        url = os.path.join(inp, f"part-{i:06d}.tar")
        os.link(tar, url)
        fingerprint = fingerprint or storage.input_version(url)  # the copies keep size and mtime
        sid = shard_id(url)
        rec = {**marker, "shard_id": sid, "input": {"url": url, "fingerprint": fingerprint}}
        with open(os.path.join(meta, "done", f"{sid}.json"), "w") as f:
            json.dump(rec, f, sort_keys=True, indent=2)
        os.link(data, os.path.join(out, "data", f"{sid}.parquet"))
        os.link(errors, os.path.join(meta, "errors", f"{sid}{table}"))
    # run.json as the run that made them left it (so a rerun is not the OUT's first)
    from vqpipe.config import random_weights_id
    from vqpipe.job import run_record

    pattern = os.path.join(inp, "*.tar")
    record = run_record(config([pattern], out), random_weights_id("tiny")).to_json()
    with open(os.path.join(meta, "run.json"), "w") as f:
        json.dump({**record, "legacy_stem_ids": False, "run_id": "bench"}, f, sort_keys=True, indent=2)
    return pattern, out


def use_checkpoint(pattern: str, out: str, work: str) -> str:
    """A tiny checkpoint (random weights, saved as torch does), and OUT's run.json as a run with it left it."""
    import hashlib

    import torch

    from vqpipe.job import run_record
    from vqpipe.model import build_model

    ckpt = os.path.join(work, "tiny.pth")
    torch.save(build_model("tiny", seed=1).state_dict(), ckpt)
    with open(ckpt, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    record = run_record(config([pattern], out, checkpoint=ckpt), sha).to_json()
    meta = os.path.join(out, "_vqpipe") if os.path.isdir(os.path.join(out, "_vqpipe")) else out
    with open(os.path.join(meta, "run.json"), "w") as f:
        json.dump({**record, "legacy_stem_ids": False, "run_id": "bench"}, f, sort_keys=True, indent=2)
    return ckpt


def run_measured(code: str, args: list[str]) -> dict[str, Any]:
    """`vqpipe ARGS` in a fresh process with `code` first on PYTHONPATH: wall seconds and peak RSS. `args` of
    ["dataset", OUT]: build `vqpipe.data.TokenDataset(OUT)` (what a training job does first) instead."""
    env = {
        **os.environ,
        "PYTHONPATH": code,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "VQPIPE_PROGRESS": "lines",
    }
    with tempfile.NamedTemporaryFile("r") as hwm, tempfile.TemporaryFile() as err:
        env["BENCH_HWM_FILE"] = hwm.name
        t = time.perf_counter()
        cmd = [sys.executable, "-c", _PEAK_RSS, *args]
        # cwd: `python -c` puts the working directory first on sys.path, before PYTHONPATH
        cwd = tempfile.gettempdir()
        run = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err, check=False)
        wall = time.perf_counter() - t
        if run.returncode != 0:
            err.seek(0)
            tail = err.read().decode()[-3000:]
            raise SystemExit(f"vqpipe {' '.join(args)} exited {run.returncode}:\n{tail}")
        peak_kib, cpu = hwm.read().split()
    return {
        "seconds": round(wall, 2),
        "cpu_seconds": round(float(cpu), 2),
        "rss_mib": round(int(peak_kib) / 1024, 1),
    }


def best_of(repeat: int, code: str, args: list[str]) -> dict[str, Any]:
    """The fastest of `repeat` runs (a shared machine adds, never removes, time)."""
    return min((run_measured(code, args) for _ in range(repeat)), key=lambda m: m["seconds"])


# `python -m vqpipe.cli ARGS`, writing its peak RSS (VmHWM, KiB) and CPU seconds (user + system) at exit. Not wait4's ru_maxrss of the child:
# Linux carries the parent's peak across fork+exec into it, and this script's parent holds torch.
_PEAK_RSS = """
import atexit, os, runpy, sys

def _peak():
    with open("/proc/self/status") as f, open(os.environ["BENCH_HWM_FILE"], "w") as out:
        t = os.times()
        out.write(next(line for line in f if line.startswith("VmHWM:")).split()[1] + f" {t.user + t.system}")

atexit.register(_peak)
if sys.argv[1] == "dataset":
    from vqpipe.data import TokenDataset

    print(len(TokenDataset(sys.argv[2])))
else:
    sys.argv = ["vqpipe", *sys.argv[1:]]
    runpy.run_module("vqpipe.cli", run_name="__main__")
"""


def local_rows(
    sizes: list[int], before: str | None, work: str, template: Any, repeat: int = 1
) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        row: dict[str, Any] = {"shards": n}
        codes = [("before", before)] if before else []
        for side, code in [*codes, ("after", REPO)]:
            root = os.path.join(work, f"n{n}-{side}")
            t = time.perf_counter()
            pattern, out = build_local(root, n, template, layout_version(code))
            print(f"# {n} shards built in {time.perf_counter() - t:.0f}s", file=sys.stderr)
            tok = ["tokenize", pattern, "--output", out, "--model", "tiny", "--random-weights"]
            if side == "after":  # before any run made the index: every marker is read
                row["dataset_after_first"] = run_measured(code, ["dataset", out])
                row["rerun_after_first"] = run_measured(code, tok)  # once: it changes OUT (writes the index)
            row[f"rerun_{side}"] = best_of(repeat, code, tok)
            row[f"status_{side}"] = best_of(repeat, code, ["status", out])
            row[f"dataset_{side}"] = best_of(repeat, code, ["dataset", out])
            # The same OUT as a run with a checkpoint leaves it: a rerun with that checkpoint
            ckpt_tok = [*tok[:-1], "--checkpoint", use_checkpoint(pattern, out, work)]
            row[f"rerun_ckpt_{side}"] = best_of(repeat, code, ckpt_tok)
            shutil.rmtree(root)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


# -- S3 (moto on 127.0.0.1) --------------------------------------------------------------------------------------


def kind(method: str, path: str) -> str:
    """A request as `METHOD what`, e.g. `HEAD input`, `PUT done/`, `GET list done/`."""
    if "list-type" in path:
        from urllib.parse import parse_qs, urlsplit

        prefix = parse_qs(urlsplit(path).query).get("prefix", [""])[0]
        return f"LIST {prefix.rstrip('/').rsplit('/', 1)[-1] or '/'}/"
    if "uploads" in path or "uploadId" in path:
        return f"{method} multipart"
    name = path.split("?")[0]
    if "/in/" in name:
        return f"{method} input"
    for sub in ("done", "data", "errors", "failed", "index"):
        if f"/{sub}/" in name:
            return f"{method} {sub}/"
    return f"{method} {name.rsplit('/', 1)[-1]}"


def s3_rows(n: int, committed_by_worker: int, before: str | None, template: Any) -> dict[str, Any]:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from s3server import s3_server

    tar, marker, data, errors = template
    with open(tar, "rb") as f:
        tar_bytes = f.read()
    results: dict[str, Any] = {"shards": n, "committed_by_worker": committed_by_worker}
    with s3_server() as s3:
        s3.seed({f"in/part-{i:06d}.tar": tar_bytes for i in range(n)})
        for label, code in (("before", before), ("after", REPO)):
            if code is None:
                continue
            out = s3.url(f"{label}/out")
            start = len(s3.requests)
            _child(
                code,
                ["worker", s3.url("in/*.tar"), out, json.dumps(s3.storage_options), str(committed_by_worker)],
            )
            # the child lists the inputs once to know them (the driver's planning listing): not per shard
            per = Counter(k for m, p in s3.requests[start:] if (k := kind(m, p)) != "LIST in/")
            results[f"per_shard_{label}"] = {
                k: round(v / committed_by_worker, 2) for k, v in sorted(per.items())
            }
            _child(
                code,
                ["clone", s3.url("in/*.tar"), out, json.dumps(s3.storage_options), str(committed_by_worker)],
            )
            for attempt in ("first", "second"):
                start = len(s3.requests)
                _child(code, ["noop", s3.url("in/*.tar"), out, json.dumps(s3.storage_options)])
                got = Counter(kind(m, p) for m, p in s3.requests[start:])
                results[f"noop_{label}_{attempt}"] = {"total": sum(got.values()), **dict(sorted(got.items()))}
    return results


def _child(code: str, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": code, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    run = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *args], env=env, capture_output=True
    )
    if run.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{run.stderr.decode()[-3000:]}")


def child(args: list[str]) -> None:
    """Runs with the measured code's vqpipe: `worker` tokenizes the first K inputs (attempt 1, as the driver
    would hand them), `clone` writes markers for the rest, `noop` is a whole no-op `tokenize` (no Ray)."""
    from vqpipe import storage
    from vqpipe.ledger import Ledger
    from vqpipe.plan import Shard, shard_id

    what, pattern, out, opts = args[0], args[1], args[2], json.loads(args[3])
    # `noop` lists nothing itself: its requests are the run's alone
    inputs = storage.expand_inputs_with_info([pattern], opts) if what != "noop" else []
    if what == "worker":
        from vqpipe import worker as worker_module
        from vqpipe.worker import ShardWorker

        # Left out: a shard running past 2 s also looks for a twin's commit (one HEAD at 2, 6, 14, 30 s, ...
        # of its run), which counts the machine's speed, not the bookkeeping.
        worker_module._SUPERSEDED_CHECK_S = float("inf")

        k = int(args[4])
        worker = ShardWorker.from_config(config([pattern], out, opts), cpus=1)
        try:
            for url, fp in inputs[:k]:
                worker.process(Shard(shard_id(url), url, fp))
        finally:
            worker.close()
    elif what == "clone":
        k = int(args[4])
        ledger = Ledger(out, opts)
        rec = storage.read_json(ledger.done_url(shard_id(inputs[0][0])), opts)
        for url, fp in inputs[k:]:
            sid = shard_id(url)
            storage.write_json_atomic(
                ledger.done_url(sid), {**rec, "shard_id": sid, "input": {"url": url, "fingerprint": fp}}, opts
            )
    elif what == "noop":
        from vqpipe.job import tokenize

        summary = tokenize(config([pattern], out, opts))
        assert summary.ok and not summary.plan.todo, "not a no-op"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--s3-shards", type=int, default=300, help="inputs on moto (0: skip the S3 part)")
    ap.add_argument("--s3-committed", type=int, default=20, help="of which the real worker commits this many")
    ap.add_argument("--before", help="a checkout of the code to compare with (e.g. /work/main)")
    ap.add_argument("--repeat", type=int, default=1, help="keep the fastest of this many runs of each")
    ap.add_argument("--work", help="scratch directory (default: a temporary one)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench-bookkeeping-")
    os.makedirs(work, exist_ok=True)  # a --work that does not exist yet
    try:
        template = template_marker(work)
        results: dict[str, Any] = {"local": local_rows(args.sizes, args.before, work, template, args.repeat)}
        if args.s3_shards:
            results["s3"] = s3_rows(args.s3_shards, args.s3_committed, args.before, template)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(report(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def report(results: dict[str, Any]) -> str:
    lines = [
        "| shards | what | before | after, 1st run (builds the index) | after |",
        "|---|---|---|---|---|",
    ]

    def cell(m: dict[str, Any] | None) -> str:
        return f"{m['seconds']:.1f} s ({m['cpu_seconds']:.1f} s CPU), {m['rss_mib']:.0f} MiB" if m else "-"

    for row in results["local"]:
        n = f"{row['shards']:,}"
        lines.append(
            f"| {n} | no-op rerun | {cell(row.get('rerun_before'))} | {cell(row['rerun_after_first'])} | "
            f"{cell(row['rerun_after'])} |"
        )
        lines.append(
            f"| {n} | `vqpipe status` | {cell(row.get('status_before'))} | | {cell(row['status_after'])} |"
        )
        lines.append(
            f"| {n} | no-op rerun with a checkpoint | {cell(row.get('rerun_ckpt_before'))} | | "
            f"{cell(row['rerun_ckpt_after'])} |"
        )
        lines.append(
            f"| {n} | `TokenDataset(OUT)` | {cell(row.get('dataset_before'))} | "
            f"{cell(row['dataset_after_first'])} | {cell(row['dataset_after'])} |"
        )
    local = {r["shards"]: r for r in results["local"]}
    if len(local) > 1:
        small, big = sorted(local)[-2:]
        for key in (
            "rerun_before",
            "rerun_after",
            "status_before",
            "status_after",
            "dataset_before",
            "dataset_after",
        ):
            if key in local[big]:
                ratio = local[big][key]["cpu_seconds"] / max(local[small][key]["cpu_seconds"], 1e-9)
                lines.append(f"\n{key}: {big:,} / {small:,} shards = {ratio:.2f}x the CPU time")
    if "s3" in results:
        s3 = results["s3"]
        lines.append(
            f"\nS3 (moto), {s3['shards']} inputs, {s3['committed_by_worker']} committed by the worker:"
        )
        for key, value in s3.items():
            if isinstance(value, dict):
                lines.append(f"- {key}: {json.dumps(value)}")
    return "\n".join(lines)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
