"""Which images device decode may take: a header-only probe for the JPEG kinds nvJPEG decodes (vqpipe.device_decode).

Everything else (PNG, CMYK or RGB-stored JPEGs, arithmetic-coded frames, ...) stays on the exact PIL path.
"""

from __future__ import annotations

from PIL.JpegImagePlugin import JpegImageFile

from .preprocess import DEFAULT_MAX_PIXELS, open_image

# Frame types the device decoders take: baseline and progressive Huffman DCT. Arithmetic-coded, lossless and
# hierarchical JPEGs are rare, and nvJPEG rejects some of them; they stay on the PIL path.
_DEVICE_JPEG_FRAMES = (0xC0, 0xC2)


def probe_jpeg(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
    """(width, height) when `data` is an 8-bit baseline or progressive JPEG, grey or YCbCr, that device decode
    (`vqpipe.device_decode`) can take; None for any other valid image (PNG, CMYK JPEG, ...: use the PIL path).

    Reads the header only. Raises the same `SampleError`s as `decode_image` for what the header shows (empty,
    not_an_image, too_large, truncated header, decode_error); damaged pixel data is found by the decoder.
    """
    with open_image(data, max_pixels) as img:
        if (
            img.format != "JPEG"
            or not isinstance(img, JpegImageFile)  # always true when the format is JPEG
            or img.mode not in ("L", "RGB")
            or _jpeg_frame(data) not in _DEVICE_JPEG_FRAMES
        ):
            return None
        if img.mode == "RGB" and not _is_ycbcr(img):
            return None  # stored as RGB: libjpeg notices (JFIF/Adobe markers), other decoders may not
        return img.size


def _jpeg_frame(data: bytes) -> int | None:
    """The SOFn marker byte of a JPEG, found by walking the header segments (a raw search could hit the
    frame of an EXIF thumbnail); None when the walk meets anything unexpected."""
    pos = 2  # after SOI
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # not DHT, JPG, DAC
            return marker
        elif marker == 0xDA:  # start of scan before any frame header
            return None
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def _is_ycbcr(img: JpegImageFile) -> bool:
    # libjpeg's rule for 3 components: JFIF means YCbCr; else an Adobe marker's transform flag decides;
    # else component ids 'R', 'G', 'B' mean RGB.
    if "jfif" in img.info:
        return True
    if "adobe" in img.info:
        return img.info.get("adobe_transform") == 1
    return [layer[0] for layer in img.layer] != [82, 71, 66]
