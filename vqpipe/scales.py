"""The token layout of a multi-scale schedule (VAR's `patch_nums`): how many codes an image has, where each scale
starts, and how many rows VAR's teacher-forcing input has. Pure arithmetic, shared by the model presets and the
output schema so the two cannot disagree."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate


def seq_len(patch_nums: Sequence[int]) -> int:
    """L: codes per image over all scales (scale k is a pn_k x pn_k grid)."""
    return sum(pn * pn for pn in patch_nums)


def scale_offsets(patch_nums: Sequence[int]) -> tuple[int, ...]:
    """Start of each scale in the concatenated codes (VAR's gt_BL order), then the end: len = scales + 1."""
    return (0, *accumulate(pn * pn for pn in patch_nums))


def var_input_len(patch_nums: Sequence[int]) -> int:
    """Rows of VAR's teacher-forcing input: L minus the first scale, which it never takes as input."""
    return seq_len(patch_nums) - patch_nums[0] ** 2
