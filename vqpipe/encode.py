"""A batch of uint8 pixels -> multi-scale codes (+ var_input) on one device, under a precision policy.

`exact` (the default) is float32 with TF32 off and deterministic cuDNN: codes equal VAR's `img_to_idxBl`.
`tf32` lets convolutions and matmuls use TF32; `bf16` runs the encoder convolutions under bf16 autocast
and keeps the quantizer (distances, argmin, φ) in float32. `channels_last` (NHWC convolutions) and
`compile` (torch.compile of the encoder convolutions) combine with any of them. All are opt-in, recorded in the
output, and measured against the exact path (`agreement_with_exact`); the quantizer always runs eagerly in
float32 on a contiguous latent.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from .config import JobConfig, random_weights_id
from .errors import CheckpointError
from .model import (
    PRESETS,
    VQVAE,
    ModelPreset,
    build_model,
    load_checkpoint,
    precision_mode,
    precision_settings,
)
from .schema import TokenLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: VQVAE
    preset: ModelPreset
    model_sha256: str  # the checkpoint file's sha256, or random_weights_id


def load_model(
    preset: str, checkpoint: str | None, storage_options: dict[str, Any] | None, device: torch.device
) -> LoadedModel:
    """Build the preset and load its weights (or keep the seeded random init when no checkpoint is given)."""
    model = build_model(preset, seed=0)
    model_sha256 = (
        load_checkpoint(model, checkpoint, storage_options) if checkpoint else random_weights_id(preset)
    )
    return LoadedModel(model.to(device).eval(), PRESETS[preset], model_sha256)


def build_encoder(cfg: JobConfig, expected_sha256: str | None = None) -> tuple[Encoder, str, int]:
    """The encoder a job config asks for: (encoder, model sha256, resolution)."""
    device = pick_device(cfg.model.device)
    loaded = load_model(cfg.model.preset, cfg.model.checkpoint, cfg.storage_options, device)
    if expected_sha256 is not None and loaded.model_sha256 != expected_sha256:
        raise CheckpointError(
            f"{cfg.model.checkpoint}: changed during the run (sha256 {loaded.model_sha256[:12]}..., "
            f"expected {expected_sha256[:12]}...)"
        )
    p = loaded.preset
    layout = TokenLayout(
        p.patch_nums, p.vocab_size, p.z_channels, cfg.encode.var_input, cfg.encode.var_input_dtype
    )
    mode = EncoderMode(cfg.model.precision, cfg.model.channels_last, cfg.model.compile)
    return Encoder(loaded, device, mode, layout), loaded.model_sha256, p.resolution


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but CUDA is not available on this worker")
    return torch.device(name)


@dataclass(frozen=True)
class EncoderMode:
    """How the encoder convolutions run. Anything but the default may flip near-tie codes."""

    precision: str = "exact"
    channels_last: bool = False
    compile: bool = False

    @property
    def exact(self) -> bool:
        return self == EncoderMode()

    @property
    def name(self) -> str:
        """e.g. "exact", "bf16", "tf32+channels_last+compile"."""
        return "+".join([self.precision] + [f.name for f in fields(self)[1:] if getattr(self, f.name)])


class Encoder:
    """Owns one model replica on one device. Thread-safe: concurrent shards share it one batch at a time."""

    def __init__(
        self, loaded: LoadedModel, device: torch.device, mode: EncoderMode | str, layout: TokenLayout
    ):
        self.mode = EncoderMode(mode) if isinstance(mode, str) else mode
        self.model, self.device, self.layout = loaded.model, device, layout
        self._lock = threading.Lock()  # one batch on the device at a time; precision flags are process-global
        # The exact path runs the model itself (`_codes`); only other modes need their own latent function.
        self._latent = None if self.mode.exact else self._fast_latent()

    @property
    def precision(self) -> str:
        return self.mode.precision

    @property
    def settings(self) -> dict[str, Any]:
        """The precision record stored in every output file's metadata."""
        base = precision_settings(_flags_mode(self.precision), self.device)
        base.update(mode=self.mode.name, channels_last=self.mode.channels_last, compile=self.mode.compile)
        if self.precision == "bf16":
            base["autocast"] = "bfloat16 for encoder + quant_conv; quantizer in float32"
        return base

    def _fast_latent(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """encode_latent as the mode runs it. The eager contiguous model stays as the exact reference."""
        net = torch.nn.Sequential(self.model.encoder, self.model.quant_conv)
        if self.mode.channels_last:  # a copy: converting in place would change the reference too
            # Module.to(memory_format=...) is documented; torch's type hints for `to` leave that overload out.
            net = copy.deepcopy(net).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.mode.compile:
            return torch.compile(net)  # compiles on the first batch; a second batch size makes it dynamic
        return net

    def __call__(
        self, pixels: np.ndarray | torch.Tensor, timer: Callable[[str, float], None] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, 3, R, R) uint8 -> codes (B, L) in the layout's code dtype, var_input (B, L-pn0², C) or None.

        `timer(stage, seconds)` gets the time spent waiting for the device ("wait_device": another shard's
        batch was running) apart from the time spent encoding ("encode")."""
        asked = time.perf_counter()
        with self._lock, torch.inference_mode():
            start = time.perf_counter()
            try:
                return self._encode(pixels)
            finally:
                if timer:
                    timer("wait_device", start - asked)
                    timer("encode", time.perf_counter() - start)

    def _encode(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        idx_bl = self._codes(self._to_device(pixels), exact=False)
        codes = torch.cat(idx_bl, dim=1).to(torch.int32).cpu().numpy().astype(self.layout.code_dtype)
        if not self.layout.var_input:
            return codes, None
        with precision_mode("exact"):  # var_input is a function of the codes; always computed as VAR does
            var_input = self.model.idxBl_to_var_input(idx_bl)
            if var_input is None:  # not reached: the quantizer refuses schedules of fewer than 2 scales
                raise RuntimeError("the model gave no var_input: its schedule has a single scale")
            var_input = var_input.to(getattr(torch, self.layout.var_input_dtype))
        return codes, var_input.cpu().numpy()

    def agreement_with_exact(
        self, pixels: np.ndarray | torch.Tensor, exact_pixels: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Fraction of codes per scale that this encoder's mode shares with `exact` on `pixels`.

        `exact_pixels`: the reference's own input when this encoder's pixels came from another decoder."""
        with self._lock, torch.inference_mode():
            x = self._to_device(pixels)
            ref = x if exact_pixels is None else self._to_device(exact_pixels)
            mine, exact = self._codes(x, exact=False), self._codes(ref, exact=True)
        per_scale = [float((a == b).float().mean()) for a, b in zip(mine, exact)]
        same = sum(int((a == b).sum()) for a, b in zip(mine, exact))
        return {
            "mode": self.mode.name,
            "images": int(pixels.shape[0]),
            "per_scale": [round(p, 6) for p in per_scale],
            "overall": round(same / sum(a.numel() for a in mine), 6),
        }

    def _to_device(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, R, R) from the host (numpy) or already on the device (device decode) -> model input."""
        if isinstance(pixels, torch.Tensor):
            x = pixels.to(self.device)
        else:
            host = torch.from_numpy(pixels)
            if self.device.type == "cuda":
                host = host.pin_memory()  # lets the copy run asynchronously with respect to the host
            x = host.to(self.device, non_blocking=True)
        # ToTensor's x/255, then VAR's x + x - 1 (bit-identical to x*2 - 1)
        return x.float().div_(255).mul_(2).sub_(1)

    def _codes(self, x: torch.Tensor, exact: bool) -> list[torch.Tensor]:
        if exact or self._latent is None:  # None: the exact mode
            with precision_mode("exact"):
                return self.model.img_to_idxBl(x)
        with precision_mode(_flags_mode(self.precision)):
            if self.mode.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                f = self._latent(x)
            # The quantizer's interpolations and φ convs round by memory layout: give it VAR's layout.
            return self.model.quantize.f_to_idxBl(f.float().contiguous())


def _flags_mode(precision: str) -> str:
    """bf16 keeps float32 work (the quantizer) IEEE-exact; only tf32 turns TF32 on."""
    return "tf32" if precision == "tf32" else "exact"
