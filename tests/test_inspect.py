"""`vqpipe inspect`, `vqpipe decode` and `vqpipe status --json` on an OUT made by the real worker, in-process.

Every figure is checked against numbers recomputed here without vqpipe's inspect code: grid cells against the
decoder run directly on the codes pyarrow reads, originals against the tar members preprocessed again, PSNR and
SSIM against their formulas, codebook usage against a count of every code. The page is loaded in headless
Chromium (skipped where there is none; CI installs it).
"""

import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from browser import find_browser, load_page
from PIL import Image
from shards import defect_samples, good_image_bytes, write_not_a_tar, write_shard

from vqpipe import storage
from vqpipe.cli import main
from vqpipe.config import build_config
from vqpipe.errors import ShardError
from vqpipe.ledger import Ledger
from vqpipe.model import build_model
from vqpipe.plan import Shard
from vqpipe.preprocess import preprocess
from vqpipe.worker import ShardWorker

pytest.importorskip("matplotlib")

EVIL_KEY = '<img src=x onerror="alert(1)">'  # a tar member name can hold HTML; the page must escape it
PATCH_NUMS = (1, 2, 3, 4)  # the tiny preset
GRID, SAMPLES = 3, 10


@pytest.fixture(scope="module")
def out(tmp_path_factory, one_torch_thread):
    """Three shards (good, unusual and broken samples) committed by the real worker, and one failed shard."""
    root = tmp_path_factory.mktemp("inspect")
    urls = []
    for i in range(3):
        samples, _ = defect_samples(i)
        samples += [
            {"__key__": f"good{i}_{j}", "jpg": good_image_bytes(100 * i + j, "jpg", (80, 64)), "cls": b"7"}
            for j in range(6)
        ]
        if i == 0:
            samples.insert(0, {"__key__": EVIL_KEY, "txt": b"no image here"})
        urls.append(str(root / f"part-{i:06d}.tar"))
        write_shard(urls[-1], samples)
    urls.append(str(root / "part-000003.tar"))
    write_not_a_tar(urls[-1])
    cfg = build_config(
        {
            "inputs": urls,
            "output": str(root / "out"),
            "model": {"preset": "tiny", "random_weights": True},
            "encode": {"batch_size": 4},
            "run": {"max_error_rate": 0.6},
        }
    )
    ledger = Ledger(cfg.output)
    ledger.start_run({"fingerprint": "test", "output_settings": {"preset": "tiny"}}, allow_change=False)
    ledger.write_plan({f"part-{i:06d}": u for i, u in enumerate(urls)})
    worker = ShardWorker.from_config(cfg)
    for i, url in enumerate(urls):
        shard = Shard(f"part-{i:06d}", url, storage.input_version(url))
        try:
            worker.process(shard)
        except ShardError as e:  # what the job's driver records for a shard that failed
            ledger.mark_failed(
                shard.shard_id, {"shard_id": shard.shard_id, "reason": e.reason, "detail": e.detail}
            )
    worker.close()
    return root / "out"


@pytest.fixture(scope="module")
def report(out, tmp_path_factory):
    report_dir = tmp_path_factory.mktemp("report")
    args = ["inspect", str(out), "--random-weights", "--samples", str(SAMPLES), "--grid", str(GRID)]
    assert main([*args, "--report", str(report_dir)]) == 0
    return report_dir, json.loads((report_dir / "stats.json").read_text())


def all_rows(out):
    """key -> (shard, codes) for every committed row, read with pyarrow alone."""
    rows = {}
    for path in sorted((out / "data").glob("*.parquet")):
        t = pq.read_table(path, columns=["key", "codes"])
        codes = t.column("codes").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
        rows.update((k, (path.stem, c)) for k, c in zip(t.column("key").to_pylist(), codes))
    return rows


def decoded(codes, last_one=True):
    """The tiny preset's random-weights decoder run directly: (R, R, 3) uint8 image(s)."""
    offsets = np.cumsum([0] + [p * p for p in PATCH_NUMS])
    idx = [torch.from_numpy(codes[None, a:b].astype(np.int64)) for a, b in zip(offsets[:-1], offsets[1:])]
    with torch.inference_mode():
        imgs = build_model("tiny", seed=0).idxBl_to_img(idx, same_shape=True, last_one=last_one)
    as_uint8 = lambda x: ((x[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()  # noqa: E731
    return as_uint8(imgs) if last_one else [as_uint8(x) for x in imgs]


def original(shard_path, key):
    """The tar member of `key`, preprocessed again (64 px, VAR's transform), as (R, R, 3) uint8."""
    with tarfile.open(shard_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.rsplit(".", 1)[0] == key)
        return preprocess(tar.extractfile(member).read(), 64).transpose(1, 2, 0)


def test_figures_exist_at_their_sizes(report):
    report_dir, stats = report
    columns = 2 + len(PATCH_NUMS)  # original, decoded, one per scale; 64 px cells, 4 px gaps
    expected = {
        "reconstructions": (columns * 68 + 4, 30 + GRID * (16 + 64 + 4)),
        "codebook_usage": (1200, 450),
        "throughput": (1200, 400),
    }
    for name, size in expected.items():
        with Image.open(report_dir / f"{name}.png") as img:
            assert img.format == "PNG" and img.size == size, name
    grid = stats["quality"]["grid"]
    assert (grid["width"], grid["height"]) == expected["reconstructions"]


def test_grid_cells_are_the_original_the_decoded_image_and_each_scale(report, out):
    report_dir, stats = report
    grid, rows = stats["quality"]["grid"], all_rows(out)
    png = np.asarray(Image.open(report_dir / "reconstructions.png").convert("RGB"))
    c = grid["cell"]
    assert c == 64 and len(grid["row_tops"]) == GRID
    for i, top in enumerate(grid["row_tops"]):
        sample = stats["quality"]["per_sample"][i]
        shard, codes = rows[sample["key"]]
        assert shard == sample["shard"]
        cells = [png[top : top + c, col["left"] : col["left"] + c] for col in grid["columns"]]
        np.testing.assert_array_equal(cells[0], original(out.parent / f"{shard}.tar", sample["key"]))
        np.testing.assert_array_equal(cells[1], decoded(codes))
        for cell, after_scale in zip(cells[2:], decoded(codes, last_one=False), strict=True):
            np.testing.assert_array_equal(cell, after_scale)
        assert not np.array_equal(cells[2], cells[-1])  # the coarse picture is not the final one


def test_psnr_and_ssim_recomputed_independently_equal_stats(report, out):
    from skimage.metrics import structural_similarity

    _, stats = report
    q, rows = stats["quality"], all_rows(out)
    assert q["samples"] == len(q["per_sample"]) == SAMPLES and not q["missing_originals"]
    assert len({s["key"] for s in q["per_sample"]}) == SAMPLES
    for sample in q["per_sample"][:4]:
        ref = original(out.parent / f"{sample['shard']}.tar", sample["key"]).astype(np.float64)
        rec = decoded(rows[sample["key"]][1])
        mse = ((ref - rec) ** 2).mean()
        assert sample["psnr"] == pytest.approx(10 * np.log10(255**2 / mse), rel=1e-9)
        ssim = structural_similarity(ref.astype(np.uint8), rec, channel_axis=-1, data_range=255)
        assert sample["ssim"] == pytest.approx(ssim, rel=1e-9)
        assert sample["codes_agree"] == 1.0  # re-encoding the original gives the stored codes
    psnrs = [s["psnr"] for s in q["per_sample"]]
    assert q["psnr"]["mean"] == pytest.approx(np.mean(psnrs))
    assert q["psnr"]["p50"] == pytest.approx(np.median(psnrs))
    assert q["psnr"]["p5"] <= q["psnr"]["p50"] <= q["psnr"]["p95"]


def test_codebook_usage_counts_every_code(report, out):
    _, stats = report
    codes = np.stack([c for _, c in all_rows(out).values()])
    cb = stats["codebook"]
    assert cb["rows_counted"] == len(codes) == stats["rows"]
    offsets = np.cumsum([0] + [p * p for p in PATCH_NUMS])
    for k, scale in enumerate(cb["scales"]):
        values = codes[:, offsets[k] : offsets[k + 1]].ravel()
        freq = np.unique(values, return_counts=True)[1] / len(values)
        assert scale["positions"] == len(values)
        assert scale["used"] == len(freq) and scale["used_fraction"] == len(freq) / 64
        assert scale["entropy_bits"] == pytest.approx(-(freq * np.log2(freq)).sum(), abs=1e-12)
        assert scale["perplexity"] == pytest.approx(2 ** scale["entropy_bits"])


def test_errors_failed_shards_and_stage_seconds_come_from_out(report, out):
    _, stats = report
    markers = {p.stem: json.loads(p.read_text()) for p in (out / "_vqpipe" / "done").glob("*.json")}
    assert stats["shards"] == {"planned": 4, "done": 3, "failed": 1, "pending": 0}
    assert stats["failed_shards"]["part-000003"]["reason"] == "not_a_tar"
    errors = {}
    for path in (out / "_vqpipe" / "errors").glob("*.pq"):
        for e in pq.read_table(path).to_pylist():
            errors[path.stem, e["key"]] = e["reason"]
    by_reason = stats["errors_by_reason"]
    assert sum(v["count"] for v in by_reason.values()) == len(errors) == stats["errors"]
    for reason, v in by_reason.items():
        assert 1 <= len(v["examples"]) <= 3
        for ex in v["examples"]:
            assert errors[ex["shard"], ex["key"]] == reason
    assert EVIL_KEY in [ex["key"] for ex in by_reason["missing_image"]["examples"]]
    for shard_id, rec in markers.items():
        assert stats["stages"]["per_shard"][shard_id]["seconds"] == rec["seconds"]
    assert stats["stages"]["seconds"]["encode"] == pytest.approx(
        sum(r["seconds"]["encode"] for r in markers.values())
    )


def test_page_escapes_keys_and_inlines_every_image(report):
    report_dir, _ = report
    page = (report_dir / "index.html").read_text()
    assert EVIL_KEY not in page and "&lt;img src=x onerror=" in page
    assert page.count("<img ") == 3 and page.count('src="data:image/png;base64,') == 3
    assert "http://" not in page and "https://" not in page  # nothing to fetch: it opens offline


NO_BROWSER = find_browser() is None and not os.environ.get("VQPIPE_REQUIRE_BROWSER")  # CI sets it
needs_browser = pytest.mark.skipif(
    NO_BROWSER, reason="no Chromium (CI installs it: apt-get install chromium)"
)


@pytest.mark.slow  # a headless Chromium (~2 s to start): end to end
@needs_browser
def test_page_loads_in_headless_chromium_with_every_image(report):
    report_dir, _ = report
    page = load_page(report_dir / "index.html")
    assert page.errors == []
    assert [i["alt"] for i in page.images] == ["reconstructions", "codebook usage", "throughput by stage"]
    for img in page.images:
        assert img["complete"] and img["width"] > 0 and img["height"] > 0, img
    assert page.title.startswith("vqpipe inspect")


@pytest.mark.slow  # a headless Chromium (~2 s to start): end to end
@needs_browser
def test_the_browser_check_sees_broken_images_and_console_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        '<!doctype html><title>t</title><img alt="bad" src="data:image/png;base64,AAAA">'
        '<script>console.error("boom")</script>'
    )
    report = load_page(page)
    assert report.images == [{"alt": "bad", "width": 0, "height": 0, "complete": True}]
    assert any("boom" in e for e in report.errors)


def test_without_a_model_the_page_says_what_is_left_out(out, tmp_path):
    assert main(["inspect", str(out), "--report", str(tmp_path)]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["quality"] is None and "--checkpoint" in stats["model_note"]
    assert not (tmp_path / "reconstructions.png").exists()
    assert (tmp_path / "codebook_usage.png").exists()
    page = (tmp_path / "index.html").read_text()
    assert "Reconstructions and PSNR/SSIM are left out" in page and page.count("<img ") == 2


def test_decode_writes_the_decoded_image_of_each_key(out, tmp_path, caplog):
    rows = all_rows(out)
    keys = ["good1_2", "000002_000003"]
    assert (
        main(["decode", str(out), "--keys", ",".join(keys), "--to", str(tmp_path), "--random-weights"]) == 0
    )
    for key in keys:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"{key}.png")), decoded(rows[key][1]))
    assert (
        main(["decode", str(out), "--keys", "good1_2,nope", "--to", str(tmp_path), "--random-weights"]) == 2
    )
    assert "1 key(s) not in any committed shard" in caplog.text and "nope" in caplog.text
    assert main(["decode", str(out), "--keys", "good1_2", "--to", str(tmp_path)]) == 2


def test_status_json_for_scripts(out, capsys):
    assert main(["status", str(out), "--json"]) == 1  # a shard failed
    status = json.loads(capsys.readouterr().out)
    assert status["complete"] is False and status["failed_shards"] == {"part-000003": "not_a_tar"}
    assert status["shards"] == {"planned": 4, "done": 3, "failed": 1, "pending": 0}


def test_bad_inspect_arguments_are_usage_errors(out, tmp_path, caplog):
    assert main(["inspect", str(out), "--samples", "0", "--report", str(tmp_path)]) == 2
    assert "samples must be at least 1" in caplog.text
    assert main(["inspect", str(tmp_path / "nothing"), "--report", str(tmp_path)]) == 2
    assert "not a vqpipe output" in caplog.text


@pytest.mark.slow  # a second whole report, through memory://
def test_a_remote_out_gives_the_same_report(out, report, tmp_path, monkeypatch):
    """OUT on another filesystem (fsspec's memory://, read through vqpipe.storage): same numbers; the report
    goes to ./<name>-report by default."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(out), "/remote/out", recursive=True)
    monkeypatch.chdir(tmp_path)
    try:
        args = [
            "inspect",
            "memory://remote/out",
            "--random-weights",
            "--samples",
            str(SAMPLES),
            "--grid",
            "1",
        ]
        assert main(args) == 0
    finally:
        fs.rm("/remote", recursive=True)
    remote = json.loads((tmp_path / "out-report" / "stats.json").read_text())
    _, local = report
    assert remote["codebook"] == local["codebook"] and remote["errors_by_reason"] == local["errors_by_reason"]
    assert remote["quality"]["per_sample"] == local["quality"]["per_sample"]


@pytest.mark.slow  # a second whole report (6 x 6 grid)
def test_an_original_that_cannot_be_fetched_is_named_and_left_grey(out, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    marker = copy / "_vqpipe" / "done" / "part-000000.json"
    rec = json.loads(marker.read_text())
    rec["input"]["url"] = str(tmp_path / "moved-away.tar")
    marker.write_text(json.dumps(rec))
    report_dir = tmp_path / "report"
    args = [
        "inspect",
        str(copy),
        "--random-weights",
        "--samples",
        "6",
        "--grid",
        "6",
        "--report",
        str(report_dir),
    ]
    assert main(args) == 0
    q = json.loads((report_dir / "stats.json").read_text())["quality"]
    lost = [s for s in q["per_sample"] if s["shard"] == "part-000000"]
    assert lost and len(lost) < 6  # the seed draws rows from several shards
    assert [m["key"] for m in q["missing_originals"]] == [s["key"] for s in lost]
    assert all("moved-away.tar" in m["reason"] and "psnr" not in m for m in q["missing_originals"])
    assert q["psnr"]["n"] == 6 - len(lost)
    png = np.asarray(Image.open(report_dir / "reconstructions.png").convert("RGB"))
    g = q["grid"]
    for top, sample in zip(g["row_tops"], q["per_sample"]):
        first = png[top : top + g["cell"], g["columns"][0]["left"] : g["columns"][0]["left"] + g["cell"]]
        assert (first == 128).all() == (sample["shard"] == "part-000000")
