"""`vqpipe inspect` given hostile or unusual input: keys and shard names that matplotlib would read as math,
data-file metadata that would script the page, a read-only OUT. In-process; the page is loaded in headless
Chromium where there is one (CI installs it)."""

import io
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from browser import find_browser, load_page
from conftest import mounted
from PIL import Image
from shards import good_image_bytes, write_shard
from tokens import write_out

from vqpipe import report, storage
from vqpipe.cli import main
from vqpipe.config import build_config
from vqpipe.ledger import Ledger
from vqpipe.plan import Shard
from vqpipe.plan import shard_id as url_shard_id
from vqpipe.worker import ShardWorker

pytest.importorskip("matplotlib")

# Keys and a shard name that mathtext would draw as math (`$x$`) or fail to parse (`$^$`).
KEYS = ["$", "$x$", "a$^$b", "back\\slash", "x_1^2"]
SHARD_NAME = "in$x$_^\\-0"
# A script that says when it runs: the harness reports console errors (and the failed load of `x`).
SCRIPT = "<img src=x onerror=\"console.error('vqpipe-xss')\">"

NO_BROWSER = find_browser() is None and not os.environ.get("VQPIPE_REQUIRE_BROWSER")  # CI sets it
needs_browser = pytest.mark.skipif(
    NO_BROWSER, reason="no Chromium (CI installs it: apt-get install chromium)"
)


@pytest.fixture(scope="module")
def out(tmp_path_factory, one_torch_thread):
    """One shard named and keyed with `$`, `\\`, `_`, `^` (one sample without an image: an error row), committed
    by the real worker (tiny preset), and a failure record of another shard."""
    root = tmp_path_factory.mktemp("hostile")
    url = str(root / f"{SHARD_NAME}.tar")
    samples = [{"__key__": k, "jpg": good_image_bytes(i), "cls": b"1"} for i, k in enumerate(KEYS)]
    write_shard(url, [*samples, {"__key__": "$no^image$", "txt": b"x"}])
    cfg = build_config(
        {
            "inputs": [url],
            "output": str(root / "out"),
            "model": {"preset": "tiny", "random_weights": True},
            "encode": {"batch_size": 8},
            "run": {"max_error_rate": 0.5},
        }
    )
    ledger = Ledger(cfg.output)
    ledger.start_run({"fingerprint": "test", "output_settings": {"preset": "tiny"}}, allow_change=False)
    ledger.write_plan({url_shard_id(url): url, "$gone$-0": "/nowhere/$gone$.tar"})
    ledger.mark_failed("$gone$-0", {"shard_id": "$gone$-0", "reason": "not_a_tar", "detail": "$^$"})
    worker = ShardWorker.from_config(cfg)
    try:
        worker.process(Shard(url_shard_id(url), url, storage.input_version(url)))
    finally:
        worker.close()
    return root / "out"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A small OUT written without images or a model (tests/tokens.py): enough for a report without one."""
    d = tmp_path_factory.mktemp("tokens")
    write_out(d, {"a": 4, "b": 3}, var_input=False)
    return d


@pytest.fixture(scope="module")
def report_dir(out, tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    args = ["inspect", str(out), "--random-weights", "--samples", str(len(KEYS)), "--grid", str(len(KEYS))]
    assert main([*args, "--report", str(d)]) == 0  # mathtext raised ParseSyntaxException on `a$^$b`
    return d


# -- $ in keys and shard names ------------------------------------------------------------------------------------


@pytest.mark.slow  # the whole inspect, with a model, end to end (the figures alone are tested below)
def test_keys_and_shard_names_with_dollars_make_a_report(report_dir):
    stats = json.loads((report_dir / "stats.json").read_text())
    assert sorted(s["key"] for s in stats["quality"]["per_sample"]) == sorted(KEYS)
    assert all(s["shard"].startswith(SHARD_NAME) for s in stats["quality"]["per_sample"])
    for name in ("reconstructions", "codebook_usage", "throughput"):
        assert Image.open(report_dir / f"{name}.png").format == "PNG"


def ink(png: bytes, rows: slice, cols: slice) -> tuple[int, int]:
    """Width and height of the dark pixels in a region of a PNG (the extent of the text drawn there)."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("L"))[rows, cols] < 128
    ys, xs = np.flatnonzero(a.any(axis=1)), np.flatnonzero(a.any(axis=0))
    return (int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)) if len(xs) else (0, 0)


# `$x$ $y$ …` drawn as text is about as wide as `SxS SyS …`; drawn as math, it is "x y …", a third of that.
AS_MATH, AS_TEXT = "$x$ $y$ $z$ $w$", "SxS SyS SzS SwS"


def test_labels_are_drawn_as_plain_text_in_the_grid():
    white = np.full((64, 64, 3), 255, np.uint8)

    def label_width(label):
        row = report.GridRow(label, white, white, [white] * 4)
        png, geo = report.reconstruction_figure([row], (1, 2, 3, 4))
        top = geo["row_tops"][0]
        return ink(png, slice(top - report.ROW_LABEL, top), slice(None))[0]

    assert label_width(AS_MATH) >= 0.9 * label_width(AS_TEXT) > 0


def test_shard_and_stage_names_are_drawn_as_plain_text_in_the_throughput_figure():
    def label_extents(name):
        stages = {
            "images_per_stage_second": {name: 10.0, "encode": 5.0},
            "per_shard": {name: {"wall_seconds": 1.0, "rows": 4}},
        }
        png = report.throughput_figure(stages)
        w, h = report.THROUGHPUT_SIZE
        tick_labels = ink(png, slice(int(0.72 * h), h), slice(w // 2, w))[1]  # rotated: their height
        stage_labels = ink(png, slice(0, int(0.6 * h)), slice(0, int(0.09 * w)))[0]
        return np.array([tick_labels, stage_labels])

    assert (label_extents(AS_MATH) >= 0.9 * label_extents(AS_TEXT)).all()
    report.throughput_figure(  # a parse error for mathtext
        {"images_per_stage_second": {"a$^$b": 1.0}, "per_shard": {"a$^$b": {"wall_seconds": 1.0, "rows": 1}}}
    )


# -- metadata that would script the page --------------------------------------------------------------------------


def with_metadata(out, tmp_path, **changes):
    """A copy of OUT whose data file's `vqpipe` metadata has `changes`; returns it and the data file's path."""
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    ledger = Ledger(str(copy))
    path = ledger.data_url(next(iter(ledger.done_ids())))
    t = pq.read_table(path)
    meta = {**json.loads(t.schema.metadata[b"vqpipe"]), **changes}
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, b"vqpipe": json.dumps(meta)}), path)
    return copy, path


@pytest.mark.parametrize(
    "field, value",
    [
        ("resolution", SCRIPT),  # was written into index.html as it was
        ("vocab_size", SCRIPT),
        ("vocab_size", 64.0),
        ("patch_nums", [1, "2", 3, 4]),
        ("model", {"preset": ["tiny"], "sha256": "0"}),
    ],
)
def test_metadata_of_the_wrong_type_is_an_error_naming_the_file(tokens, tmp_path, caplog, field, value):
    copy, path = with_metadata(tokens, tmp_path, **{field: value})
    report_dir = tmp_path / "report"
    assert main(["inspect", str(copy), "--report", str(report_dir)]) == 2
    name = "preset" if field == "model" else field
    assert f"{path}: metadata {name} is" in caplog.text
    assert not (report_dir / "index.html").exists()


RENAMED = ("errors_by_reason", "failed_shards", "per_shard")  # tables keyed by text from the data


def hostile(stats, evil):
    """`stats` with every string in it, the keys of its per-shard and per-reason tables and the layout's numbers
    replaced by `evil(n)` (n: which one)."""
    count = iter(range(10**6))

    def walk(x, rename=False):
        if isinstance(x, str):
            return evil(next(count))
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            return {(evil(next(count)) if rename else k): walk(v, k in RENAMED) for k, v in x.items()}
        return x

    out = walk(stats)
    out["layout"].update(
        vocab_size=evil(next(count)), resolution=evil(next(count)), patch_nums=evil(next(count))
    )
    return out


@pytest.mark.slow  # two headless Chromiums (~2 s each)
@needs_browser
def test_no_text_on_the_page_runs_as_script_in_chromium(report_dir, tmp_path):
    stats = json.loads((report_dir / "stats.json").read_text())
    figures = {p.stem: p.read_bytes() for p in report_dir.glob("*.png")}
    scripts = hostile(stats, lambda n: SCRIPT.replace("xss", f"xss-{n}"))
    page = tmp_path / "index.html"
    page.write_text(report.html_page(scripts, figures))
    assert "vqpipe-xss-" in page.read_text()  # the hostile text is on the page ...
    assert load_page(page).errors == []  # ... and nothing ran, nothing failed to load

    # Positive control: the same hostile text, inserted unescaped once, runs and is seen.
    page.write_text(page.read_text().replace("</body>", f"{SCRIPT}</body>"))
    assert any("vqpipe-xss" in e for e in load_page(page).errors)


# -- a read-only OUT ----------------------------------------------------------------------------------------------


@pytest.fixture
def read_only(tokens, tmp_path):
    """OUT seen through a read-only bind mount (chmod stops no write as root; a read-only mount stops all)."""
    with mounted(["--bind", "-o", "ro", str(tokens)], tmp_path / "ro") as mnt:
        yield mnt


def test_a_read_only_out_is_refused_up_front_and_report_dir_works(read_only, tmp_path, caplog):
    with pytest.raises(OSError):
        (read_only / "probe").write_bytes(b"")  # really read-only
    assert main(["inspect", str(read_only)]) == 2  # was an OSError traceback, after all the reading
    assert f"{read_only / '_report'}: cannot write the report" in caplog.text
    assert "read-only" in caplog.text and "--report DIR" in caplog.text
    assert main(["inspect", str(read_only), "--report", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "index.html").exists()
