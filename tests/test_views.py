"""Augmented views: names and config, crop geometry against PIL references, exact codes per view, and the
worker's rows and accounting (in-process, no Ray); one end-to-end job with crops10 (slow)."""

import argparse
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from shards import defect_samples, good_image_bytes, write_shard

from vqpipe.cli import overrides, tokenize_arguments
from vqpipe.config import build_config, fingerprint, from_sources, output_settings
from vqpipe.data import fixed_list_to_numpy
from vqpipe.errors import ConfigError
from vqpipe.model import build_model, exact_mode
from vqpipe.preprocess import crop_views, preprocess, preprocess_views, resized_size
from vqpipe.views import ALL_VIEWS, parse_views

R = 64  # the tiny preset's resolution


def _config(tmp_path, **encode):
    return build_config(
        {
            "inputs": [str(tmp_path / "part-000000.tar")],
            "output": str(tmp_path / "out"),
            "model": {"preset": "tiny", "random_weights": True, "device": "cpu"},
            "encode": {"batch_size": 4, "var_input": False, **encode},
            "run": {"max_error_rate": 0.9},
        }
    )


# --- names and config ---------------------------------------------------------------------------------------


def test_groups_expand_in_canonical_order_whatever_the_order_asked():
    assert parse_views(["center"]) == ("center",)
    assert parse_views("crops5") == ("center", "tl", "tr", "bl", "br")
    assert len(parse_views("crops10")) == 10 and set(parse_views("crops10")) == set(ALL_VIEWS)
    assert parse_views("hflip") == ("center+hflip",)
    assert parse_views("br,center, tl+hflip") == ("center", "br", "tl+hflip")
    assert parse_views(["crops5", "center", "hflip"]) == parse_views("hflip,crops5")
    assert all(v.endswith("+hflip") for v in parse_views("crops10")[5:])


@pytest.mark.parametrize(
    "value, message",
    [("centre", "unknown view 'centre'"), ("", "unknown view ''"), ([], "at least one view"), (5, "list")],
)
def test_bad_views_name_the_key(tmp_path, value, message):
    with pytest.raises(ConfigError, match=f"encode.views: .*{message}"):
        _config(tmp_path, views=value)


def test_device_decode_refuses_views_other_than_center(tmp_path):
    with pytest.raises(ConfigError, match="encode.views: center,center\\+hflip needs encode.decode = pil"):
        _config(tmp_path, views=["center", "hflip"], decode="device")
    assert _config(tmp_path, views=["center"], decode="device").encode.views == ("center",)


def test_cli_flag_and_config_file(tmp_path):
    parser = argparse.ArgumentParser()
    tokenize_arguments(parser)
    args = parser.parse_args(
        ["x.tar", "-o", "out", "--model", "tiny", "--random-weights", "--views", "crops5"]
    )
    (tmp_path / "job.toml").write_text('[encode]\nviews = ["hflip", "center"]\n')
    assert from_sources(None, overrides(args)).encode.views == parse_views("crops5")
    assert from_sources(str(tmp_path / "job.toml"), overrides(args)).encode.views == parse_views("crops5")
    args = parser.parse_args(["x.tar", "-o", "out", "--model", "tiny", "--random-weights"])
    assert from_sources(str(tmp_path / "job.toml"), overrides(args)).encode.views == (
        "center",
        "center+hflip",
    )


def test_default_views_keep_the_fingerprint_outs_already_have(tmp_path):
    # Pinned from the code before views existed (format 1.0): an existing OUT must accept a default rerun.
    assert fingerprint(output_settings(_config(tmp_path), "abc")) == "ad0a2f5f1d1c9e9e"
    # With var_input, 1.1's nested-list layout must not be mixed into a 1.0 OUT (fixed_shape_tensor files):
    # that fingerprint (pinned from 1.0) changes.
    with_var_input = output_settings(_config(tmp_path, var_input=True), "abc")
    assert with_var_input["var_input_layout"] == "fixed_size_list"
    assert fingerprint(with_var_input) != "0e7ef631dccad931"
    center = output_settings(_config(tmp_path, views="center"), "abc")
    crops = output_settings(_config(tmp_path, views="crops10"), "abc")
    assert "views" not in center and crops["views"] == list(parse_views("crops10"))
    assert fingerprint(crops) != fingerprint(center)
    assert output_settings(_config(tmp_path, views="tl,center"), "abc") == output_settings(
        _config(tmp_path, views="center,tl"), "abc"
    )


# --- geometry against PIL-made references ---------------------------------------------------------------------


def _reference_crop(resized: Image.Image, view: str) -> np.ndarray:
    """The crop as torchvision's FiveCrop / CenterCrop place it, cut and mirrored by PIL itself: (3, R, R)."""
    w, h = resized.size
    position, _, mirror = view.partition("+")
    left, top = {
        "center": (int(round((w - R) / 2.0)), int(round((h - R) / 2.0))),
        "tl": (0, 0),
        "tr": (w - R, 0),
        "bl": (0, h - R),
        "br": (w - R, h - R),
    }[position]
    crop = resized.crop((left, top, left + R, top + R))
    if mirror:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop).transpose(2, 0, 1)


@pytest.mark.parametrize("size", [(64, 48), (48, 97), (200, 73), (72, 72), (81, 300)])
def test_every_view_is_the_pil_crop_of_one_lanczos_resize(size):
    data = good_image_bytes(sum(size), "png", size)
    got = preprocess_views(data, R, ALL_VIEWS)
    assert got.shape == (10, 3, R, R) and got.dtype == np.uint8 and got.flags.c_contiguous
    resized = Image.open(io.BytesIO(data)).convert("RGB").resize(resized_size(*size, R), Image.LANCZOS)
    for view, pixels in zip(ALL_VIEWS, got):
        np.testing.assert_array_equal(pixels, _reference_crop(resized, view), err_msg=view)
    np.testing.assert_array_equal(got[0], preprocess(data, R))  # centre = the golden-checked transform
    assert len({p.tobytes() for p in got}) == 10  # ten different crops of a non-symmetric picture


def test_corners_are_flush_with_their_edges():
    """A picture whose pixels name their own coordinates, cropped without resampling."""
    w, h = 75, 70
    y, x = np.mgrid[0:h, 0:w]
    img = Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))
    crops = dict(zip(ALL_VIEWS, crop_views(img, R, ALL_VIEWS)))
    corner = {"tl": (0, 0), "tr": (w - R, 0), "bl": (0, h - R), "br": (w - R, h - R), "center": (6, 3)}
    for position, (left, top) in corner.items():  # center: round(5.5) = 6 and round(3.0) = 3
        assert (crops[position][0, 0, 0], crops[position][1, 0, 0]) == (left, top), position
        assert (
            crops[position + "+hflip"][0, 0, -1] == left
            and crops[position + "+hflip"][0, 0, 0] == left + R - 1
        )


def test_a_bad_image_is_one_error_whatever_the_views():
    with pytest.raises(Exception) as one:
        preprocess(b"not an image at all", R)
    with pytest.raises(Exception) as ten:
        preprocess_views(b"not an image at all", R, ALL_VIEWS)
    assert (
        (one.value.reason, one.value.detail)
        == (ten.value.reason, ten.value.detail)
        == (
            "not_an_image",
            one.value.detail,
        )
    )


# --- the worker: rows, accounting and exact codes ---------------------------------------------------------------


def _process(cfg):
    from vqpipe.plan import Shard
    from vqpipe.worker import ShardWorker

    worker = ShardWorker.from_config(cfg)
    try:
        return worker.process(Shard("part-000000", cfg.inputs[0])).to_json()
    finally:
        worker.close()


def _images(samples):
    return {
        s["__key__"]: next(v for k, v in s.items() if k not in ("__key__", "cls", "json")) for s in samples
    }


def test_worker_writes_one_row_per_view_and_one_error_per_bad_image(tmp_path, one_torch_thread):
    samples, expected = defect_samples(seed=3)
    write_shard(tmp_path / "part-000000.tar", samples)
    views = parse_views("crops5,tl+hflip")
    done = _process(_config(tmp_path, views=list(views), var_input=True))

    good = {k for k, reason in expected.items() if reason is None}
    assert done["samples"] == len(samples) and done["images"] == len(good)
    assert done["images"] + done["errors"] == done["samples"]
    assert done["rows"] == len(good) * len(views) and done["views"] == list(views)
    errors = pq.read_table(tmp_path / "out" / "_vqpipe" / "errors" / "part-000000.pq").to_pylist()
    assert sorted(e["key"] for e in errors) == sorted(k for k, r in expected.items() if r is not None)

    table = pq.read_table(tmp_path / "out" / "data" / "part-000000.parquet")
    assert table.column_names[:2] == ["key", "view"] and table.num_rows == done["rows"]
    pairs = list(zip(table.column("key").to_pylist(), table.column("view").to_pylist()))
    assert len(set(pairs)) == len(pairs) and set(pairs) == {(k, v) for k in good for v in views}
    # Rows come grouped by image, its views consecutive in canonical order (docs/views.md relies on it).
    assert [v for _, v in pairs] == list(views) * len(good)
    assert all(len({k for k, _ in pairs[i : i + len(views)]}) == 1 for i in range(0, len(pairs), len(views)))
    meta = json.loads(table.schema.metadata[b"vqpipe"])
    assert meta["views"] == list(views) and meta["format_version"] == "2.0"
    assert any("tl+hflip" in step for step in meta["preprocessing"]["steps"])
    assert meta["preprocessing"]["transform"] == "var_val_views"
    labels = dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist()))
    assert all(labels[k] == int(next(s for s in samples if s["__key__"] == k)["cls"]) for k in good)


def test_each_views_codes_are_the_models_codes_of_that_pil_crop(tmp_path, one_torch_thread):
    """Exact: codes equal img_to_idxBl of the PIL-made crop, in the job's own batches (SPEC §4)."""
    sizes = [(64, 48), (90, 130), (72, 72)]
    samples = [{"__key__": f"k{i}", "jpg": good_image_bytes(i, "jpg", s)} for i, s in enumerate(sizes)]
    write_shard(tmp_path / "part-000000.tar", samples)
    cfg = _config(tmp_path, views="crops10", var_input=True)
    done = _process(cfg)
    assert (done["images"], done["rows"], done["errors"]) == (3, 30, 0)

    table = pq.read_table(tmp_path / "out" / "data" / "part-000000.parquet")
    keys, views = table.column("key").to_pylist(), table.column("view").to_pylist()
    codes = np.asarray(table.column("codes").combine_chunks().flatten()).reshape(table.num_rows, -1)
    var_input = fixed_list_to_numpy(table.column("var_input"))
    images = _images(samples)
    resized = {
        k: Image.open(io.BytesIO(b)).convert("RGB").resize(resized_size(*s, R), Image.LANCZOS)
        for (k, b), s in zip(images.items(), sizes)
    }
    pixels = np.stack([_reference_crop(resized[k], v) for k, v in zip(keys, views)])
    model, batch = build_model("tiny", seed=0), cfg.encode.batch_size
    for start in range(0, len(keys), batch):
        x = torch.from_numpy(pixels[start : start + batch]).float() / 255 * 2 - 1
        with exact_mode(), torch.inference_mode():
            idx = model.img_to_idxBl(x)
            vi = model.idxBl_to_var_input(idx).to(torch.float16).numpy()
        np.testing.assert_array_equal(codes[start : start + batch], torch.cat(idx, dim=1).numpy())
        np.testing.assert_array_equal(var_input[start : start + batch], vi)
    assert len({c.tobytes() for c in codes}) > 20  # views of one image do get different codes


def test_default_run_writes_the_1_0_columns(tmp_path, one_torch_thread):
    samples = [{"__key__": f"k{i}", "png": good_image_bytes(i, "png")} for i in range(3)]
    write_shard(tmp_path / "part-000000.tar", samples)
    done = _process(_config(tmp_path))
    assert (done["samples"], done["images"], done["rows"], done["views"]) == (3, 3, 3, ["center"])
    schema = pq.read_schema(tmp_path / "out" / "data" / "part-000000.parquet")
    assert schema.names == ["key", "label", "meta", "codes"]
    assert json.loads(schema.metadata[b"vqpipe"])["views"] == ["center"]


# --- end to end on Ray --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_job_with_crops10(ray_session, tmp_path):
    from vqpipe.job import tokenize
    from vqpipe.ledger import Ledger
    from vqpipe.plan import shard_id

    samples = [{"__key__": f"k{i}", "jpg": good_image_bytes(i, "jpg", (70 + i, 64))} for i in range(3)]
    samples.insert(1, {"__key__": "bad", "jpg": b"\xff\xd8 not really a jpeg"})
    write_shard(tmp_path / "part-000000.tar", samples)
    cfg = _config(tmp_path, views="crops10", batch_size=8)  # 30 rows: the last batch holds no center view
    summary = tokenize(cfg)
    assert summary.ok
    done = Ledger(cfg.output).read_done(shard_id(str(tmp_path / "part-000000.tar"))).to_json()
    assert (done["samples"], done["images"], done["rows"], done["errors"]) == (4, 3, 30, 1)
    run = json.loads((tmp_path / "out" / "_vqpipe" / "run.json").read_text())
    assert (
        run["output_settings"]["views"] == list(parse_views("crops10")) and run["config"]["encode"]["views"]
    )
    # The training reader over the job's own output: one view of each good image per epoch, the row of that view.
    from vqpipe.data import TokenDataset

    table = pq.read_table(tmp_path / "out" / "data")
    rows = {(k, v): c for k, v, c in zip(*(table.column(n).to_pylist() for n in ("key", "view", "codes")))}
    for epoch in (0, 1):
        ds = TokenDataset(cfg.output, columns=("codes", "view"), seed=1)
        ds.set_epoch(epoch)
        items = list(ds)
        assert sorted(it["key"] for it in items) == ["k0", "k1", "k2"] and len(ds) == 3
        assert all(it["codes"].tolist() == rows[(it["key"], it["view"])] for it in items)
