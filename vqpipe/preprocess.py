"""Image bytes -> VAR-exact pixels (uint8, 3×R×R; V×3×R×R for views), or a SampleError with a stable reason.

VAR loads images with `PIL.Image.open(f).convert('RGB')` and tokenizes with its validation transform:
`Resize(round(1.125·R), LANCZOS)` + `CenterCrop(R)` as torchvision applies them to PIL images (SPEC §6).
Augmented views (`vqpipe.views`) are other R×R crops, or mirrors, of that same resize: decoded and resized once.
This module reproduces that with PIL and numpy alone; `golden_preprocess.npz` (torchvision's own output)
is matched exactly under the pinned Pillow. The model input is then `x / 255 * 2 - 1` in float32 NCHW;
that conversion belongs to the encode stage, not here.

Reasons a sample is rejected (`SampleError.reason`):
  empty         the member has 0 bytes
  not_an_image  PIL cannot identify the bytes as one of `PIL_FORMATS`
  too_large     width·height above `max_pixels` (checked from the header, before any pixel is decoded), or
                an extreme aspect ratio whose resized image would be above `max_resized_pixels`
  truncated     the data ends before the image does
  decode_error  anything else that goes wrong while decoding or transforming

Everything here is thread-safe: no global PIL settings or warning filters are touched. PIL's own
decompression-bomb guard stays on; between its warning and error thresholds it emits a
`DecompressionBombWarning` from `Image.open` before our stricter check rejects the image.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import threading

import numpy as np
from PIL import Image

from vqpipe.config import MAX_IMAGE_PIXELS
from vqpipe.errors import SampleError
from vqpipe.views import DEFAULT_VIEWS, crop_box, split_view

logger = logging.getLogger(__name__)

# WebDataset member suffixes read as images, in priority order (the first present wins).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    "jpg",
    "jpeg",
    "png",
    "webp",
    "bmp",
    "tif",
    "tiff",
    "gif",
    "ppm",
    "pgm",
    "pbm",
    "pnm",
    "avif",
)

# The PIL formats we let Image.open try, in PIL's own registration order (so a file is identified as
# VAR's loader would identify it). Exotic formats are left out on purpose: EPS runs Ghostscript, and
# header-less formats such as TGA would accept random bytes and turn `not_an_image` into `decode_error`.
PIL_FORMATS: tuple[str, ...] = ("BMP", "DIB", "GIF", "JPEG", "PPM", "PNG", "AVIF", "TIFF", "WEBP")

# The job's default limit (encode.max_image_pixels), for callers without a config.
DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS

_DETAIL_CHARS = 200
_init_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _open_formats() -> tuple[str, ...]:
    # Image.init() imports every plugin once (under a lock: the first decodes may come from many threads).
    # Keep only formats this Pillow build registers: Image.open raises KeyError, not UnidentifiedImageError,
    # for a requested format that is missing.
    with _init_lock:
        Image.init()
    return tuple(f for f in PIL_FORMATS if f in Image.OPEN)


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _is_truncation(exc: BaseException) -> bool:
    # PIL's wording: "image file is truncated (N bytes not processed)" from ImageFile.load and
    # "Truncated File Read" from header reads. "broken data stream" is libjpeg rejecting corrupt entropy
    # data, not running out of it, so it stays a decode_error.
    return isinstance(exc, (OSError, EOFError)) and "truncated" in str(exc).lower()


def _bomb_detail(exc: BaseException) -> str:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(match.group(1)):,} pixels" if match else "image"
    return f"{size} exceeds PIL's decompression-bomb limit"


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open, every failure mapped to a SampleError, and the header size checked (no pixel decoded)."""
    if not data:
        raise SampleError("empty", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=_open_formats())
    except Image.DecompressionBombError as exc:
        raise SampleError("too_large", _bomb_detail(exc)) from None
    except Image.UnidentifiedImageError:
        head = bytes(data[:8])
        raise SampleError(
            "not_an_image", f"no supported image format in {len(data)} bytes starting {head!r}"
        ) from None
    except Exception as exc:  # the plugins raise OSError, SyntaxError, ValueError, struct.error, ...
        if _is_truncation(exc):
            raise SampleError("truncated", _short(exc)) from None
        raise SampleError("decode_error", f"{type(exc).__name__}: {_short(exc)}") from None

    width, height = img.size
    if width * height <= max_pixels and width >= 1 and height >= 1:
        return img
    img.close()
    if width * height > max_pixels:
        raise SampleError("too_large", f"{width}x{height} = {width * height:,} pixels > {max_pixels:,}")
    raise SampleError("decode_error", f"image has no pixels ({width}x{height})")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image exactly as VAR's loader does (`Image.open(f).convert('RGB')`).

    No EXIF transpose; alpha is dropped without compositing; palette, grey, CMYK and 16-bit images go
    through PIL's own `convert`. Raises `SampleError` (reasons in the module docstring).
    """
    with open_image(data, max_pixels) as img:
        width, height = img.size
        try:
            img.load()
            return img.convert("RGB")
        except Image.DecompressionBombError as exc:  # e.g. a GIF frame larger than the header said
            raise SampleError("too_large", _bomb_detail(exc)) from None
        except MemoryError:
            raise SampleError("too_large", f"out of memory decoding {width}x{height}") from None
        except Exception as exc:
            if _is_truncation(exc):
                raise SampleError("truncated", _short(exc)) from None
            raise SampleError("decode_error", f"{type(exc).__name__}: {_short(exc)}") from None


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) after VAR's `Resize(round(1.125·R))`: the shorter side becomes round(1.125·R),
    the longer `int(mid · long / short)` (truncated), as torchvision computes it."""
    mid = round(1.125 * resolution)  # Python round, half to even, as VAR computes mid_reso
    if width <= height:
        return mid, int(mid * height / width)
    return int(mid * width / height), mid


def checked_resized_size(
    width: int, height: int, resolution: int, max_resized_pixels: int | None
) -> tuple[int, int]:
    """`resized_size`, or `too_large` when the resized image would exceed `max_resized_pixels` (None: no limit).
    Only extreme aspect ratios get there: a 1×4000 strip would become 1,152,000×288."""
    new_w, new_h = resized_size(width, height, resolution)
    if max_resized_pixels is not None and new_w * new_h > max_resized_pixels:
        raise SampleError(
            "too_large",
            f"{width}x{height} would resize to {new_w}x{new_h} = {new_w * new_h:,} pixels > {max_resized_pixels:,}",
        )
    return new_w, new_h


def resize_shorter(
    img: Image.Image, resolution: int, max_resized_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """VAR's `Resize(round(1.125·R), LANCZOS)` on a PIL image, as RGB (converted first, as VAR's loader does);
    skipped when the size already matches. A resized image above `max_resized_pixels` (only extreme aspect
    ratios get there: a 1×4000 strip would become 1,152,000×288) raises `too_large` rather than allocate
    gigabytes; `None` disables the check. Every view of an image is cropped from this one resize."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    new_w, new_h = checked_resized_size(width, height, resolution, max_resized_pixels)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    return img


def crop_views(resized: Image.Image, resolution: int, views: tuple[str, ...] = DEFAULT_VIEWS) -> np.ndarray:
    """The R×R crops named by `views` (see `vqpipe.views`) of an already resized RGB image: uint8 (V, 3, R, R)
    in the order given. A mirrored view reverses the crop's columns, which is exactly PIL's FLIP_LEFT_RIGHT."""
    out = np.empty((len(views), 3, resolution, resolution), dtype=np.uint8)
    for i, view in enumerate(views):
        position, mirrored = split_view(view)
        box = crop_box(position, resized.width, resized.height, resolution)
        chw = np.asarray(resized.crop(box), dtype=np.uint8).transpose(2, 0, 1)
        out[i] = chw[:, :, ::-1] if mirrored else chw
    return out


def val_transform(
    img: Image.Image, resolution: int, max_resized_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """VAR's validation transform on a PIL image: uint8 array of shape (3, R, R).

    `resize_shorter` (LANCZOS to round(1.125·R) on the shorter side), then `center_crop(R)`, then HWC -> CHW.
    """
    return crop_views(resize_shorter(img, resolution, max_resized_pixels), resolution)[0]


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's `CenterCrop(size)` on a PIL image (offsets and zero padding: `views.crop_box`)."""
    return img.crop(crop_box("center", img.width, img.height, size))


def preprocess(
    data: bytes,
    resolution: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_resized_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Image bytes -> uint8 (3, R, R) pixels, VAR-exact, or `SampleError`. The model input is `x/255*2-1`.

    `max_pixels` bounds the decoded image (from its header), `max_resized_pixels` the intermediate resize.
    """
    return preprocess_views(data, resolution, DEFAULT_VIEWS, max_pixels, max_resized_pixels)[0]


def preprocess_views(
    data: bytes,
    resolution: int,
    views: tuple[str, ...] = DEFAULT_VIEWS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_resized_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Image bytes -> uint8 (V, 3, R, R): one decode and one resize, then each view's crop; or one
    `SampleError` for the image, whatever the number of views."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")  # a caller bug
    img = decode_image(data, max_pixels=max_pixels)
    try:
        return crop_views(resize_shorter(img, resolution, max_resized_pixels), resolution, views)
    except SampleError:
        raise
    except MemoryError:
        raise SampleError("too_large", f"out of memory transforming {img.width}x{img.height}") from None
    except Exception as exc:
        raise SampleError("decode_error", f"transform failed: {type(exc).__name__}: {_short(exc)}") from None
