"""vqpipe.device_decode against the exact PIL path, and jpeg_probe.probe_jpeg.

The resize tests need torch only (CI). The decoder tests need torchvision and run on the CPU, where
torchvision decodes with libjpeg-turbo as PIL does; nvJPEG on a GPU is measured by
benchmarks/device_decode_agreement.py, not here.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from shards import bomb_png_bytes, corrupt_jpeg_bytes, good_image_bytes, truncated_bytes

from vqpipe.device_decode import DeviceDecoder, _center_crop, resize_center_crop, unavailable_reason
from vqpipe.errors import SampleError
from vqpipe.jpeg_probe import probe_jpeg
from vqpipe.preprocess import center_crop, decode_image, preprocess, resized_size
from vqpipe.sample import write_sample_dataset

R = 256

# torchvision 0.29 warns on every decode_jpeg call that its image decoders are deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _pil_tensor(data: bytes) -> torch.Tensor:
    """The exact path's decoded pixels, full size, as (3, H, W) uint8: isolates the resampling."""
    return torch.from_numpy(np.asarray(decode_image(data)).transpose(2, 0, 1).copy())


def _lanczos_shifted(data: bytes, dx: int, dy: int) -> np.ndarray:
    """The exact path with its crop box moved by (dx, dy) resized pixels: what a geometry error costs."""
    img = decode_image(data)
    new_w, new_h = resized_size(*img.size, R)
    big = img.resize((new_w, new_h), Image.Resampling.LANCZOS) if (new_w, new_h) != img.size else img
    left, top = round((new_w - R) / 2) + dx, round((new_h - R) / 2) + dy
    return np.asarray(big.crop((left, top, left + R, top + R))).transpose(2, 0, 1)


def _abs_diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory) -> list[bytes]:
    """48 JPEG and PNG crops of real photos: ordinary sizes, small ones, tall and wide strips."""
    images = []
    for path in write_sample_dataset(tmp_path_factory.mktemp("sample"), shards=2, samples_per_shard=24):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith((".jpg", ".png")):
                    images.append(tar.extractfile(member).read())
    assert len(images) == 48
    return images


# --- resize_center_crop (torch only) ---------------------------------------------------------------------


@pytest.mark.slow  # a measurement over 48 photos at 256 px (the geometry tests below stay in the unit layer)
def test_resize_is_close_to_lanczos_on_real_photos(sample_images, one_torch_thread):
    """Bounds measured on these 48 images (torch 2.13/2.14 CPU): mean |diff| 0.45, p99 4, max 24, 67% of
    pixels equal, worst image 1.8. Always antialiasing gives mean 0.56; a one-pixel crop shift gives 3.6."""
    diffs, shifted, worst = [], [], 0.0
    for data in sample_images:
        got = resize_center_crop(_pil_tensor(data), R)
        want = preprocess(data, R)
        assert got.shape == (3, R, R) and got.dtype == torch.uint8
        diff = _abs_diff(got, want)
        diffs.append(diff.ravel())
        worst = max(worst, float(diff.mean()))
        shifted.append(_abs_diff(_lanczos_shifted(data, 1, 0), want).mean())
    diff = np.concatenate(diffs)
    assert diff.mean() < 0.5
    assert np.percentile(diff, 99) <= 5
    assert diff.max() <= 32
    assert np.mean(diff == 0) >= 0.64
    assert worst <= 2.5
    assert np.mean(shifted) > 4 * diff.mean()


def _waves(width: int, height: int, period: float) -> np.ndarray:
    """Sine waves along x, y and the diagonal: a shift of the sampling grid shows, the kernel hardly does."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    chans = [np.sin(2 * np.pi * x / period), np.sin(2 * np.pi * y / period), np.sin(np.pi * (x + y) / period)]
    return np.clip(127.5 + 100 * np.stack(chans, axis=-1), 0, 255).round().astype(np.uint8)


# (width, height): enlarged strips and small images, shrunk photos, an image just above the resized size
GEOMETRY = [
    (100, 300),
    (300, 100),
    (30, 640),
    (640, 30),
    (17, 23),
    (250, 251),
    (1000, 700),
    (700, 1900),
    (289, 1000),
]


@pytest.mark.parametrize("size", GEOMETRY, ids=[f"{w}x{h}" for w, h in GEOMETRY])
def test_same_crop_box_as_the_pil_path(size):
    """Measured: mean |diff| 0.16-1.33 here; moving the exact path's box by one resized pixel (half a source
    pixel when enlarging, where one resized pixel is a sliver of the source) costs 13-100 times that."""
    width, height = size
    scale = min(resized_size(width, height, R)) / min(width, height)
    data = _png(_waves(width, height, period=max(12 / scale, 5)))  # 12 px per period after, 5 before
    want = preprocess(data, R)
    got = resize_center_crop(_pil_tensor(data), R).numpy()
    assert got.shape == want.shape == (3, R, R)
    err = _abs_diff(got, want).mean()
    step = max(1, round(scale / 2))
    misplaced = min(
        _abs_diff(_lanczos_shifted(data, dx, dy), want).mean() for dx, dy in ((step, 0), (0, step))
    )
    assert err < 1.5
    assert err < misplaced / 8, (err, misplaced)


@pytest.mark.parametrize("size", [(288, 400), (500, 288), (288, 288)])
def test_no_resize_is_bit_exact(sample_images, size):
    """When resized_size keeps the size, only the crop remains: equal to the PIL path bit for bit."""
    photo = decode_image(next(d for d in sample_images if decode_image(d).width >= 100))
    data = _png(np.asarray(photo.resize(size)))  # any real content at that size
    assert resized_size(*size, R) == size
    np.testing.assert_array_equal(resize_center_crop(_pil_tensor(data), R).numpy(), preprocess(data, R))


def test_batch_equals_one_by_one(sample_images):
    same_size = [_pil_tensor(_jpeg(decode_image(d).resize((320, 200)))) for d in sample_images[:4]]
    batch = resize_center_crop(torch.stack(same_size), R)
    assert batch.shape == (4, 3, R, R)
    for one, img in zip(batch, same_size):
        assert torch.equal(one, resize_center_crop(img, R))


@pytest.mark.parametrize("size", [(5, 3), (4, 9), (10, 10), (7, 20), (40, 6), (9, 9), (8, 8)])
def test_crop_box_and_zero_padding_match_center_crop(size):
    """The crop alone, including torchvision's zero padding (unreachable after resized_size, kept exact)."""
    w, h = size
    arr = (np.arange(w * h * 3, dtype=np.int64).reshape(h, w, 3) % 254 + 1).astype(np.uint8)  # no zeros
    got = _center_crop(torch.from_numpy(arr).permute(2, 0, 1), 8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, np.asarray(center_crop(Image.fromarray(arr), 8)))


def test_bad_input_is_a_caller_error():
    img = torch.zeros(3, 10, 10, dtype=torch.uint8)
    for bad in (img.float(), img[:1], img[0]):
        with pytest.raises(ValueError):
            resize_center_crop(bad, R)
    with pytest.raises(ValueError):
        resize_center_crop(img, 0)


# --- probe_jpeg --------------------------------------------------------------------------------------------


def _photo(size=(64, 48), mode="RGB") -> Image.Image:
    return Image.open(io.BytesIO(good_image_bytes(3, "png", size))).convert(mode)


def _with_frame(data: bytes, marker: int) -> bytes:
    """The same JPEG with its SOF0 marker relabelled (PIL still parses the header)."""
    at = data.index(b"\xff\xc0")
    return data[: at + 1] + bytes([marker]) + data[at + 2 :]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: _jpeg(_photo()), (64, 48)),
        (lambda: _jpeg(_photo(), progressive=True), (64, 48)),
        (lambda: _jpeg(_photo((40, 30), "L")), (40, 30)),
        (lambda: _jpeg(_photo(), subsampling=0), (64, 48)),
        (lambda: good_image_bytes(1, "png"), None),
        (lambda: good_image_bytes(1, "webp"), None),
        (lambda: good_image_bytes(1, "jpg", (56, 40), "CMYK"), None),
        (lambda: _jpeg(_photo(), keep_rgb=True), None),  # stored as RGB (Adobe transform 0), not YCbCr
        (lambda: _with_frame(_jpeg(_photo()), 0xC3), None),  # lossless
        (lambda: _with_frame(_jpeg(_photo()), 0xC9), None),  # arithmetic coding
    ],
    ids=[
        "baseline",
        "progressive",
        "grey",
        "444",
        "png",
        "webp",
        "cmyk",
        "rgb-stored",
        "lossless",
        "arithmetic",
    ],
)
def test_probe_jpeg(make, expected):
    assert probe_jpeg(make()) == expected


def test_probe_finds_the_frame_after_an_exif_thumbnail():
    exif = Image.Exif()
    exif[0x010F] = "camera"
    thumb = _with_frame(_jpeg(_photo((16, 12))), 0xC3)  # a lossless frame inside APP1, before the real one
    data = _jpeg(_photo(), exif=exif.tobytes() + thumb)
    assert data.index(b"\xff\xc3") < data.index(b"\xff\xc0")
    assert probe_jpeg(data) == (64, 48)


def _with_header(width: int = 64, height: int = 48, bits: int = 8) -> bytes:
    """A JPEG whose frame header says width×height and `bits` per sample (the data stays 64×48×8)."""
    data = bytearray(_jpeg(_photo()))
    at = data.index(b"\xff\xc0") + 4  # marker, length, then precision, height, width
    data[at : at + 5] = bytes([bits]) + height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "kwargs", "reason"),
    [
        (b"", {}, "empty"),
        (b"GIF89a? no, just text", {}, "not_an_image"),
        (bomb_png_bytes(), {}, "too_large"),
        (_with_header(60_000, 60_000), {}, "too_large"),  # PIL's own bomb error, from the header
        pytest.param(
            _with_header(10_000, 9_000),  # above our limit, below PIL's error (PIL warns)
            {},
            "too_large",
            marks=pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
        ),
        (good_image_bytes(0, "jpg", (64, 48)), {"max_pixels": 1000}, "too_large"),
        (good_image_bytes(0, "jpg")[:120], {}, "truncated"),  # cut inside the header
        (_with_header(bits=12), {}, "not_an_image"),  # PIL's JPEG plugin refuses 12-bit at open
    ],
    ids=["empty", "text", "bomb-png", "bomb-jpeg", "over-limit-jpeg", "max-pixels", "cut-header", "12-bit"],
)
def test_probe_errors_equal_decode_image_errors(data, kwargs, reason):
    with pytest.raises(SampleError) as probed:
        probe_jpeg(data, **kwargs)
    with pytest.raises(SampleError) as decoded:
        decode_image(data, **kwargs)
    assert probed.value.reason == reason
    assert (probed.value.reason, probed.value.detail) == (decoded.value.reason, decoded.value.detail)


def test_probe_leaves_damaged_pixel_data_to_the_decoder():
    """The header is fine, so the probe says yes; the decode fails, and the PIL fallback names the reason."""
    assert probe_jpeg(corrupt_jpeg_bytes(0)) == (64, 64)
    assert probe_jpeg(truncated_bytes(0)) == (96, 96)


# --- unavailable_reason, and the decoder itself (torchvision on the CPU) ----------------------------------


def test_reason_without_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` raise ImportError
    reason = unavailable_reason(torch.device("cpu"))
    assert "torchvision" in reason and "pip install" in reason and "\n" not in reason
    with pytest.raises(RuntimeError, match="torchvision"):
        DeviceDecoder(torch.device("cpu"), R)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_reason_without_cuda():
    assert "CUDA" in unavailable_reason(torch.device("cuda"))
    with pytest.raises(RuntimeError, match="CUDA"):
        DeviceDecoder(torch.device("cuda"), R)


def test_reason_for_other_devices():
    assert "mps" in unavailable_reason(torch.device("mps"))


@pytest.mark.slow  # a fresh interpreter importing torch
def test_torchvision_is_imported_lazily():
    code = "import sys, vqpipe.device_decode; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def decoder() -> DeviceDecoder:
    pytest.importorskip("torchvision")
    return DeviceDecoder(torch.device("cpu"), R)


def test_reason_is_none_where_it_works(decoder):
    assert unavailable_reason(torch.device("cpu")) is None


def test_cpu_decode_equals_pil_decode(decoder, sample_images):
    """torchvision (libjpeg-turbo) and PIL decode every sample JPEG to the same pixels (measured: all equal),
    so on the CPU the device path differs from the exact one by the resampling alone."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [d for d in sample_images if probe_jpeg(d) is not None]
    assert len(jpegs) >= 20
    for data in jpegs:
        got = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert torch.equal(got, _pil_tensor(data))
    for got, data in zip(decoder(jpegs), jpegs):
        assert torch.equal(got, resize_center_crop(_pil_tensor(data), R))


def test_a_bad_jpeg_only_affects_itself(decoder):
    good, grey = good_image_bytes(1, "jpg", (64, 48)), good_image_bytes(2, "jpg", (40, 30), "L")
    batch = [good, corrupt_jpeg_bytes(1), truncated_bytes(1), b"", good_image_bytes(1, "png"), grey]
    out = decoder(batch)
    assert [isinstance(o, Exception) for o in out] == [False, True, True, True, True, False]
    for i in (0, 5):
        assert out[i].shape == (3, R, R) and out[i].dtype == torch.uint8
        assert torch.equal(out[i], decoder([batch[i]])[0])
        assert torch.equal(out[i], resize_center_crop(_pil_tensor(batch[i]), R))
    assert decoder([]) == []


def test_exif_orientation_is_not_applied(decoder):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"; VAR's loader ignores it
    data = _jpeg(_photo((64, 32)), exif=exif.tobytes())
    assert torch.equal(decoder([data])[0], resize_center_crop(_pil_tensor(data), R))


def test_extreme_strip_is_refused_before_resizing(decoder):
    data = _jpeg(Image.new("RGB", (4000, 1), (10, 20, 30)))  # would resize to 1_152_000 x 288
    (out,) = decoder([data])
    assert isinstance(out, SampleError) and out.reason == "too_large" and "1152000x288" in out.detail


# -- through the worker: encode.decode = "device" ---------------------------------------------------------------


def _worker_config(shard, out, decode: str):
    from vqpipe.config import build_config

    return build_config(
        {
            "inputs": [str(shard)],
            "output": str(out),
            "model": {"preset": "tiny", "random_weights": True, "device": "cpu"},
            "encode": {"batch_size": 4, "decode": decode},
            "run": {"max_error_rate": 0.9},
        }
    )


def _process(cfg, shard) -> dict:
    from vqpipe.plan import Shard
    from vqpipe.worker import ShardWorker

    worker = ShardWorker.from_config(cfg)
    try:
        return worker.process(Shard(shard.stem, str(shard))).to_json()
    finally:
        worker.close()


def test_device_decode_without_torchvision_stops_the_replica_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    from vqpipe.worker import ShardWorker

    with pytest.raises(RuntimeError, match="device decode needs torchvision"):
        ShardWorker.from_config(_worker_config(tmp_path / "x.tar", tmp_path / "out", "device"))


def test_worker_device_decode_accounts_for_every_sample_and_measures_itself(tmp_path, one_torch_thread):
    pytest.importorskip("torchvision")
    import pyarrow.parquet as pq
    from shards import defect_samples, write_shard

    samples, expected = defect_samples(seed=4)
    shard = tmp_path / "part-000000.tar"
    write_shard(shard, samples)
    exact = _process(_worker_config(shard, tmp_path / "pil", "pil"), shard)
    fast = _process(_worker_config(shard, tmp_path / "dev", "device"), shard)

    assert fast["decode"] == "device" and fast["samples"] == len(samples)
    assert fast["rows"] == exact["rows"] and fast["errors_by_reason"] == exact["errors_by_reason"]
    agreement = fast["agreement_with_exact"]
    assert agreement["decode"] == "device" and len(agreement["per_scale"]) == 4
    assert exact.get("agreement_with_exact") is None  # the exact path has nothing to measure

    def rows(out):
        table = pq.read_table(next((out / "data").glob("*.parquet")))
        return dict(zip(table.column("key").to_pylist(), table.column("codes").to_pylist()))

    pil_rows, dev_rows = rows(tmp_path / "pil"), rows(tmp_path / "dev")
    assert set(dev_rows) == {k for k, reason in expected.items() if reason is None}
    cases = {s["__key__"]: s for s in samples}
    for key, codes in dev_rows.items():
        image = next(v for k, v in cases[key].items() if k in ("jpg", "jpeg", "png", "webp", "gif", "bmp"))
        if probe_jpeg(image) is None:  # everything but the JPEGs takes the exact path
            assert codes == pil_rows[key], key
    meta = pq.read_schema(next((tmp_path / "dev" / "data").glob("*.parquet"))).metadata
    assert b'"decode": "device"' in meta[b"vqpipe"]
