"""The pictures and the page of `vqpipe inspect`: reconstructions.png, codebook_usage.png, throughput.png and
one self-contained index.html (images inline as data URIs, no script, no network), drawn with matplotlib.

matplotlib comes with the `inspect` extra (`pip install "vqpipe[inspect]"`); only this module imports it, and
only its object API (no pyplot, so nothing global is touched). The reconstruction grid places every image
with `figimage`, pixel for pixel (no resampling), so a cell of the PNG is exactly the decoded image.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

DPI = 100
CODEBOOK_SIZE = (1200, 450)  # pixels
THROUGHPUT_SIZE = (1200, 400)
GAP, HEADER, ROW_LABEL = (
    4,
    30,
    16,
)  # reconstruction grid: pixels between cells, above the grid, above each row
MAX_CELL = 256  # larger images (var512) are shown downscaled
# Text that comes from the data (keys, shard ids, stage names) is drawn as it is: matplotlib would read `$…$` in
# it as math (`$x$` drawn as an italic x; `$^$` a parse error that ended `vqpipe inspect`), and TeX if the
# user's matplotlibrc turns it on.
PLAIN = {"parse_math": False, "usetex": False}


@dataclass
class GridRow:
    label: str
    original: np.ndarray | None  # (R, R, 3) uint8; None: unavailable (the label says why)
    reconstruction: np.ndarray
    progressive: list[np.ndarray]  # after scales 1..K


def _figure(size: tuple[int, int]) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError('vqpipe inspect draws with matplotlib: pip install "vqpipe[inspect]"') from e
    return Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _fit(img: np.ndarray, cell: int) -> np.ndarray:
    if img.shape[0] == cell:
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((cell, cell), Image.Resampling.LANCZOS))


def reconstruction_figure(rows: list[GridRow], patch_nums: tuple[int, ...]) -> tuple[bytes, dict[str, Any]]:
    """Per row: original | reconstruction | after scale 1, 2, …, K. Returns the PNG and where each cell is."""
    cell = min(rows[0].reconstruction.shape[0], MAX_CELL)
    titles = ["original", "decoded"] + [f"{pn}×{pn}" for pn in patch_nums]
    width = len(titles) * (cell + GAP) + GAP
    height = HEADER + len(rows) * (ROW_LABEL + cell + GAP)
    fig = _figure((width, height))
    font = 7 if cell < 128 else 9
    lefts = [GAP + j * (cell + GAP) for j in range(len(titles))]
    for left, title in zip(lefts, titles):
        fig.text((left + cell / 2) / width, 1 - (HEADER - 6) / height, title, ha="center", fontsize=font)
    tops = []
    for i, row in enumerate(rows):
        top = HEADER + i * (ROW_LABEL + cell + GAP) + ROW_LABEL
        tops.append(top)
        label = row.label if len(row.label) * 5 < width else row.label[: width // 5 - 1] + "…"
        fig.text(GAP / width, 1 - (top - 3) / height, label, fontsize=font, family="monospace", **PLAIN)
        cells = [row.original, row.reconstruction, *row.progressive]
        for left, img in zip(lefts, cells):
            img = np.full((cell, cell, 3), 128, np.uint8) if img is None else _fit(img, cell)
            fig.figimage(img, xo=left, yo=height - top - cell, origin="upper")
    geometry = {
        "width": width,
        "height": height,
        "cell": cell,
        "columns": [{"title": t, "left": x} for t, x in zip(titles, lefts)],
        "row_tops": tops,
    }
    return _png(fig), geometry


def codebook_figure(counts: list[np.ndarray], usage: list[dict[str, Any]]) -> bytes:
    """Left: per scale, the fraction of the vocabulary used and perplexity / vocabulary. Right: per scale, code
    frequencies sorted from most to least frequent (the flatter, the more evenly the codebook is used)."""
    fig = _figure(CODEBOOK_SIZE)
    ax_used, ax_curve = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    names = [f"{u['patch_num']}×{u['patch_num']}" for u in usage]
    x = np.arange(len(usage))
    vocab = len(counts[0]) if counts else 1
    ax_used.bar(x - 0.2, [u["used_fraction"] for u in usage], 0.4, label="codes used / vocabulary")
    ax_used.bar(x + 0.2, [u["perplexity"] / vocab for u in usage], 0.4, label="perplexity / vocabulary")
    ax_used.set(
        xticks=x, ylim=(0, 1.05), xlabel="scale", title=f"codebook usage per scale (vocabulary {vocab})"
    )
    ax_used.set_xticklabels(names)
    ax_used.legend(loc="upper left", fontsize=8)
    for k, c in enumerate(counts):
        freq = np.sort(c)[::-1] / max(c.sum(), 1)
        nz = freq[freq > 0]
        ax_curve.plot(np.arange(1, len(nz) + 1) / vocab, nz, label=names[k], color=_shade(k, len(counts)))
    ax_curve.set(yscale="log", xlim=(0, 1), xlabel="code rank / vocabulary", ylabel="frequency")
    ax_curve.set_title("sorted code frequencies")
    ax_curve.legend(fontsize=7, ncol=2)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.13, top=0.9, wspace=0.2)
    return _png(fig)


def _shade(k: int, n: int) -> tuple[float, ...]:
    from matplotlib import colormaps

    return colormaps["viridis"](k / max(n - 1, 1))


def throughput_figure(stages: dict[str, Any]) -> bytes:
    """Left: images per stage-second (seconds summed over shards and threads). Right: seconds per shard."""
    from matplotlib.ticker import NullFormatter

    fig = _figure(THROUGHPUT_SIZE)
    ax_stage, ax_shard = fig.subplots(1, 2)
    # Waiting (wait_input, wait_device) is not work: it shows in the page's table, not as a throughput.
    rates = {k: v for k, v in stages["images_per_stage_second"].items() if not k.startswith("wait")}
    ax_stage.barh(range(len(rates)), list(rates.values()), color="tab:blue")
    ax_stage.set_yticks(range(len(rates)), list(rates), **PLAIN)
    ax_stage.set(xscale="log", xlabel="images per stage-second", title="throughput by stage")
    ax_stage.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on short ranges
    walls = sorted(
        ((rec["wall_seconds"] or 0.0, shard) for shard, rec in stages["per_shard"].items()), reverse=True
    )
    if len(walls) <= 40:
        ax_shard.bar(range(len(walls)), [w for w, _ in walls], color="tab:orange")
        ax_shard.set_xticks(range(len(walls)), [s for _, s in walls], rotation=90, fontsize=6, **PLAIN)
    else:
        ax_shard.hist([w for w, _ in walls], bins=40, color="tab:orange")
        ax_shard.set_xlabel("seconds")
    ax_shard.set_title(
        "wall seconds per shard (slowest first)" if len(walls) <= 40 else "wall seconds per shard"
    )
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.3, top=0.9, wspace=0.3)
    return _png(fig)


# ------------------------------------------------------------------------------------------------- the page

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1300px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}code{font-size:.9em}
img{max-width:100%;height:auto;display:block;margin:.5em 0;image-rendering:pixelated}
.note{background:#fff6d6;border:1px solid #e8d48a;padding:.5em 1em}.numbers td{min-width:7em}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, fmt: str = "{:,}") -> str:
    return "—" if x is None else fmt.format(x)


def _table(head: list[str], rows: list[list[Any]], numeric: Collection[int] = frozenset()) -> str:
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr>"]
    for r in rows:
        cells = (f"<td{' class=n' if j in numeric else ''}>{_e(v)}</td>" for j, v in enumerate(r))
        out += ["<tr>", *cells, "</tr>"]
    return "".join(out + ["</table>"])


def _img(png: bytes, alt: str, zoom: bool = False) -> str:
    """An inline PNG; `zoom` shows a small picture (tiny models' 64 px cells) at up to twice its size."""
    width = ""
    if zoom:
        from PIL import Image

        natural = Image.open(io.BytesIO(png)).width
        width = f' width="{min(2 * natural, 1250)}"' if natural < 625 else ""
    return f'<img alt="{_e(alt)}"{width} src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def html_page(stats: dict[str, Any], figures: dict[str, bytes]) -> str:
    """One page, every number from stats.json and every picture inline (opens from disk, offline)."""
    s, parts = stats, []
    parts.append(f"<h1>vqpipe inspect: <code>{_e(s['output'])}</code></h1>")
    sh = s["shards"]
    parts.append(
        _table(
            ["shards done", "failed", "pending", "samples read", "rows", "sample errors"],
            [[sh["done"], sh["failed"], sh["pending"], s["samples"], s["rows"], s["errors"]]],
            set(range(6)),
        )
    )
    lay = s["layout"]
    parts.append(
        f"<p>Tokens: preset <code>{_e(lay['preset'])}</code>, scales {_e(lay['patch_nums'])}, vocabulary "
        f"{_e(lay['vocab_size'])}, {_e(lay['resolution'])} px; model sha256 <code>{_e(lay['model_sha256'])}</code>.</p>"
    )
    parts.append("<h2>Reconstructions</h2>")
    q = s.get("quality")
    if q is None:
        parts.append(f'<p class="note">{_e(s["model_note"])}</p>')
    else:
        if s.get("model_note"):
            parts.append(f'<p class="note">{_e(s["model_note"])}</p>')
        parts.append(
            f"<p>{_e(q['samples'])} rows drawn at random (seed {_e(q['seed'])}), decoded with {_e(q['model'])}; "
            "the first are shown: original (preprocessed as the job did), decoded, and the picture after "
            "each scale.</p>"
        )
        if "reconstructions" in figures:
            parts.append(_img(figures["reconstructions"], "reconstructions", zoom=True))
        metric_rows = [
            [
                m,
                *(_num((q[m] or {}).get(p), "{:.3f}") for p in ("mean", "p5", "p50", "p95")),
                (q[m] or {}).get("n", 0),
            ]
            for m in ("psnr", "ssim")
        ]
        parts.append(_table(["metric", "mean", "p5", "p50", "p95", "samples"], metric_rows, {1, 2, 3, 4, 5}))
        if q.get("codes_agree") is not None:
            parts.append(
                f"<p>Re-encoding the originals gives the stored codes for {_e(_num(q['codes_agree'], '{:.2%}'))} "
                "of positions.</p>"
            )
        if q["missing_originals"]:
            parts.append("<p>Originals that could not be fetched:</p>")
            rows = [[m["shard"], m["key"], m["reason"]] for m in q["missing_originals"]]
            parts.append(_table(["shard", "key", "reason"], rows))
    cb = s["codebook"]
    parts.append(f"<h2>Codebook usage</h2><p>Over {_e(_num(cb['rows_counted']))} rows.</p>")
    parts.append(_img(figures["codebook_usage"], "codebook usage"))
    rows = [
        [
            f"{u['patch_num']}×{u['patch_num']}",
            u["positions"],
            u["used"],
            f"{u['used_fraction']:.1%}",
            f"{u['entropy_bits']:.2f}",
            f"{u['perplexity']:.1f}",
        ]
        for u in cb["scales"]
    ]
    parts.append(
        _table(
            ["scale", "positions", "codes used", "of vocabulary", "entropy (bits)", "perplexity"],
            rows,
            {1, 2, 3, 4, 5},
        )
    )
    parts.append("<h2>Errors</h2>")
    if s["errors_by_reason"]:
        rows = [
            [r, v["count"], "; ".join(f"{x['key']} ({x['shard']}): {x['detail']}" for x in v["examples"])]
            for r, v in s["errors_by_reason"].items()
        ]
        parts.append(_table(["reason", "samples", "examples (key, shard: detail)"], rows, {1}))
    else:
        parts.append("<p>No sample errors.</p>")
    if s["failed_shards"]:
        rows = [[i, f["reason"], f["detail"]] for i, f in s["failed_shards"].items()]
        parts.append("<p>Failed shards:</p>" + _table(["shard", "reason", "detail"], rows))
    st = s["stages"]
    parts.append("<h2>Throughput by stage</h2>")
    parts.append(_img(figures["throughput"], "throughput by stage"))
    rows = [
        [k, f"{v:,.1f}", _num(st["images_per_stage_second"].get(k), "{:,.1f}")]
        for k, v in st["seconds"].items()
    ]
    parts.append(
        _table(["stage", "seconds (all shards, all threads)", "images per stage-second"], rows, {1, 2})
    )
    slow = sorted(st["per_shard"].items(), key=lambda kv: -(kv[1]["wall_seconds"] or 0))[:10]
    rows = [[i, r["rows"], _num(r["wall_seconds"], "{:.2f}")] for i, r in slow]
    parts.append("<p>Slowest shards:</p>" + _table(["shard", "rows", "wall seconds"], rows, {1, 2}))
    parts.append(
        f'<p>All numbers: <a href="stats.json">stats.json</a> (vqpipe {_e(s["vqpipe_version"])}).</p>'
    )
    body = "\n".join(parts)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>vqpipe inspect: {_e(s['output'])}</title><style>{_CSS}</style></head><body>\n{body}\n</body></html>\n"
    )
