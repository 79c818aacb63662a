"""JPEG bytes -> (3, R, R) uint8 pixels on a GPU: nvJPEG decode (torchvision), torch resize + centre crop.

Opt-in, and NOT VAR-exact. The geometry is VAR's (`preprocess.resized_size`, then `preprocess.center_crop`'s
box), but the resampling is torch's bicubic where VAR uses PIL's LANCZOS (torch has no LANCZOS), and nvJPEG
has its own IDCT and chroma upsampling, so its pixels may differ from libjpeg's. How close it gets is measured
by `benchmarks/device_decode_agreement.py`. Only JPEGs that `jpeg_probe.probe_jpeg` accepts should come here;
a JPEG that fails comes back as its exception, and the caller then takes the exact PIL path, which gives the
proper `SampleError` reason.

torchvision is imported lazily: the module imports without it (CI has none), and `unavailable_reason` says
what is missing. torchvision marks its image decoders deprecated from 0.29 on (TorchCodec supersedes them)."""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F

from .errors import SampleError
from .preprocess import DEFAULT_MAX_PIXELS, checked_resized_size, resized_size

logger = logging.getLogger(__name__)

# Same-size images are resized together, up to this many source pixels at a time: large photos would
# otherwise need gigabytes of float32 for one interpolate call.
_CHUNK_PIXELS = 1 << 24
_REASON_CHARS = 300


def unavailable_reason(device: torch.device) -> str | None:
    """None when torchvision's decode_jpeg can run on `device`, else a one-line reason naming what to
    install."""
    if device.type not in ("cuda", "cpu"):
        return f"device decode runs on cuda (cpu only as a reference), not on {device.type}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return (
            "device decode needs CUDA: torch sees no CUDA device (a GPU and a CUDA build of torch are needed)"
        )
    try:
        import torchvision
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
    except Exception as exc:  # ImportError, or a torchvision built for another torch (its ops fail to load)
        return _one_line(
            f"device decode needs torchvision built for torch {torch.__version__} "
            f"(pip install torchvision): {type(exc).__name__}: {exc}"
        )
    try:  # decoding a real JPEG is the only test that covers a torchvision built without nvJPEG
        tiny = encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
        decode_jpeg([tiny], mode=ImageReadMode.RGB, device=device)
    except Exception as exc:
        return _one_line(
            f"torchvision {torchvision.__version__} cannot decode JPEG on {device} "
            f"(install a torchvision build with nvJPEG for this torch): {type(exc).__name__}: {exc}"
        )
    return None


def resize_center_crop(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """(3, H, W) uint8 on any device -> (3, R, R) uint8; (N, 3, H, W) -> (N, 3, R, R) for same-size images.

    VAR's geometry: resize to `preprocess.resized_size`, then `preprocess.center_crop`'s box (zeros where the
    box leaves the image). Resampled in float32 with torch's bicubic where VAR uses PIL's LANCZOS: with
    antialias when shrinking (without it, shrinking aliases), without when enlarging, where torch's plain
    bicubic (a = -0.75) is sharper than its antialiased one (a = -0.5) and measured closer to LANCZOS. Then
    rounded and clamped: rounding after the crop equals PIL's rounding before it (it is per pixel) and touches
    fewer pixels. No resampling when the size already matches: then the result equals the PIL path's.
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if img.dtype != torch.uint8 or img.dim() not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"expected uint8 (3, H, W) or (N, 3, H, W), got {img.dtype} {tuple(img.shape)}")
    x = img if img.dim() == 4 else img.unsqueeze(0)
    height, width = x.shape[-2:]
    new_w, new_h = resized_size(width, height, resolution)
    if (new_w, new_h) != (width, height):
        # Explicit output size, not a scale factor: torch then maps pixels with scale = in/out, as PIL does.
        shrink = min(new_w, new_h) < min(width, height)  # both sides shrink, or neither does
        x = F.interpolate(
            x.float(), size=(new_h, new_w), mode="bicubic", antialias=shrink, align_corners=False
        )
    x = _center_crop(x, resolution)
    if x.is_floating_point():
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x if img.dim() == 4 else x[0]


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """`preprocess.center_crop`'s box on (..., H, W), zeros where it leaves the image. After `resized_size`
    both sides are at least R, so the padding never happens in `resize_center_crop`; kept for fidelity."""
    height, width = x.shape[-2:]
    pad_left = (size - width) // 2 if size > width else 0
    pad_top = (size - height) // 2 if size > height else 0
    left = int(round((max(width, size) - size) / 2.0)) - pad_left
    top = int(round((max(height, size) - size) / 2.0)) - pad_top
    # Negative padding crops: one call cuts the box and adds zeros wherever the box leaves the image.
    return F.pad(x, (-left, left + size - width, -top, top + size - height))


class DeviceDecoder:
    """JPEG bytes -> (3, R, R) uint8 on `device`: torchvision's decode_jpeg, then `resize_center_crop`.

    The point is CUDA (nvJPEG, and the resize on the GPU); `cpu` is accepted as a reference and for tests.
    torchvision serialises its CUDA decoder behind one lock, so threads can share one instance.
    """

    def __init__(
        self, device: torch.device, resolution: int, max_resized_pixels: int | None = DEFAULT_MAX_PIXELS
    ):
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        reason = unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(reason)
        self.device, self.resolution, self.max_resized_pixels = device, resolution, max_resized_pixels

    def __call__(self, jpegs: list[bytes]) -> list[torch.Tensor | Exception]:
        """Each JPEG -> (3, R, R) uint8 on the device, or the exception that decoding it raised.

        One batched decode_jpeg call (RGB, no EXIF orientation: VAR's loader applies none); if it raises,
        the JPEGs are decoded one by one so that a bad one only affects itself.
        """
        results = self._decode(jpegs)
        images: dict[int, torch.Tensor] = {}
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, img in enumerate(results):
            if isinstance(img, torch.Tensor):
                too_large = self._too_large(img)
                if too_large is None:
                    images[i] = img
                    by_size[tuple(img.shape)].append(i)
                else:
                    results[i] = too_large
        for shape, indices in by_size.items():
            step = max(1, _CHUNK_PIXELS // (shape[1] * shape[2]))
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                outs: list[torch.Tensor | Exception]
                try:
                    outs = list(resize_center_crop(torch.stack([images[i] for i in chunk]), self.resolution))
                except Exception as exc:  # e.g. out of device memory: these samples take the PIL path
                    outs = [exc] * len(chunk)
                for i, out in zip(chunk, outs):
                    results[i] = out
        return results

    def stack(self, pixels: list) -> torch.Tensor:
        """A batch from device-decoded tensors and host (numpy) pixels of the PIL path -> (B, 3, R, R) on the device."""
        return torch.stack(
            [p if isinstance(p, torch.Tensor) else torch.from_numpy(p).to(self.device) for p in pixels]
        )

    def _decode(self, jpegs: list[bytes]) -> list[torch.Tensor | Exception]:
        if not jpegs:
            return []
        try:
            return list(self._decode_jpegs(jpegs))
        except Exception as exc:
            logger.debug("batched JPEG decode failed (%s); decoding %d one by one", exc, len(jpegs))
        results: list[torch.Tensor | Exception] = []
        for data in jpegs:
            try:
                results.append(self._decode_jpegs([data])[0])
            except Exception as exc:
                results.append(exc)
        return results

    def _decode_jpegs(self, jpegs: list[bytes]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        # bytearray: torch.frombuffer warns on read-only buffers such as bytes.
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=False)

    def _too_large(self, img: torch.Tensor) -> SampleError | None:
        # The PIL path's guard: an extreme strip (1×4000) would resize to gigabytes.
        height, width = img.shape[-2:]
        try:
            checked_resized_size(width, height, self.resolution, self.max_resized_pixels)
        except SampleError as e:
            return e
        return None


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."
