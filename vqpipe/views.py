"""Augmented views: which R×R crops of one resized image become rows, and where each crop lies.

VAR trains on a random R×R crop (maybe mirrored) of the image resized so its shorter side is round(1.125·R);
it tokenizes with the centre crop. Pre-tokenized training keeps the augmentation by storing a fixed set of
views per image and picking one per epoch (LlamaGen's code extraction does the same with ten crops).

A view is a crop position, optionally mirrored: `center`, `tl`, `tr`, `bl`, `br` (the corners, placed as
torchvision's `FiveCrop` places them), each with `+hflip` for its left-right mirror. Groups: `crops5` (the five
positions), `crops10` (those and their mirrors); `hflip` alone means `center+hflip`. Views are always stored in
one canonical order, whatever order they were asked in, so the same set gives the same rows and fingerprint.

Plain Python: imported by the config, so nothing heavy here; the PIL/numpy work lives in `preprocess`.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ConfigError

POSITIONS: tuple[str, ...] = ("center", "tl", "tr", "bl", "br")
MIRROR_SUFFIX = "+hflip"
# Canonical order: torchvision's TenCrop order with the centre first (the unmirrored five, then their mirrors).
ALL_VIEWS: tuple[str, ...] = POSITIONS + tuple(p + MIRROR_SUFFIX for p in POSITIONS)
GROUPS: dict[str, tuple[str, ...]] = {
    "crops5": POSITIONS,
    "crops10": ALL_VIEWS,
    "hflip": ("center" + MIRROR_SUFFIX,),
}
DEFAULT_VIEWS: tuple[str, ...] = ("center",)  # VAR's validation transform: today's output


def parse_views(names: Iterable[str] | str, key: str = "encode.views") -> tuple[str, ...]:
    """Expand groups and aliases; return the distinct views in canonical order. A string is split on commas
    (`--views crops5,hflip`). Raises ConfigError naming `key` for an unknown name or an empty list."""
    if isinstance(names, str):
        names = names.split(",")
    wanted: set[str] = set()
    for raw in names:
        if not isinstance(raw, str):
            raise ConfigError(f"{key}: view names are strings, got {raw!r}")
        name = raw.strip()
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in ALL_VIEWS:
            wanted.add(name)
        else:
            known = ", ".join((*ALL_VIEWS, *GROUPS))
            raise ConfigError(f"{key}: unknown view {raw!r}; known: {known}")
    if not wanted:
        raise ConfigError(f"{key}: give at least one view (default: center)")
    return tuple(v for v in ALL_VIEWS if v in wanted)


def split_view(view: str) -> tuple[str, bool]:
    """`tl+hflip` -> ("tl", True); `center` -> ("center", False)."""
    if view.endswith(MIRROR_SUFFIX):
        return view[: -len(MIRROR_SUFFIX)], True
    return view, False


def crop_box(position: str, width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of the `size`×`size` crop at `position` of a width×height image.

    `center` uses torchvision's CenterCrop offsets, int(round((side - size) / 2)) (half to even); when the
    image is smaller than the crop, torchvision pads with zeros first (left/top get the floor half), and PIL's
    crop fills outside areas with zeros, so the equivalent box of the unpadded image gives the same pixels.
    Corners are FiveCrop's: flush with the named edges. After VAR's resize both sides are at least
    round(1.125·R) > R, so corners always fit; a smaller image is a caller bug (ValueError).
    """
    if position == "center":
        pad_left = (size - width) // 2 if size > width else 0
        pad_top = (size - height) // 2 if size > height else 0
        left = int(round((max(width, size) - size) / 2.0)) - pad_left
        top = int(round((max(height, size) - size) / 2.0)) - pad_top
        return left, top, left + size, top + size
    if size > width or size > height:
        raise ValueError(f"corner crop {size} of a {width}x{height} image")
    corners = {
        "tl": (0, 0),
        "tr": (width - size, 0),
        "bl": (0, height - size),
        "br": (width - size, height - size),
    }
    if position not in corners:
        raise ValueError(f"unknown crop position {position!r}")
    left, top = corners[position]
    return left, top, left + size, top + size
