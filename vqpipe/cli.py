"""`vqpipe tokenize | status | compact | inspect | decode | sample | finetune`: the command line.

Exit codes: 0 done (or failed shards within --max-failed-shards), 1 incomplete run (failed shards, or the driver
could not write OUT), 2 bad usage/config/input (nothing was written), 3 OUT in use by another run, 75 no replica
could be placed in time (retry later), 130 / 143 stopped by SIGINT / SIGTERM (summary written; rerun to resume).

One module although over ~300 lines: one thin `run_*` per command (arguments in, exit code out) over the module
that does the work, and the one parser that lists them all."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import (
    EXIT_BUSY,
    EXIT_INCOMPLETE,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    IncompleteRunError,
    LeaseError,
    VqpipeError,
)
from .logs import setup_logging
from .options import add_arguments, overrides

logger = logging.getLogger("vqpipe.cli")


def tokenize_arguments(p: argparse.ArgumentParser) -> None:
    """The tokenize options, derived from the config dataclasses (vqpipe/options.py)."""
    add_arguments(p)


def prepare_local_ray(address: str | None) -> None:
    """Without a cluster address, the job starts a local Ray: keep every listener on loopback.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported, so this must run before `import ray`.
    """
    if address or os.environ.get("RAY_ADDRESS"):
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def run_tokenize(args: argparse.Namespace) -> int:
    from .config import from_sources

    cfg = from_sources(args.config, overrides(args))
    prepare_local_ray(cfg.run.address)
    from .job import tokenize
    from .stop import Interrupted, StopRequest

    stop = StopRequest()
    stop.install()
    try:
        summary = tokenize(cfg, stop)
    except Interrupted:  # a signal ended a wait outside the dispatcher (a listing, the lease, a silent store)
        logger.error("%s: interrupted; rerun to resume", stop.name)
        return stop.exit_code
    finally:
        stop.restore()
    st, planned = summary.status, summary.plan.ids
    logger.info(
        "summary: %d/%d shards done, %d rows, %d sample errors %s, %.1fs",
        len(planned.intersection(st.done)),
        len(planned),
        st.rows,
        sum(st.errors_by_reason.values()),
        dict(st.errors_by_reason),
        summary.seconds,
    )
    kept = {i: {"reason": r.reason, "detail": r.detail} for i, r in summary.kept_failed.items()}
    failures = {**summary.failed, **kept}
    if summary.ok:
        if failures:
            logger.warning(
                "%d shard(s) failed, within the %d allowed: %s",
                len(failures),
                summary.allowed_failures,
                ", ".join(sorted(failures)),
            )
        return EXIT_OK
    for shard_id, info in sorted(failures.items()):
        again = " (not retried: its input is unchanged)" if shard_id in kept else ""
        logger.error("failed shard %s: %s: %s%s", shard_id, info["reason"], info["detail"], again)
    if summary.error:
        raise IncompleteRunError(f"the driver cannot write the output: {summary.error}; rerun to resume")
    if summary.no_capacity:  # the job logged what a replica needs and what was free
        logger.error(
            "no replica could be placed; exit %d: try again once the cluster has room", summary.exit_code
        )
        return summary.exit_code
    if summary.interrupted:
        logger.error("%s: interrupted; rerun to resume", stop.name)
        return stop.exit_code
    allowed = f" ({summary.allowed_failures} allowed)" if summary.allowed_failures else ""
    advice = "rerun to retry only those"
    if kept:
        advice += " (those whose input is unchanged only with --retry-failed)"
    raise IncompleteRunError(
        f"{len(failures)} shard(s) failed{allowed}: {', '.join(sorted(failures))}; {advice}"
    )


def run_status(args: argparse.Namespace) -> int:
    from .out.snapshot import Snapshot
    from .out.verify import verify
    from .status import read_status

    storage_options = json.loads(args.storage_options) if args.storage_options else None
    snapshot = Snapshot.open(args.output.rstrip("/"), storage_options, require_run=False)
    st = read_status(snapshot)
    if args.verify:  # every file read in full, checksums too: damage that the listing cannot show
        st.damaged = [d.describe() for d in verify(snapshot)]
    if args.json:
        print(json.dumps({**st.to_dict(), "complete": st.complete}, indent=2))
    else:
        d = st.to_dict()
        s = d["shards"]
        print(
            f"shards:  {s['done']} done, {s['failed']} failed, {s['pending']} pending (of {s['planned']} planned)"
        )
        print(f"samples: {d['samples']} read, {d['rows']} rows, {d['errors']} errors")
        for reason, n in d["errors_by_reason"].items():
            print(f"  {reason}: {n}")
        if d["ignored_members"]:
            print(f"ignored: {d['ignored_members']} tar members in no sample {d['ignored_by_reason']}")
        for shard_id, reason in d["failed_shards"].items():
            print(f"failed:  {shard_id}: {reason}")
        outside = d["outside_plan"]
        if outside["done"] or outside["failed_shards"]:
            print(
                f"outside the latest plan (earlier runs): {outside['done']} done, "
                f"{len(outside['failed_shards'])} failure record(s) (not counted above)"
            )
        if d["active_run"]:
            print(f"active:  {d['active_run']['description']}")
        for line in d["damaged"]:
            print(f"damaged: {line}")
        if d["damaged"]:
            print("         `vqpipe tokenize ... --repair` tokenizes the shards of damaged files again")
        if d["incomplete_compaction"]:
            print("unfinished compaction: readers of data/ fail until `vqpipe compact` finishes it")
        if d["layout_version"] < 2:
            print("format 1.x layout: `vqpipe migrate OUT` moves it to format 2 (docs/format.md)")
        if d["last_run"]:
            end = d["last_run"]
            detail = f": {end['detail']}" if end["detail"] else ""
            print(f"last run: {end['result']} (exit {end['exit_code']}){detail}")
    return EXIT_OK if st.complete else EXIT_INCOMPLETE


def run_compact(args: argparse.Namespace) -> int:
    from .compact import CompactOptions, compact, duckdb_sql, read_sources

    storage_options = json.loads(args.storage_options) if args.storage_options else None
    if args.sql:
        print(duckdb_sql(read_sources(args.output.rstrip("/"), storage_options)))
        return EXIT_OK
    result = compact(
        CompactOptions(
            output=args.output.rstrip("/"),
            target_bytes=None if args.target_rows else args.target_bytes,
            target_rows=args.target_rows,
            row_group_rows=args.row_group_rows,
            storage_options=storage_options,
            wait_for_lease_s=args.wait_for_lease_s,
        )
    )
    print(
        f"compacted {result.shards} shard(s), {result.rows} rows into {len(result.new_parts)} new file(s); "
        f"{result.already_compacted} compacted before; {result.rewritten_parts} file(s) rewritten; "
        f"{result.removed_sources} file(s) they replaced removed"
    )
    return EXIT_OK


def run_migrate(args: argparse.Namespace) -> int:
    from .out.migrate import migrate

    storage_options = json.loads(args.storage_options) if args.storage_options else None
    report = migrate(args.output.rstrip("/"), storage_options, wait_for_lease_s=args.wait_for_lease_s)
    print(report)
    return EXIT_OK


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", metavar="OUT")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="the tokenizer checkpoint the tokens were made with (path or URL)")
    g.add_argument("--random-weights", action="store_true", help="the preset's fixed-seed random weights")
    p.add_argument("--model", dest="preset", help="preset (default: the one the data files name)")
    p.add_argument("--storage-options", help="fsspec options as JSON")


def run_inspect(args: argparse.Namespace) -> int:
    from .inspect import InspectOptions, inspect

    opts = InspectOptions(
        output=args.output.rstrip("/"),
        report_dir=args.report,
        checkpoint=args.checkpoint,
        preset=args.preset,
        random_weights=args.random_weights,
        samples=args.samples,
        grid_rows=args.grid,
        seed=args.seed,
        usage_rows=args.usage_rows,
        storage_options=json.loads(args.storage_options) if args.storage_options else None,
    )
    out_dir = inspect(opts)
    print(os.path.join(out_dir, "index.html"))
    return EXIT_OK


def run_decode(args: argparse.Namespace) -> int:
    from .reconstruct import decode_keys

    keys = [k for k in args.keys.split(",") if k]
    if not args.checkpoint and not args.random_weights:
        raise ConfigError("decode needs the tokenizer: --checkpoint URL (or --random-weights)")
    storage_options = json.loads(args.storage_options) if args.storage_options else None
    paths, missing = decode_keys(args.output, keys, args.to, args.preset, args.checkpoint, storage_options)
    for path in paths:
        print(path)
    if missing:
        raise ConfigError(
            f"{len(missing)} key(s) not in any committed shard of {args.output}: {', '.join(missing)}"
        )
    return EXIT_OK


def run_sample(args: argparse.Namespace) -> int:
    from .sample import write_sample_dataset

    paths = write_sample_dataset(
        args.dir, shards=args.shards, samples_per_shard=args.per_shard, seed=args.seed
    )
    print(f"wrote {len(paths)} shards to {args.dir}")
    return EXIT_OK


def run_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, finetune

    options = json.loads(args.storage_options) if args.storage_options else None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    keys: tuple[str, ...] = (
        "checkpoint",
        "steps",
        "lr",
        "batch_size",
        "seed",
        "recon_loss",
        "vq_weight",
        "hflip",
    )
    keys += ("device",)
    keys += ("log_every", "eval_every")
    cfg = FinetuneConfig(
        inputs=tuple(args.inputs), out=args.out, preset=args.preset, storage_options=options,
        eval_images=args.eval_images, **{k: getattr(args, k) for k in keys},
    )  # fmt: skip
    finetune(cfg)
    return EXIT_OK


def finetune_arguments(f: argparse.ArgumentParser) -> None:
    f.add_argument("inputs", nargs="+", metavar="INPUT", help="WebDataset shards: files, dirs, globs, URLs")
    f.add_argument("--out", required=True, help="where to save the checkpoint (a VAR state dict, .pth)")
    f.add_argument("--model", dest="preset", default="tiny", help="preset to train (default tiny)")
    f.add_argument("--checkpoint", help="start from this state dict (default: the preset's random init)")
    f.add_argument("--steps", type=int, default=100)
    f.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--recon-loss", choices=("l1", "l2"), default="l1")
    f.add_argument("--vq-weight", type=float, default=1.0, help="weight of VAR's VQ loss (default 1)")
    f.add_argument("--hflip", action="store_true", help="random horizontal flips (VAR's --hflip)")
    f.add_argument("--eval-images", type=int, default=32, help="images for the PSNR report (0: none)")
    f.add_argument("--eval-every", type=int, default=0, help="also report PSNR every N steps")
    f.add_argument("--log-every", type=int, default=10, help="log the loss every N steps (default 10)")
    f.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    f.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    f.add_argument("--storage-options", help="fsspec options as JSON")
    f.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqpipe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tokenize", help="tokenize WebDataset shards into Parquet")
    tokenize_arguments(t)
    t.set_defaults(func=run_tokenize)
    s = sub.add_parser("status", help="done / failed / pending shards of an output, from OUT alone")
    s.add_argument("output", metavar="OUT")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument(
        "--verify",
        action="store_true",
        help="also read every committed file in full (page checksums, row counts); damaged ones make the exit 1",
    )
    s.add_argument(
        "--storage-options", help="fsspec options as JSON (credentials normally come from the environment)"
    )
    s.set_defaults(func=run_status, log_level=None)
    c = sub.add_parser(
        "compact", help="copy committed shards into fewer, larger Parquet files (docs/compaction.md)"
    )
    c.add_argument("output", metavar="OUT")
    g = c.add_mutually_exclusive_group()
    g.add_argument(
        "--target-bytes",
        type=int,
        default=256 * 2**20,
        help="data-file bytes per compacted file (default 256 MiB)",
    )
    g.add_argument("--target-rows", type=int, help="rows per compacted file, instead of --target-bytes")
    c.add_argument("--row-group-rows", type=int, default=512, help="rows per row group (default 512)")
    c.add_argument(
        "--delete-sources",
        action="store_true",
        help="accepted for scripts of format 1.x; since format 2 compaction always moves rows (docs/compaction.md)",
    )
    c.add_argument(
        "--sql",
        action="store_true",
        help="write nothing; print a DuckDB query over every committed row (compacted and data files)",
    )
    c.add_argument("--wait-for-lease", dest="wait_for_lease_s", type=float, default=0.0, metavar="SECONDS")
    c.add_argument("--storage-options", help="fsspec options as JSON")
    c.set_defaults(func=run_compact, log_level=None)
    g2 = sub.add_parser("migrate", help="move a format-1.x OUT to the format-2 layout (docs/format.md)")
    g2.add_argument("output", metavar="OUT")
    g2.add_argument("--wait-for-lease", dest="wait_for_lease_s", type=float, default=0.0, metavar="SECONDS")
    g2.add_argument("--storage-options", help="fsspec options as JSON")
    g2.set_defaults(func=run_migrate, log_level=None)
    i = sub.add_parser(
        "inspect", help="a report on an output: reconstructions, codebook usage, errors, speed"
    )
    _model_arguments(i)
    i.add_argument(
        "--samples", type=int, default=32, help="rows whose reconstruction is measured (default 32)"
    )
    i.add_argument(
        "--grid", type=int, default=8, help="of those, rows drawn in reconstructions.png (default 8)"
    )
    i.add_argument("--seed", type=int, default=0, help="seed of the row sample (default 0)")
    i.add_argument("--usage-rows", type=int, default=1_000_000, help="rows counted for codebook usage")
    i.add_argument("--report", help="local report directory (default OUT/_report)")
    i.set_defaults(func=run_inspect, log_level=None)
    d = sub.add_parser("decode", help="PNGs of the decoded codes of some keys, for spot checks")
    _model_arguments(d)
    d.add_argument("--keys", required=True, help="comma-separated keys")
    d.add_argument("--to", required=True, help="directory for <key>.png")
    d.set_defaults(func=run_decode, log_level=None)
    m = sub.add_parser("sample", help="write a small WebDataset of real photos for demos and tests")
    m.add_argument("dir")
    m.add_argument("--shards", type=int, default=4)
    m.add_argument("--per-shard", type=int, default=16)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=run_sample, log_level=None)
    f = sub.add_parser("finetune", help="fine-tune the tokenizer on shards; save a VAR-format checkpoint")
    finetune_arguments(f)
    f.set_defaults(func=run_finetune)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except IncompleteRunError as e:
        logger.error("%s", e)
        return EXIT_INCOMPLETE
    except LeaseError as e:
        logger.error("%s", e)
        return EXIT_BUSY
    except VqpipeError as e:
        logger.error("%s", e)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
