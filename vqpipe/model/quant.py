"""VAR's multi-scale residual quantizer (SPEC §3): latent -> per-scale codes, codes -> var_input / f_hat.

Every step mirrors VAR's arithmetic and memory layouts, which the codes depend on bit for bit:
distances as |z|^2 + |e|^2 followed by an in-place GEMM, float64 numpy tick selection of the phi conv (phi.py),
`.contiguous()` after the upsample when encoding but channels-last views when rebuilding from codes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .phi import make_phi

PatchNum = int | tuple[int, int]


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    # The quantizer is float32 math; under autocast VAR's addmm_ raises and var_input drifts by ~2e-3.
    if device.type in ("cpu", "cuda"):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def _area(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="area")


class MultiScaleQuantizer(nn.Module):
    """VAR's `VectorQuantizer2`: the training forward (SPEC §3.4) and the inference paths (§3.1-3.3)."""

    ema_vocab_hit_SV: torch.Tensor  # a buffer (register_buffer below)

    def __init__(
        self,
        vocab_size: int,
        Cvae: int,
        using_znorm: bool = False,
        beta: float = 0.25,
        default_qresi_counts: int = 0,
        v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
    ):
        super().__init__()
        if len(v_patch_nums) < 2:
            raise ValueError(f"v_patch_nums needs at least 2 scales, got {tuple(v_patch_nums)}")
        self.vocab_size = vocab_size
        self.Cvae = Cvae
        self.using_znorm = using_znorm
        self.v_patch_nums = tuple(int(pn) for pn in v_patch_nums)
        self.quant_resi_ratio = quant_resi
        self.beta = beta
        self.prog_si = -1  # VAR's progressive-training knob; a tokenizer always runs with -1.
        # Registration order gives VAR's key order: buffer, quant_resi.*, embedding.
        self.quant_resi = make_phi(
            Cvae, quant_resi, share_quant_resi, len(v_patch_nums), default_qresi_counts
        )
        # Per-scale EMA of codebook hits, written only by the training forward; in the checkpoint.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(v_patch_nums), vocab_size))
        self.record_hit = 0  # counts quantized scales (not steps), which drives VAR's EMA schedule
        self.embedding = nn.Embedding(vocab_size, Cvae)

    # -- training ---------------------------------------------------------------------------------------

    def forward(
        self, f: torch.Tensor, ret_usages: bool = False
    ) -> tuple[torch.Tensor, list[float] | None, torch.Tensor]:
        """VAR's training quantization of latent f (B, C, H, W): (f_hat, usages, vq_loss).

        f_hat carries f's gradient unchanged (straight-through); vq_loss trains the encoder (commitment,
        weighted by beta) and the codebook and phi. In training mode each scale's code hits update the
        usage EMA (summed over ranks when torch.distributed is initialised; one process otherwise).
        `usages` (with ret_usages) is the percentage of codes per scale whose EMA reaches a margin.
        """
        if f.dtype != torch.float32:
            f = f.float()
        b, _, h, w = f.shape
        hws = self._patch_hws(None, h, w)
        codebook = self.embedding.weight.detach()
        vq_loss = f.new_zeros(())  # float32: f was cast above
        with _no_autocast(f.device):
            f_no_grad = f.detach()
            residual = f_no_grad.clone()
            f_hat = torch.zeros_like(residual)
            for si in range(len(hws)):
                idx, up = self._quantize_scale(residual, si, hws, codebook)
                # Not in place: the codebook and phi get their gradient through f_hat.
                f_hat = f_hat + up
                residual.sub_(up.detach())
                if self.training:
                    self._record_hits(si, idx)
                commitment = F.mse_loss(f_hat.detach(), f).mul_(self.beta)
                vq_loss = vq_loss + (commitment + F.mse_loss(f_hat, f_no_grad))
            vq_loss = vq_loss * (1.0 / len(hws))
            # Forward value f_hat, gradient to f as the identity.
            f_hat = (f_hat.detach() - f_no_grad).add_(f)
        usages = self.usages(b * h * w) if ret_usages else None
        return f_hat, usages, vq_loss

    def _record_hits(self, si: int, idx: torch.Tensor) -> None:
        hits = idx.flatten().bincount(minlength=self.vocab_size).float()
        if _distributed():
            torch.distributed.all_reduce(hits)
        ema = self.ema_vocab_hit_SV[si]
        if self.record_hit == 0:
            ema.copy_(hits)
        elif self.record_hit < 100:
            ema.mul_(0.9).add_(hits.mul(0.1))
        else:
            ema.mul_(0.99).add_(hits.mul(0.01))
        self.record_hit += 1

    def usages(self, tokens_per_step: int) -> list[float]:
        """Per scale, the percentage of codes whose hit EMA is at least 8% of an even share of the tokens.

        tokens_per_step is B*H*W of the finest latent on this rank (VAR's margin, whatever the scale).
        """
        world = torch.distributed.get_world_size() if _distributed() else 1
        margin = world * tokens_per_step / self.vocab_size * 0.08
        return [(row >= margin).float().mean().item() * 100 for row in self.ema_vocab_hit_SV]

    # -- encoding -------------------------------------------------------------------------------------

    def _nearest(self, z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        if self.using_znorm:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(codebook.T, dim=0), dim=1)
        # Norms first, then one GEMM accumulating -2 z.E^T: computing |z - e|^2 or cdist flips near-ties.
        d = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(codebook.square(), dim=1, keepdim=False)
        d.addmm_(z, codebook.T, beta=1, alpha=-2)
        return torch.argmin(d, dim=1)  # first index on exact ties, as VAR

    def _patch_hws(self, v_patch_nums: Sequence[PatchNum] | None, h: int, w: int) -> list[tuple[int, int]]:
        hws = [
            (int(pn[0]), int(pn[1])) if isinstance(pn, (tuple, list)) else (int(pn), int(pn))
            for pn in (v_patch_nums or self.v_patch_nums)
        ]
        if len(hws) < 2:
            raise ValueError(f"the schedule needs at least 2 scales, got {hws}")
        if hws[-1] != (h, w):
            raise ValueError(
                f"the schedule ends at {hws[-1][0]}x{hws[-1][1]} but the latent is {h}x{w}; "
                "the image side must be the downsampling factor times the last patch number"
            )
        return hws

    def _quantize_scale(
        self, residual: torch.Tensor, si: int, hws: Sequence[tuple[int, int]], codebook: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale si of the residual: its codes (B, ph, pw) and phi(upsampled embeddings) (B, C, H, W)."""
        b, c, h, w = residual.shape
        ph, pw = hws[si]
        last = si == len(hws) - 1
        # The finest scale uses the residual itself, never an identity interpolation.
        z = residual if last else _area(residual, (ph, pw))
        idx = self._nearest(z.permute(0, 2, 3, 1).reshape(-1, c), codebook).view(b, ph, pw)
        up = self.embedding(idx).permute(0, 3, 1, 2)
        if not last:
            up = _bicubic(up, (h, w))
        # Contiguous here (channels-last views in the decode paths): the phi conv rounds differently.
        return idx, self.quant_resi.select(si, len(hws))(up.contiguous())

    def f_to_idxBl_or_fhat(
        self, f: torch.Tensor, to_fhat: bool, v_patch_nums: Sequence[PatchNum] | None = None
    ) -> list[torch.Tensor]:
        """Quantize latent f (B, C, H, W) coarse to fine.

        Returns per scale the codes (B, ph*pw) int64, or (to_fhat) a copy of the running f_hat (B, C, H, W).
        Runs in f's dtype, which must be the codebook's (float32): no implicit casts.
        """
        b, _, h, w = f.shape
        codebook = self.embedding.weight.detach()
        if f.dtype != codebook.dtype:
            raise TypeError(
                f"latent is {f.dtype} but the codebook is {codebook.dtype}; cast the latent first"
            )
        hws = self._patch_hws(v_patch_nums, h, w)
        out: list[torch.Tensor] = []
        with _no_autocast(f.device):
            residual = f.detach().clone()
            f_hat = torch.zeros_like(residual)
            for si in range(len(hws)):
                if 0 <= self.prog_si < si:
                    break
                idx, up = self._quantize_scale(residual, si, hws, codebook)
                f_hat.add_(up)
                residual.sub_(up)
                out.append(f_hat.clone() if to_fhat else idx.reshape(b, -1))
        return out

    def f_to_idxBl(
        self, f: torch.Tensor, v_patch_nums: Sequence[PatchNum] | None = None
    ) -> list[torch.Tensor]:
        """Codes per scale, coarse to fine: a list of (B, ph*pw) int64."""
        return self.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    # -- rebuilding from codes --------------------------------------------------------------------------

    def _codes_to_view(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        # (B, pn*pn, C) -> (B, C, pn, pn) as a strided (channels-last) view, exactly as VAR feeds phi.
        b = idx.shape[0]
        return self.embedding(idx).transpose(1, 2).view(b, self.Cvae, pn, pn)

    def _check_codes(self, idx_Bl: Sequence[torch.Tensor], needed: int) -> None:
        if len(idx_Bl) < needed:
            raise ValueError(f"expected codes for {needed} scales, got {len(idx_Bl)}")
        for si in range(needed):
            pn = self.v_patch_nums[si]
            if idx_Bl[si].dim() != 2 or idx_Bl[si].shape[1] != pn * pn:
                raise ValueError(
                    f"codes of scale {si} have shape {tuple(idx_Bl[si].shape)}, expected (B, {pn * pn})"
                )

    def idxBl_to_var_input(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """VAR's teacher-forcing input (B, L - pn_0^2, Cvae) float32, from codes on the model's own schedule.

        Recomputed from the codes as VAR does; deriving it from the encode pass differs by ~1e-6 (layouts).
        """
        num_scales = len(self.v_patch_nums)
        self._check_codes(idx_Bl, num_scales - 1)
        b = idx_Bl[0].shape[0]
        side = self.v_patch_nums[-1]
        next_scales = []
        with _no_autocast(idx_Bl[0].device):
            f_hat = idx_Bl[0].new_zeros(b, self.Cvae, side, side, dtype=torch.float32)
            for si in range(num_scales - 1):
                if self.prog_si == 0 or (0 <= self.prog_si - 1 < si):
                    break
                up = _bicubic(self._codes_to_view(idx_Bl[si], self.v_patch_nums[si]), (side, side))
                f_hat.add_(self.quant_resi.select(si, num_scales)(up))
                pn_next = self.v_patch_nums[si + 1]
                next_scales.append(_area(f_hat, (pn_next, pn_next)).view(b, self.Cvae, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if next_scales else None

    def idxBl_to_embeds(self, idx_Bl: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale code embeddings (B, Cvae, pn, pn), each a channels-last view (VAR's decode layout)."""
        out = []
        for idx in idx_Bl:
            pn = round(idx.shape[1] ** 0.5)
            out.append(self._codes_to_view(idx, pn))
        return out

    def embed_to_fhat(
        self, ms_h_BChw: Sequence[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Accumulate phi(upsampled embeddings) into f_hat: the final one (last_one) or one per scale."""
        num_scales = len(self.v_patch_nums)
        if len(ms_h_BChw) != num_scales:
            raise ValueError(f"expected {num_scales} scales of embeddings, got {len(ms_h_BChw)}")
        b = ms_h_BChw[0].shape[0]
        side = self.v_patch_nums[-1]
        per_scale: list[torch.Tensor] = []
        with _no_autocast(ms_h_BChw[0].device):
            if all_to_max_scale:
                f_hat = ms_h_BChw[0].new_zeros(b, self.Cvae, side, side, dtype=torch.float32)
                for si, h in enumerate(ms_h_BChw):
                    if si < num_scales - 1:
                        h = _bicubic(h, (side, side))
                    f_hat.add_(self.quant_resi.select(si, num_scales)(h))
                    if not last_one:
                        per_scale.append(f_hat.clone())
            else:
                # VAR's experimental path: grow f_hat scale by scale at native resolution.
                pn0 = self.v_patch_nums[0]
                f_hat = ms_h_BChw[0].new_zeros(b, self.Cvae, pn0, pn0, dtype=torch.float32)
                for si, pn in enumerate(self.v_patch_nums):
                    f_hat = _bicubic(f_hat, (pn, pn))
                    f_hat.add_(self.quant_resi.select(si, num_scales)(ms_h_BChw[si]))
                    if not last_one:
                        per_scale.append(f_hat)
        return f_hat if last_one else per_scale

    def get_next_autoregressive_input(
        self, si: int, num_scales: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's embeddings into f_hat (in place); return f_hat and its area-downsample to scale si+1."""
        side = self.v_patch_nums[-1]
        if si != num_scales - 1:
            f_hat.add_(self.quant_resi.select(si, num_scales)(_bicubic(h_BChw, (side, side))))
            pn_next = self.v_patch_nums[si + 1]
            return f_hat, _area(f_hat, (pn_next, pn_next))
        f_hat.add_(self.quant_resi.select(si, num_scales)(h_BChw))
        return f_hat, f_hat
