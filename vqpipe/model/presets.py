"""Named tokenizer configurations (VAR's released tokenizer at 256 and 512 px, small test and demo models)
and a builder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from .. import scales
from .vqvae import VQVAE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPreset:
    """Everything that fixes the tokenizer's architecture and token layout."""

    name: str
    vocab_size: int
    z_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    share_quant_resi: int
    quant_resi: float
    patch_nums: tuple[int, ...]

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def resolution(self) -> int:
        """Input image side in pixels."""
        return self.downsample * self.patch_nums[-1]

    @property
    def seq_len(self) -> int:
        """L: number of codes per image over all scales."""
        return scales.seq_len(self.patch_nums)

    @property
    def scale_offsets(self) -> tuple[int, ...]:
        """Start of each scale in the concatenated codes, then the end (len = scales + 1)."""
        return scales.scale_offsets(self.patch_nums)

    @property
    def var_input_len(self) -> int:
        """Rows of VAR's teacher-forcing input: L minus the first scale."""
        return scales.var_input_len(self.patch_nums)

    def model_kwargs(self) -> dict[str, Any]:
        """Constructor keywords of `VQVAE` for this preset."""
        return dict(
            vocab_size=self.vocab_size,
            z_channels=self.z_channels,
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            share_quant_resi=self.share_quant_resi,
            quant_resi=self.quant_resi,
            v_patch_nums=self.patch_nums,
        )


_VAR: dict[str, Any] = dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2)
_VAR.update(share_quant_resi=4, quant_resi=0.5)

PRESETS: MappingProxyType[str, ModelPreset] = MappingProxyType(
    {
        # vae_ch160v4096z32.pth; the 512 px VAR-d36 uses the same weights with another schedule.
        "var256": ModelPreset("var256", patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), **_VAR),
        "var512": ModelPreset("var512", patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32), **_VAR),
        # The configuration of shared/var/golden_tiny.npz (64 px).
        "tiny": ModelPreset(
            "tiny",
            vocab_size=64,
            z_channels=8,
            ch=32,
            ch_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            share_quant_resi=4,
            quant_resi=0.5,
            patch_nums=(1, 2, 3, 4),
        ),
        # benchmarks/bench.py's default: VAR's 256 px schedule, vocabulary and quantizer, but a backbone of
        # stride-2 convs only (no residual blocks), so that on a CPU the encoder costs tens of ms per image
        # instead of ~1.3 s and reading, decoding and writing weigh as they do next to a GPU.
        "small256": ModelPreset(
            "small256",
            vocab_size=4096,
            z_channels=32,
            ch=32,
            ch_mult=(1, 1, 1, 1, 1),
            num_res_blocks=0,
            share_quant_resi=4,
            quant_resi=0.5,
            patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        ),
        # The README demo's tokenizer (64 px), trainable from scratch on the sample in a few CPU minutes
        # (docs/finetune.md): 4x downsampling to a 16x16 latent and 64 channels at every level. At 32
        # channels (tiny's full-resolution width) each of GroupNorm's 32 groups is one channel, normalised
        # per image; trained from scratch, such models decode every image to nearly the same mean picture
        # for hundreds of steps (measured), while with two channels per group they soon do not.
        "demo": ModelPreset(
            "demo",
            vocab_size=256,
            z_channels=8,
            ch=64,
            ch_mult=(1, 1, 1),
            num_res_blocks=0,
            share_quant_resi=4,
            quant_resi=0.5,
            patch_nums=(1, 2, 4, 8, 16),
        ),
    }
)


def get_preset(preset: str | ModelPreset) -> ModelPreset:
    """Resolve a preset name; a ModelPreset passes through."""
    if isinstance(preset, ModelPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[preset]


def build_model(preset: str | ModelPreset, seed: int | None = 0) -> VQVAE:
    """A randomly initialised model (eval, frozen) for tests and demos; load a checkpoint for real codes.

    With a seed, the weights are a function of the seed alone and the global RNG is left untouched.
    """
    p = get_preset(preset)
    if seed is None:
        return VQVAE(**p.model_kwargs())
    with torch.random.fork_rng(devices=[]):
        # CPU generator only: torch.manual_seed would also reseed CUDA generators outside fork_rng's reach.
        torch.default_generator.manual_seed(seed)
        model = VQVAE(**p.model_kwargs())
    logger.debug("built %s with random weights (seed %d)", p.name, seed)
    return model
