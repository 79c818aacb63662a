"""How close the device decode path (`vqpipe.device_decode`) gets to the exact PIL path, on the sample JPEGs.

    python benchmarks/device_decode_agreement.py                   # torchvision's CPU decoder (libjpeg-turbo)
    python benchmarks/device_decode_agreement.py --device cuda     # nvJPEG, and the resize on the GPU
    python benchmarks/device_decode_agreement.py --presets small256 --code-images 64

Needs torchvision beside torch. Generates `--images` samples with `vqpipe.sample` and keeps the JPEGs that
`probe_jpeg` accepts, then prints:
  decode      decode_jpeg on the device vs PIL's decode of the same bytes (before any resize)
  pixels      at R: the full device path, and the resize alone on PIL-decoded pixels, vs `preprocess`
  codes       per scale: the preset's codes from device-path pixels vs from exact pixels (and, for scale, from
              exact pixels plus uniform noise of ±1 level); random weights unless the model is given weights
  time        per image: PIL's LANCZOS resize + crop vs resize_center_crop, and whole paths from bytes
  damaged     truncated / corrupt JPEGs: does the device decoder raise (so the caller falls back to PIL)?
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from vqpipe.device_decode import DeviceDecoder, resize_center_crop
from vqpipe.errors import SampleError
from vqpipe.jpeg_probe import probe_jpeg
from vqpipe.model import build_model, precision_mode
from vqpipe.preprocess import decode_image, preprocess, val_transform
from vqpipe.sample import write_sample_dataset


def sample_jpegs(images: int, seed: int) -> list[bytes]:
    per_shard = 50
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_sample_dataset(
            tmp, shards=-(-images // per_shard), samples_per_shard=per_shard, seed=seed
        )
        jpegs = []
        for path in paths:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".jpg"):
                        jpegs.append(tar.extractfile(member).read())
    return [data for data in jpegs if probe_jpeg(data) is not None]


def byte_tensors(jpegs: list[bytes]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]


def diff_stats(got: list[np.ndarray], want: list[np.ndarray]) -> dict[str, float]:
    diffs = np.concatenate([np.abs(g.astype(np.int16) - w).ravel() for g, w in zip(got, want)])
    return {
        "images identical": np.mean([np.array_equal(g, w) for g, w in zip(got, want)]),
        "pixels equal": float(np.mean(diffs == 0)),
        "mean |diff|": float(diffs.mean()),
        "p99 |diff|": float(np.percentile(diffs, 99)),
        "max |diff|": int(diffs.max()),
    }


def pil_pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data)).transpose(2, 0, 1)


def codes(model: torch.nn.Module, pixels: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    x = torch.from_numpy(pixels).to(device).float().div_(255).mul_(2).sub_(1)  # as vqpipe.encode does
    with precision_mode("exact"), torch.inference_mode():
        return [idx.cpu() for idx in model.img_to_idxBl(x)]


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[list[float], float]:
    per_scale = [float((x == y).float().mean()) for x, y in zip(a, b)]
    same = sum(int((x == y).sum()) for x, y in zip(a, b))
    return per_scale, same / sum(x.numel() for x in a)


def per_image_ms(fn: Callable[[], object], count: int, device: torch.device, repeat: int = 3) -> float:
    """Best of `repeat` runs of `fn` (which handles `count` images), in milliseconds per image."""
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / count


def damaged_cases(jpegs: list[bytes]) -> dict[str, list[bytes]]:
    def bogus_huffman(data: bytes) -> bytes:
        out = bytearray(data)
        dht = out.find(b"\xff\xc4")
        out[dht + 5 : dht + 21] = b"\xff" * 16  # code-length counts summing past 256
        return bytes(out)

    return {
        "cut in half": [d[: len(d) // 2] for d in jpegs],
        "last 10% cut": [d[: len(d) * 9 // 10] for d in jpegs],
        "bogus Huffman table": [bogus_huffman(d) for d in jpegs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=200, help="samples generated (about 60%% are JPEGs)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--presets", default="small256,var256")
    parser.add_argument("--code-images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64, help="JPEGs per DeviceDecoder call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, res = torch.device(args.device), args.resolution

    jpegs = sample_jpegs(args.images, args.seed)
    decoder = DeviceDecoder(device, res)
    batches = [jpegs[i : i + args.batch_size] for i in range(0, len(jpegs), args.batch_size)]
    print(
        f"{len(jpegs)} JPEGs from {args.images} samples; device {device}; R={res}; torch {torch.__version__}"
    )

    from torchvision.io import ImageReadMode, decode_jpeg

    full = [pil_pixels(d) for d in jpegs]
    decoded = [
        t.cpu().numpy() for t in decode_jpeg(byte_tensors(jpegs), mode=ImageReadMode.RGB, device=device)
    ]
    exact = [preprocess(d, res) for d in jpegs]
    device_px = [t.cpu().numpy() for batch in batches for t in decoder(batch)]
    resample_px = [resize_center_crop(torch.from_numpy(p.copy()).to(device), res).cpu().numpy() for p in full]

    print("\n| comparison | images identical | pixels equal | mean abs diff | p99 abs diff | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name, got, want in (
        ("decode_jpeg vs PIL decode (full size)", decoded, full),
        (f"device path vs exact PIL path (R={res})", device_px, exact),
        ("resize only (PIL-decoded input) vs exact", resample_px, exact),
    ):
        s = diff_stats(got, want)
        print(
            f"| {name} | {s['images identical']:.3f} | {s['pixels equal']:.4f} | {s['mean |diff|']:.3f} "
            f"| {s['p99 |diff|']:.0f} | {s['max |diff|']} |"
        )

    n = min(args.code_images, len(jpegs))
    rng = np.random.default_rng(args.seed)
    exact_batch = np.stack(exact[:n])
    noisy = np.clip(exact_batch.astype(np.int16) + rng.integers(-1, 2, exact_batch.shape), 0, 255).astype(
        np.uint8
    )
    presets = [p for p in args.presets.split(",") if p]
    if presets:
        print(f"\nCode agreement with the exact path, {n} images, random weights (seed 0):")
    for preset in presets:
        model = build_model(preset, seed=0).to(device).eval()
        start = time.perf_counter()
        want = codes(model, exact_batch, device)
        rows = [
            ("device path", codes(model, np.stack(device_px[:n]), device)),
            ("resize only", codes(model, np.stack(resample_px[:n]), device)),
            ("exact ±1 noise", codes(model, noisy, device)),
        ]
        secs = (time.perf_counter() - start) / (4 * n)
        scales = "/".join(str(int(idx.shape[1] ** 0.5)) for idx in want)
        print(f"\n{preset} ({secs:.2f} s/image to encode) scales {scales}")
        print("| pixels | per scale | overall |\n|---|---|---|")
        for name, got in rows:
            per_scale, overall = agreement(got, want)
            print(f"| {name} | {' '.join(f'{p:.3f}' for p in per_scale)} | {overall:.4f} |")

    pil_images = [decode_image(d) for d in jpegs]
    tensors = [torch.from_numpy(p.copy()).to(device) for p in full]
    print(f"\nTime per image, ms ({torch.get_num_threads()} torch threads; PIL on one thread):")
    print("| step | PIL path | device path |\n|---|---|---|")
    pil_ms = per_image_ms(
        lambda: [val_transform(im, res) for im in pil_images], len(jpegs), torch.device("cpu")
    )
    dev_ms = per_image_ms(lambda: [resize_center_crop(t, res) for t in tensors], len(jpegs), device)
    print(f"| resize + crop (decoded input) | {pil_ms:.2f} | {dev_ms:.2f} |")
    pil_ms = per_image_ms(lambda: [preprocess(d, res) for d in jpegs], len(jpegs), torch.device("cpu"))
    dev_ms = per_image_ms(lambda: [decoder(b) for b in batches], len(jpegs), device)
    print(f"| bytes -> (3, R, R), batches of {args.batch_size} | {pil_ms:.2f} | {dev_ms:.2f} |")

    print("\nDamaged JPEGs (the device path must raise for the caller to fall back to PIL):")
    print("| case | PIL raises | device decoder raises |\n|---|---|---|")
    for name, cases in damaged_cases(jpegs).items():
        pil_raised = 0
        for data in cases:
            try:
                preprocess(data, res)
            except SampleError:
                pil_raised += 1
        dev_raised = sum(isinstance(r, Exception) for r in decoder(cases))
        print(f"| {name} | {pil_raised}/{len(cases)} | {dev_raised}/{len(cases)} |")
    print(f"\nmedian JPEG size {statistics.median(len(d) for d in jpegs) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
