"""VAR's multi-scale VQ-VAE tokenizer, written from shared/var/SPEC.md: model, presets, checkpoint, precision."""

from .checkpoint import load_checkpoint
from .precision import exact_mode, precision_mode, precision_settings
from .presets import PRESETS, ModelPreset, build_model, get_preset
from .vqvae import VQVAE

__all__ = [
    "PRESETS",
    "VQVAE",
    "ModelPreset",
    "build_model",
    "exact_mode",
    "get_preset",
    "load_checkpoint",
    "precision_mode",
    "precision_settings",
]
