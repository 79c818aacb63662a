"""Convolutional encoder and decoder of VAR's VQ-VAE (SPEC §2), with VAR's state-dict names.

Module attribute names and registration order are part of the contract: they produce the checkpoint's keys
(`encoder.down.{i}.block.{j}.conv1.weight`, ...) in the checkpoint's order. Numerics follow VAR operation by
operation (attention scale applied after the matmul, asymmetric padding before the stride-2 conv, ...), because
near-ties in the quantizer turn 1e-7 differences into different codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def normalize(channels: int) -> nn.GroupNorm:
    """VAR's `Normalize`: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus a shortcut that is a 1x1 conv only when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        # Registration order = state-dict order: norm1, conv1, norm2, (dropout), conv2, nin_shortcut.
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut: nn.Module
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with a fused q/k/v 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.scale = channels**-0.5
        self.norm = normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.norm(x))
        b, _, h, w = qkv.shape
        c = self.channels
        q, k, v = qkv.reshape(b, 3, c, h, w).unbind(1)
        # Contiguous (B, HW, C) @ (B, C, HW) and the scale applied to the product, not to q: both choices
        # fix the rounding of VAR's kernels (SDPA or pre-scaled q flip near-tie codes).
        q = q.reshape(b, c, h * w).permute(0, 2, 1).contiguous()
        k = k.reshape(b, c, h * w).contiguous()
        attn = torch.bmm(q, k).mul_(self.scale)
        attn = F.softmax(attn, dim=2)
        v = v.reshape(b, c, h * w).contiguous()
        out = torch.bmm(v, attn.permute(0, 2, 1).contiguous())
        return x + self.proj_out(out.view(b, c, h, w))


class Downsample2x(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0.0))


class Upsample2x(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: the `block` and `attn` lists, then a downsample (encoder) or upsample (decoder),
    each registered only where the level has one (None adds no state-dict key)."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        attns: Sequence[nn.Module],
        downsample: nn.Module | None = None,
        upsample: nn.Module | None = None,
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.downsample = downsample
        self.upsample = upsample

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # attn[j] (present only at the deepest level) follows block[j].
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class _Mid(nn.Module):
    """The middle of the network: a residual block, self-attention (or Identity), a residual block."""

    def __init__(self, channels: int, dropout: float, using_mid_sa: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1: nn.Module = AttnBlock(channels) if using_mid_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class ConvEncoder(nn.Module):
    """Image (B, 3, R, R) -> latent (B, z_channels, R/2^(levels-1), R/2^(levels-1))."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        dropout: float = 0.0,
        in_channels: int = 3,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1, *ch_mult)
        last = len(ch_mult) - 1
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            width_in, width = ch * in_mult[i], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width_in, width, dropout))
                width_in = width
                if i == last and using_sa:
                    attns.append(AttnBlock(width))
            # width_in, not width: with num_res_blocks == 0 the level keeps its input width (as in VAR).
            self.down.append(_Level(blocks, attns, downsample=Downsample2x(width_in) if i != last else None))
        self.mid = _Mid(width_in, dropout, using_mid_sa)
        self.norm_out = normalize(width_in)
        self.conv_out = nn.Conv2d(width_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:  # each but the last downsamples
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class ConvDecoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h*2^(levels-1), ...), unclamped (no tanh)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        dropout: float = 0.0,
        in_channels: int = 3,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ):
        super().__init__()
        last = len(ch_mult) - 1
        width_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(width_in, dropout, using_mid_sa)
        # Built deepest first, but stored so that up[i] is level i (up[0] = full resolution), as in VAR.
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            width = ch * ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(width_in, width, dropout))
                width_in = width
                if i == last and using_sa:
                    attns.append(AttnBlock(width))
            levels.insert(0, _Level(blocks, attns, upsample=Upsample2x(width) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(width_in)
        self.conv_out = nn.Conv2d(width_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):  # deepest first; each but up[0] upsamples
            h = self.up[i](h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))
