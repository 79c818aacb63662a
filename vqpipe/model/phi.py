"""VAR's phi: the refinement convs applied to each scale's upsampled embeddings (quant_resi), and the rule that
picks which of them serves a scale, with VAR's state-dict names for each sharing setting.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def phi_ticks(k: int) -> np.ndarray:
    """The K anchor positions in [0, 1] of K phi convs (float64, computed exactly as VAR does)."""
    margin = 1 / 3 / k if k == 4 else 1 / 2 / k
    return np.linspace(margin, 1 - margin, k)


def phi_index(k: int, si: int, num_scales: int) -> int:
    """Which of K phi convs serves scale `si` of `num_scales`.

    Float64 on purpose: for 10 scales, scales 2 and 7 sit exactly between two ticks in real arithmetic and
    the rounding of `linspace` and `si/9` picks the winner (exact arithmetic picks the wrong one).
    """
    if num_scales < 2:
        raise ValueError(f"the quantizer needs at least 2 scales, got {num_scales}")
    pos = si / (num_scales - 1)
    return int(np.argmin(np.abs(phi_ticks(k) - pos)))


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) * h + r * conv3x3(h), r = |quant_resi|."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class PhiShared(nn.Module):
    """share_quant_resi == 1: one phi for every scale (keys `quant_resi.qresi.*`)."""

    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """share_quant_resi == K >= 2: K phi spread over the scales (keys `quant_resi.qresi_ls.{k}.*`)."""

    def __init__(self, phis: list[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi_ls[phi_index(len(self.qresi_ls), si, num_scales)]


class PhiNonShared(nn.ModuleList):
    """share_quant_resi == 0: a list of phi (keys `quant_resi.{i}.*`), picked by the same tick rule."""

    def select(self, si: int, num_scales: int) -> nn.Module:
        return self[phi_index(len(self), si, num_scales)]


PhiWrapper = PhiShared | PhiPartiallyShared | PhiNonShared


def make_phi(
    channels: int, quant_resi: float, share_quant_resi: int, num_scales: int, default_qresi_counts: int = 0
) -> PhiWrapper:
    """The phi wrapper VAR builds for these settings; |quant_resi| <= 1e-6 gives keyless Identity phis."""

    def one() -> nn.Module:
        return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

    if share_quant_resi == 0:
        return PhiNonShared([one() for _ in range(default_qresi_counts or num_scales)])
    if share_quant_resi == 1:
        return PhiShared(one())
    return PhiPartiallyShared([one() for _ in range(share_quant_resi)])
