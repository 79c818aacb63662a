"""The Markdown report of one benchmark run: throughput, ratios, stage times, memory, output check."""

from __future__ import annotations

from typing import Any

from .common import STAGES


def _ratio(results: dict, a: str, b: str) -> float | None:
    return results[a]["images_per_s"] / results[b]["images_per_s"] if a in results and b in results else None


def report(r: dict[str, Any]) -> str:
    s, m = r["settings"], r["machine"]
    enc = r["encoder_only"]["images_per_s"]
    lines = [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB; torch {m['torch']} "
        f"({m['torch_threads']} threads), device {m['device']}; Python {m['python']}, Ray {m['ray']}; "
        f"{' '.join(f'{k}={v}' for k, v in m['env'].items()) or 'default malloc'}; "
        f"1-min load average {min(x for _, x in r['loadavg']):.2f}-{max(x for _, x in r['loadavg']):.2f} "
        "during the run",
        f"Work: {s['images']} images in {s['shards']} shards (vqpipe sample dataset), preset {s['preset']} "
        f"({s['resolution']} px, {'checkpoint' if s['checkpoint'] else 'random weights'}), precision "
        f"{s['precision']}, batch {s['batch_size']}, {s['cpus']} CPUs; best of {len(r['rounds'])} round(s). "
        f"Ray start-up {r['ray_start_s']:.1f}s (not counted).",
        "",
        "| pipeline | images | seconds | images/s | / encoder-only |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [
        ("encoder only (pre-decoded; median batch)", r["encoder_only"]),
        ("vqpipe job (wall, incl. actor start + model load)", r.get("vqpipe")),
        ("vqpipe actors (done markers: first start to last commit)", _span(r.get("vqpipe"))),
        ("Ray Data recipe, decode in CPU tasks (wall, incl. actor start + model load)", r.get("raydata")),
        ("Ray Data recipe, decode fused into the actor (Ray's default on CPU)", r.get("raydata_fused")),
        ("Ray Data + vqpipe.raydata.Tokenize (decode and encode in the actor)", r.get("raydata_tokenize")),
        ("naive single-process loop", r.get("naive")),
    ]
    for name, x in rows:
        if x:
            lines.append(
                f"| {name} | {x['images']} | {x['seconds']:.1f} | {x['images_per_s']:.2f} | "
                f"{x['images_per_s'] / enc:.2f} |"
            )
    lines.append("")
    ratios = [
        ("end-to-end / encoder-only", _ratio(r, "vqpipe", "encoder_only")),
        ("vqpipe / Ray Data (CPU tasks)", _ratio(r, "vqpipe", "raydata")),
        ("vqpipe / Ray Data (fused)", _ratio(r, "vqpipe", "raydata_fused")),
        ("vqpipe / Ray Data + Tokenize", _ratio(r, "vqpipe", "raydata_tokenize")),
        ("vqpipe / naive", _ratio(r, "vqpipe", "naive")),
    ]
    lines.append("Ratios (images/s): " + "; ".join(f"{n} **{v:.2f}x**" for n, v in ratios if v is not None))
    if s.get("allocator") == "shipped":
        lines.append(
            "Allocators differ (--allocator shipped): vqpipe's actors keep freed memory, the other pipelines run "
            "with glibc's defaults; ratios compare the tools as they come, not the pipelines alone."
        )
    if "vqpipe" in r:
        v = r["vqpipe"]
        lines.append(
            f"vqpipe job overhead: {v['before_first_shard_s']:.1f}s before the first shard starts (plan, actor "
            f"start, imports, model), {v['after_last_commit_s']:.1f}s after the last commit."
        )
    if "vqpipe" in r:
        v, n = r["vqpipe"], r.get("naive")
        lines += [
            "",
            "Where the time goes (seconds summed over shards). vqpipe's decode is summed over its decode threads;",
            "wait_input is the encoding thread waiting for decoded pixels; with 2 shards in flight per actor a",
            "shard's encode includes waiting for the other shard's batch (one model, one batch at a time).",
            "",
            "| stage | vqpipe s | vqpipe ms/image | naive s | naive ms/image |",
            "|---|---:|---:|---:|---:|",
        ]
        for stage in STAGES:
            a = v["stage_seconds"].get(stage)
            b = n["stage_seconds"].get(stage) if n else None
            lines.append(
                f"| {stage} | {_f(a)} | {_f(a, 1000 / v['images'])} | {_f(b)} | "
                f"{_f(b, 1000 / n['images']) if n else '-'} |"
            )
        lines.append(
            f"| shard wall (sum) | {sum(v['shard_wall_seconds']):.1f} | | {n['seconds']:.1f} | |"
            if n
            else f"| shard wall (sum) | {sum(v['shard_wall_seconds']):.1f} | | | |"
        )
    if "memory" in r:
        mm = r["memory"]
        lines += [
            "",
            "| actor peak RSS | shard of N | shard of 10N | ratio |",
            "|---|---:|---:|---:|",
            f"| images {mm['n_small']} / {mm['n_large']} | {mm['peak_rss_small'] / 2**20:.0f} MiB | "
            f"{mm['peak_rss_large'] / 2**20:.0f} MiB | {mm['ratio']:.2f} |",
        ]
    check = r["output_check"]
    lines += ["", "Output check against the naive loop (rows with identical codes / var_input):"]
    for name, c in check.items():
        lines.append(
            f"  {name}: {c['rows']} rows, same keys {c['same_keys']}, codes equal {c['codes_equal']}, "
            f"var_input equal {c['var_input_equal']}"
        )
    return "\n".join(lines)


def _span(v: dict | None) -> dict | None:
    if not v:
        return None
    return {"images": v["images"], "seconds": v["actor_span_s"], "images_per_s": v["images_per_s_actor_span"]}


def _f(x: float | None, scale: float = 1.0) -> str:
    return "-" if x is None else f"{x * scale:.1f}" if scale == 1.0 else f"{x * scale:.2f}"
