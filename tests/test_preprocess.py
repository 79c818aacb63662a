"""vqpipe.preprocess: VAR-exact pixels against torchvision's golden output, and every rejection reason."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from shards import bomb_png_bytes, corrupt_jpeg_bytes, defect_samples, good_image_bytes, truncated_bytes
from var_fixtures import committed, shared

from vqpipe.errors import SampleError
from vqpipe.preprocess import (
    IMAGE_EXTENSIONS,
    PIL_FORMATS,
    center_crop,
    decode_image,
    preprocess,
    resized_size,
    val_transform,
)

# The full fixture (12 cases, 256 and 512 px) lives in ../shared/var/; a committed subset (7 cases, 256 px:
# grey, RGBA, palette, an upscale, both strips and a photo) runs in every clone.
FIXTURES = {
    "mini": lambda: committed("golden_preprocess_mini.npz"),
    "full": lambda: shared("golden_preprocess.npz"),
}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _reason(data: bytes, **kwargs) -> SampleError:
    with pytest.raises(SampleError) as info:
        preprocess(data, 256, **kwargs)
    return info.value


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def golden(request) -> dict[str, tuple[Image.Image, dict[int, np.ndarray]]]:
    """name -> (the source PIL image rebuilt as torchvision saw it, {R: expected uint8 (3, R, R)})."""
    with np.load(FIXTURES[request.param](), allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        cases = {}
        for name, info in meta.items():
            src = z[f"src_{name}"]
            img = Image.frombytes(info["mode"], tuple(info["size"]), src.tobytes())
            if info["mode"] == "P":
                img.putpalette(z[f"palette_{name}"].tolist())
            cases[name] = (img, {r: z[f"out{r}_{name}"] for r in (256, 512) if f"out{r}_{name}" in z.files})
    assert len(cases) == (12 if request.param == "full" else 7)
    return cases


# Pillow is pinned to 13.0.0 (the version that produced the fixture), so equality is exact: LANCZOS output
# may move by one level across Pillow versions, and then this test is expected to fail loudly.
@pytest.mark.parametrize("resolution", [256, 512])
def test_val_transform_matches_torchvision_golden_exactly(golden, resolution):
    mismatches = []
    for name, (img, expected) in golden.items():
        if resolution not in expected:
            continue
        out = val_transform(img.convert("RGB"), resolution)
        assert out.shape == (3, resolution, resolution) and out.dtype == np.uint8
        if not np.array_equal(out, expected[resolution]):
            diff = np.abs(out.astype(int) - expected[resolution]).max()
            mismatches.append(f"{name}: max |diff| {diff}")
    assert not mismatches, mismatches


def test_preprocess_from_png_bytes_matches_golden(golden):
    """The whole bytes path (open, PIL's convert of L/RGBA/P, transform) on lossless re-encodings."""
    for name, (img, expected) in golden.items():
        data = _png(img)
        for resolution in expected:
            np.testing.assert_array_equal(preprocess(data, resolution), expected[resolution], err_msg=name)


def test_resized_size_follows_torchvision():
    assert resized_size(640, 427, 256) == (int(288 * 640 / 427), 288)
    assert resized_size(90, 427, 256) == (288, int(288 * 427 / 90))
    assert resized_size(512, 512, 512) == (576, 576)
    assert resized_size(10, 10, 100) == (112, 112)  # round(112.5) is 112: half to even, like VAR


@pytest.mark.parametrize("size", [(5, 3), (4, 9), (10, 10), (7, 20), (40, 6), (9, 9)])
def test_center_crop_pads_like_torchvision_when_smaller(size):
    """torchvision pads with zeros (floor half left/top), then crops with int(round(...)) offsets."""
    w, h = size
    crop = 8
    arr = np.arange(1, w * h * 3 + 1, dtype=np.uint8).reshape(h, w, 3) | 1  # no zeros in the image
    pl, pt = max(crop - w, 0) // 2, max(crop - h, 0) // 2
    padded = np.pad(arr, ((pt, max(crop - h, 0) - pt), (pl, max(crop - w, 0) - pl), (0, 0)))
    top = int(round((padded.shape[0] - crop) / 2.0))
    left = int(round((padded.shape[1] - crop) / 2.0))
    expected = padded[top : top + crop, left : left + crop]
    np.testing.assert_array_equal(np.asarray(center_crop(Image.fromarray(arr), crop)), expected)


# --- every rejection reason, with real bytes -------------------------------------------------------------


def test_empty():
    err = _reason(b"")
    assert (err.reason, err.detail) == ("empty", "0 bytes")


@pytest.mark.parametrize("data", [b"hello, this is text in a .jpg\n", bytes(range(256)) * 4, b"\x00"])
def test_not_an_image(data):
    assert _reason(data).reason == "not_an_image"


def test_corrupt_jpeg_is_decode_error():
    data = corrupt_jpeg_bytes(1)
    Image.open(io.BytesIO(data))  # the header still parses: the failure happens while decoding
    err = _reason(data)
    assert err.reason == "decode_error"
    assert "broken data stream" in err.detail


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_truncated(fmt):
    assert _reason(truncated_bytes(2, fmt)).reason == "truncated"


def test_decompression_bomb_is_rejected_from_the_header():
    data = bomb_png_bytes(30_000, 30_000)  # 900 M pixels declared; a few rows of data actually present
    assert len(data) < 1000
    start = time.perf_counter()
    err = _reason(data)
    assert err.reason == "too_large"
    assert "900,000,000" in err.detail
    assert time.perf_counter() - start < 1.0


def test_between_pil_warning_and_error_thresholds():
    """PIL warns for 100 M pixels (it errors only above ~179 M); our check rejects before decoding."""
    with pytest.warns(Image.DecompressionBombWarning):
        err = _reason(bomb_png_bytes(10_000, 10_000))
    assert err.reason == "too_large"
    assert "10000x10000" in err.detail


def test_max_pixels_is_checked_before_decoding():
    err = _reason(good_image_bytes(0, "jpg", (64, 48)), max_pixels=1000)
    assert err.reason == "too_large"
    assert "64x48" in err.detail
    assert _reason(bomb_png_bytes(100, 100), max_pixels=9999).reason == "too_large"  # short data: not decoded
    assert preprocess(good_image_bytes(0, "jpg", (64, 48)), 256, max_pixels=64 * 48).shape == (3, 256, 256)


def test_extreme_aspect_ratio_is_too_large_not_gigabytes():
    data = _png(Image.new("RGB", (4000, 1), (10, 20, 30)))  # would resize to 1_152_000 x 288
    err = _reason(data)
    assert err.reason == "too_large"
    assert "1152000x288" in err.detail
    strip = _png(Image.new("RGB", (100, 1), (10, 20, 30)))  # 28_800 x 288: allowed
    assert (preprocess(strip, 256) == np.array([10, 20, 30], np.uint8)[:, None, None]).all()
    assert _reason(strip, max_resized_pixels=28_800 * 288 - 1).reason == "too_large"


def test_errors_are_short_and_carry_no_traceback():
    for data in (b"", b"text", corrupt_jpeg_bytes(0), truncated_bytes(0), bomb_png_bytes()):
        err = _reason(data)
        assert 0 < len(err.detail) <= 200
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def test_bad_resolution_is_a_caller_error():
    with pytest.raises(ValueError):
        preprocess(good_image_bytes(0), 0)


# --- unusual but valid images ----------------------------------------------------------------------------

VALID = [
    ("png", (48, 40), "L"),
    ("jpg", (48, 40), "L"),
    ("png", (40, 40), "LA"),
    ("jpg", (56, 40), "CMYK"),
    ("png", (64, 64), "P"),
    ("gif", (32, 48), "P"),
    ("png", (48, 64), "RGBA"),
    ("webp", (48, 64), "RGBA"),
    ("png", (40, 30), "I;16"),
    ("png", (33, 17), "1"),
    ("jpg", (5, 3), "RGB"),  # far smaller than the crop
    ("png", (96, 4), "RGB"),  # a very thin strip
    ("jpg", (3, 90), "RGB"),
    ("bmp", (30, 20), "RGB"),
    ("tiff", (30, 20), "RGB"),
    ("ppm", (30, 20), "RGB"),
    ("pgm", (30, 20), "L"),
    ("webp", (30, 20), "RGB"),
]


@pytest.mark.parametrize(("fmt", "size", "mode"), VALID, ids=[f"{m}-{f}-{s[0]}x{s[1]}" for f, s, m in VALID])
def test_valid_unusual_images_match_var_loader(fmt, size, mode):
    data = good_image_bytes(7, fmt, size, mode)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.size == size
        expected = val_transform(opened.convert("RGB"), 256)  # VAR: Image.open(f).convert('RGB')
    out = preprocess(data, 256)
    assert out.shape == (3, 256, 256) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_alpha_is_dropped_without_compositing():
    img = Image.new("RGBA", (20, 20), (200, 100, 50, 0))  # fully transparent
    out = preprocess(_png(img), 256)
    assert (out[:, 0, 0] == [200, 100, 50]).all() and (out == out[:, :1, :1]).all()


def test_16_bit_grey_is_clipped_by_pils_convert():
    """Observed with Pillow 13: I;16 -> RGB clips at 255 rather than scaling 0..65535 to 0..255."""
    arr = np.array([[0, 200, 255, 256, 65535]], dtype=np.uint16)
    img = decode_image(_png(Image.fromarray(arr)))
    assert np.asarray(img)[0, :, 0].tolist() == [0, 200, 255, 255, 255]


def test_exif_orientation_is_not_applied():
    img = Image.fromarray(np.zeros((32, 64, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).size == (64, 32)


def test_image_extensions_map_to_allowed_pil_formats():
    assert IMAGE_EXTENSIONS[0] == "jpg" and len(set(IMAGE_EXTENSIONS)) == len(IMAGE_EXTENSIONS)
    registered = Image.registered_extensions()
    for ext in IMAGE_EXTENSIONS:
        assert ext == ext.lower()
        assert registered[f".{ext}"] in PIL_FORMATS, ext


def test_defect_samples_give_their_expected_reasons():
    """The shard helper used by end-to-end tests: each sample's image yields exactly its expected reason."""
    samples, expected = defect_samples(3)
    assert set(expected.values()) >= {
        None,
        "decode_error",
        "truncated",
        "not_an_image",
        "missing_image",
        "too_large",
        "empty",
    }
    for sample in samples:
        suffix = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if suffix is None:
            got = "missing_image"
        else:
            try:
                assert preprocess(sample[suffix], 64).shape == (3, 64, 64)
                got = None
            except SampleError as err:
                got = err.reason
        assert got == expected[sample["__key__"]], json.loads(sample["json"])["case"]


def test_decode_is_thread_safe():
    inputs = [
        good_image_bytes(s, f, (40 + s, 30), m) for s, (f, m) in enumerate([("jpg", "RGB"), ("png", "P")] * 4)
    ]
    inputs += [b"", b"text", corrupt_jpeg_bytes(0), truncated_bytes(0), bomb_png_bytes()]

    def run(data: bytes):
        try:
            return preprocess(data, 64)
        except SampleError as err:
            return err.reason

    sequential = [run(d) for d in inputs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(5):
            concurrent = list(pool.map(run, inputs * 4))
            for got, want in zip(concurrent, sequential * 4):
                if isinstance(want, str):
                    assert got == want
                else:
                    np.testing.assert_array_equal(got, want)


def test_light_imports():
    code = "import sys, vqpipe.preprocess, vqpipe.sample; print(sorted({'torch', 'ray', 'fsspec'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
