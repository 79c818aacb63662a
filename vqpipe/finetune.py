"""Fine-tune the tokenizer on WebDataset shards with the losses available offline, and save a VAR checkpoint.

The loss is reconstruction (L1 or L2) + VAR's multi-scale VQ loss (`VQVAE.forward`, SPEC §3.4). VAR's own
tokenizer was also trained with a perceptual (LPIPS) and an adversarial loss; both need pretrained networks
that cannot be downloaded here, so they are left out (see docs/finetune.md). Images are read with vqpipe's
reader and decoded with its preprocess; training pixels use VAR's train transform (LANCZOS resize of the
short side to round(1.125 R), random R x R crop, optional horizontal flip). The result is a plain state dict
saved with torch.save, which `vqpipe tokenize --checkpoint` loads strictly.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .finetune_data import ShardImages, eval_images, training_batches
from .model import PRESETS, VQVAE, build_model, load_checkpoint
from .storage import atomic_write, expand_inputs

logger = logging.getLogger(__name__)

RECON_LOSSES = ("l1", "l2")


@dataclass(frozen=True)
class FinetuneConfig:
    """What `vqpipe finetune` trains, on what, and where the checkpoint goes."""

    inputs: tuple[str, ...]
    out: str
    preset: str = "tiny"
    checkpoint: str | None = None  # start from these weights; None: the preset's seeded random init
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    recon_loss: str = "l1"
    vq_weight: float = 1.0
    hflip: bool = False  # VAR's --hflip (off by default there too)
    shuffle_buffer: int = 64
    eval_images: int = 32  # images (validation transform) on which PSNR is reported before and after
    eval_every: int = 0  # also report PSNR every N steps (0: only before and after)
    log_every: int = 10
    device: str = "auto"
    storage_options: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("finetune: give at least one input (tar file, directory, glob or URL)")
        if self.preset not in PRESETS:
            raise ConfigError(f"finetune: unknown model preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.recon_loss not in RECON_LOSSES:
            raise ConfigError(
                f"finetune: --recon-loss must be one of {RECON_LOSSES}, got {self.recon_loss!r}"
            )
        for name in ("steps", "batch_size", "shuffle_buffer", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"finetune: {name} must be >= 1, got {getattr(self, name)}")
        if min(self.eval_images, self.eval_every) < 0 or not (self.lr > 0) or not (self.vq_weight >= 0):
            raise ConfigError("finetune: eval_images, eval_every and vq_weight must be >= 0, lr > 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"finetune: device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class EvalPoint:
    """Reconstruction PSNR after `step` steps, and the time spent until then (wall and this process's CPU)."""

    step: int
    psnr: float
    seconds: float
    cpu_seconds: float


@dataclass
class FinetuneResult:
    """Losses per step and reconstruction PSNR (dB, on the eval images) before, during and after."""

    losses: list[float]
    evals: list[EvalPoint]
    usages: list[float]  # per scale, % of the codebook in use at the end (VAR's usage EMA)
    images_seen: int
    skipped_samples: int
    seconds: float


@torch.no_grad()
def reconstruction_psnr(model: VQVAE, images: torch.Tensor, batch_size: int = 32) -> float:
    """PSNR (dB, peak-to-peak 2 in [-1, 1]) of encode -> codes -> decode, the path tokenize users rely on."""
    was_training = model.training
    model.eval()
    squared = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        rec = cast(torch.Tensor, model.img_to_reconstructed_img(x, last_one=True))  # last_one: one tensor
        squared += (rec - x).double().square().sum().item()
    model.train(was_training)
    mse = squared / images.numel()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


@torch.no_grad()
def init_codebook_from_latents(model: VQVAE, images: torch.Tensor, rng: np.random.Generator) -> None:
    """Replace the codebook by V latent vectors of these images (drawn without replacement when there are
    enough). A random codebook sits far from a random encoder's small latents, so every token would pick
    the same few codes and nothing would reach the decoder; latents drawn from data are all in reach."""
    was_training = model.training
    model.eval()
    f = model.encode_latent(images).float()
    model.train(was_training)
    vectors = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    vocab = model.quantize.vocab_size
    pick = rng.choice(len(vectors), size=vocab, replace=len(vectors) < vocab)
    model.quantize.embedding.weight.copy_(vectors[torch.from_numpy(pick)])


def build_trainable(cfg: FinetuneConfig, device: torch.device) -> VQVAE:
    """The preset with the given checkpoint (or its seeded random init), unfrozen, in training mode."""
    model = build_model(cfg.preset, seed=cfg.seed)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint, cfg.storage_options)
    model.requires_grad_(True)
    return model.to(device).train()


def save_checkpoint(model: VQVAE, url: str, storage_options: dict[str, Any] | None = None) -> None:
    """VAR's format: the flat state dict (CPU tensors) written with torch.save, atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_write(url, storage_options) as f:
        f.write(buf.getvalue())


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """Train for cfg.steps steps, save the checkpoint to cfg.out, and report losses and PSNR."""
    start, cpu_start = time.monotonic(), time.process_time()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("finetune: --device cuda but CUDA is not available")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    urls = expand_inputs(list(cfg.inputs), cfg.storage_options)
    if not urls:
        raise ConfigError(f"finetune: no shard matches {list(cfg.inputs)}")
    resolution = PRESETS[cfg.preset].resolution
    source = ShardImages(urls, cfg.storage_options, cfg.seed)
    model = build_trainable(cfg, device)
    held_out = eval_images(source, resolution, cfg.eval_images) if cfg.eval_images else None
    evals: list[EvalPoint] = []

    def evaluate(step: int) -> None:
        if held_out is not None:
            psnr = reconstruction_psnr(model, held_out.to(device))
            now, cpu = time.monotonic() - start, time.process_time() - cpu_start
            evals.append(EvalPoint(step, psnr, now, cpu))
            logger.info("step %d: reconstruction PSNR %.2f dB (%.0fs, %.0f CPU s)", step, psnr, now, cpu)

    batches = training_batches(source, resolution, cfg.batch_size, cfg.shuffle_buffer, cfg.hflip, cfg.seed)
    if not cfg.checkpoint:
        latent_side = PRESETS[cfg.preset].patch_nums[-1]
        wanted = min(64, math.ceil(4 * model.quantize.vocab_size / latent_side**2))
        first = [next(batches) for _ in range(math.ceil(wanted / cfg.batch_size))]
        init_codebook_from_latents(model, torch.cat(first).to(device), np.random.default_rng(cfg.seed))
        logger.info("random init: codebook drawn from the latents of %d images", sum(map(len, first)))
    evaluate(0)
    torch.manual_seed(cfg.seed)  # dropout, if the preset has any
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    recon = F.l1_loss if cfg.recon_loss == "l1" else F.mse_loss
    losses: list[float] = []
    usages: list[float] = []
    for step in range(1, cfg.steps + 1):
        x = next(batches).to(device)
        log_now = step % cfg.log_every == 0 or step == cfg.steps
        rec, step_usages, vq_loss = model(x, ret_usages=log_now)
        recon_loss = recon(rec, x)
        loss = recon_loss + cfg.vq_weight * vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_now:
            usages = step_usages or []
            logger.info(
                "step %d/%d: loss %.4f (%s %.4f, vq %.4f), codebook usage %% per scale %s",
                step, cfg.steps, losses[-1], cfg.recon_loss, recon_loss.item(), vq_loss.item(),
                [round(u, 1) for u in usages],
            )  # fmt: skip
        if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
            evaluate(step)
    save_checkpoint(model, cfg.out, cfg.storage_options)
    result = FinetuneResult(
        losses=losses,
        evals=evals,
        usages=usages,
        images_seen=cfg.steps * cfg.batch_size,
        skipped_samples=source.skipped,
        seconds=time.monotonic() - start,
    )
    logger.info(
        "saved %s after %d steps (%.0fs); reconstruction PSNR on %d images: %s -> %s dB",
        cfg.out, cfg.steps, result.seconds, 0 if held_out is None else len(held_out),
        _db(evals[0] if evals else None), _db(evals[-1] if evals else None),
    )  # fmt: skip
    return result


def _db(point: EvalPoint | None) -> str:
    return "n/a" if point is None else f"{point.psnr:.2f}"
