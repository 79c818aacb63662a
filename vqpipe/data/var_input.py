"""`VarInputBuilder`: VAR's teacher-forcing input rebuilt from codes where training runs, from the few tensors of a
tokenizer checkpoint it needs (codebook and phi convs), and `var_batch`, a collated batch under VAR's names."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import storage
from ..errors import CheckpointError
from ..model.presets import ModelPreset, get_preset
from ..model.quant import MultiScaleQuantizer

logger = logging.getLogger(__name__)

_PREFIX = "quantize."
_NEEDED = ("quantize.embedding.", "quantize.quant_resi.")


class VarInputBuilder(nn.Module):
    """codes (B, L) int64 -> x_BLCv_wo_first_l (B, L - pn0², Cvae) float32, as the model's idxBl_to_var_input.

    Holds the quantizer alone (var256: 4096x32 codebook + four 32-channel 3x3 convs, ~0.6 MB), not the 436 MB model.
    """

    def __init__(self, preset: str | ModelPreset = "var256"):
        super().__init__()
        p = get_preset(preset)
        self.preset = p
        self.quantize = MultiScaleQuantizer(
            p.vocab_size,
            p.z_channels,
            v_patch_nums=p.patch_nums,
            quant_resi=p.quant_resi,
            share_quant_resi=p.share_quant_resi,
        )
        del (
            self.quantize.ema_vocab_hit_SV
        )  # a training statistic, (scales x vocab) floats idxBl_to_var_input never reads
        self.offsets = p.scale_offsets
        self.eval().requires_grad_(False)

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], preset: str | ModelPreset = "var256", device: Any = "cpu"
    ) -> VarInputBuilder:
        builder = cls(preset)
        wanted = {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_NEEDED)}
        expected = {k: tuple(v.shape) for k, v in builder.quantize.state_dict().items()}
        bad = sorted(set(expected) ^ set(wanted)) + [
            f"{k} {tuple(wanted[k].shape)} vs {s}"
            for k, s in expected.items()
            if k in wanted and tuple(wanted[k].shape) != s
        ]
        if bad:
            raise CheckpointError(
                f"the checkpoint's quantizer does not fit preset {builder.preset.name}: {', '.join(bad[:5])}"
            )
        builder.quantize.load_state_dict(wanted, strict=True)
        return builder.to(device)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str,
        preset: str | ModelPreset = "var256",
        device: Any = "cpu",
        *,
        expected_sha256: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> VarInputBuilder:
        """Load a VAR tokenizer state dict (local path or URL; `weights_only=True`) and keep only the quantizer.

        Local files are memory-mapped, so only the needed tensors are read. `expected_sha256` (e.g. an OUT's
        `metadata["model"]["sha256"]`) refuses weights other than those the codes were made with.
        """
        if expected_sha256 is not None:
            digest = storage.sha256_of(checkpoint, storage_options)
            if digest != expected_sha256:
                raise CheckpointError(f"checkpoint {checkpoint}: sha256 {digest}, expected {expected_sha256}")
        try:
            if storage.is_local(checkpoint):
                state = _load_local(checkpoint)
            else:
                with storage.open_input(checkpoint, storage_options) as f:
                    state = torch.load(f, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {checkpoint}: cannot be loaded ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(state, Mapping):
            raise CheckpointError(f"checkpoint {checkpoint}: not a flat state dict")
        needed = {k: v.clone() for k, v in state.items() if k.startswith(_NEEDED)}  # detach from the mmap
        del state
        return cls.from_state_dict(needed, preset, device)

    @torch.no_grad()
    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 2 or codes.shape[1] != self.offsets[-1]:
            raise ValueError(f"codes must be (B, {self.offsets[-1]}), got {tuple(codes.shape)}")
        device = self.quantize.embedding.weight.device
        codes = codes.to(device=device, dtype=torch.int64, non_blocking=True)
        idx_Bl = [codes[:, a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        var_input = self.quantize.idxBl_to_var_input(idx_Bl)
        if var_input is None:  # a one-scale preset: VAR's input is the class token alone
            raise ValueError(
                f"preset {self.preset.name} has one scale: there is no teacher-forcing input to build"
            )
        return var_input


def var_batch(
    batch: Mapping[str, Any], builder: VarInputBuilder | None = None, device: Any = None
) -> dict[str, torch.Tensor]:
    """A TokenDataset batch, or an `iter_torch_batches` batch of `vqpipe.raydata.read_tokens`, under the names of
    VAR's trainer: label_B (B,) int64, gt_BL (B, L) int64 and x_BLCv_wo_first_l (B, L - pn0², Cvae) float32
    (stored var_input, or built from the codes by `builder`)."""
    gt_BL = batch["codes"].to(device=device, dtype=torch.int64, non_blocking=True)
    out = {"gt_BL": gt_BL}
    if "label" in batch:
        out["label_B"] = torch.as_tensor(batch["label"]).to(
            device=device, dtype=torch.int64, non_blocking=True
        )
    if "var_input" in batch:
        out["x_BLCv_wo_first_l"] = batch["var_input"].to(device=device, non_blocking=True).float()
    elif builder is not None:
        out["x_BLCv_wo_first_l"] = builder(gt_BL)
    else:
        raise ValueError(
            "the batch has no var_input: read it (columns=(..., 'var_input')) or pass a VarInputBuilder"
        )
    return out


def _load_local(path: str) -> Any:
    try:  # memory-mapped: only the tensors used below are read from disk
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # files in torch's legacy (non-zip) format cannot be mapped
            raise
        return torch.load(path, map_location="cpu", weights_only=True)
