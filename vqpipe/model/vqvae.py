"""VAR's multi-scale VQ-VAE (`VQVAE`): encoder + quantizer + decoder, with VAR's method names and state dict."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import torch
from torch import nn

from .blocks import ConvDecoder, ConvEncoder
from .quant import MultiScaleQuantizer, PatchNum

EMA_KEY = "quantize.ema_vocab_hit_SV"


class VQVAE(nn.Module):
    """The tokenizer of VAR (FoundationVision/VAR `models/vqvae.py`), written from SPEC.md.

    Keywords are VAR's. Differences: `ch` defaults to 160, the width of the released checkpoint
    `vae_ch160v4096z32.pth` (VAR's class default is 128 and its builder passes 160); `ch_mult` and
    `num_res_blocks` (hard-coded in VAR) are exposed for small test models.
    Construction has no global side effects (VAR's builder disables layer init process-wide).
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        dropout: float = 0.0,
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        test_mode: bool = True,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
    ):
        super().__init__()
        bad = [ch * m for m in ch_mult if (ch * m) % 32]
        if bad:
            raise ValueError(f"every width ch*ch_mult must be a multiple of 32 (GroupNorm), got {bad}")
        if num_res_blocks == 0 and len(set(ch_mult)) > 1:
            # Without residual blocks nothing changes the width between levels (VAR builds the same mismatch).
            raise ValueError(f"num_res_blocks=0 needs equal ch_mult entries, got {tuple(ch_mult)}")
        self.test_mode = test_mode
        self.V, self.Cvae = vocab_size, z_channels
        self.vocab_size = vocab_size
        self.v_patch_nums = tuple(int(pn) for pn in v_patch_nums)
        self.downsample = 2 ** (len(ch_mult) - 1)
        mult = tuple(ch_mult)
        self.encoder = ConvEncoder(
            ch=ch, ch_mult=mult, num_res_blocks=num_res_blocks, z_channels=z_channels, dropout=dropout
        )
        self.decoder = ConvDecoder(
            ch=ch, ch_mult=mult, num_res_blocks=num_res_blocks, z_channels=z_channels, dropout=dropout
        )
        self.quantize = MultiScaleQuantizer(
            vocab_size,
            z_channels,
            using_znorm=using_znorm,
            beta=beta,
            default_qresi_counts=default_qresi_counts,
            v_patch_nums=self.v_patch_nums,
            quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
        )
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        if test_mode:
            self.eval()
            self.requires_grad_(False)

    @property
    def resolution(self) -> int:
        """Image side the model's own schedule expects."""
        return self.downsample * self.v_patch_nums[-1]

    # -- training -----------------------------------------------------------------------------------------

    def forward(
        self, img: torch.Tensor, ret_usages: bool = False
    ) -> tuple[torch.Tensor, list[float] | None, torch.Tensor]:
        """VAR's training forward (SPEC §3.4): (reconstruction, usages, vq_loss).

        The reconstruction is not clamped (fhat_to_img clamps); gradients reach the encoder straight
        through the quantizer. Build with test_mode=False (or unfreeze) to train.
        """
        f_hat, usages, vq_loss = self.quantize(self.encode_latent(img), ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    # -- image -> codes ---------------------------------------------------------------------------------

    def encode_latent(self, img: torch.Tensor) -> torch.Tensor:
        """quant_conv(encoder(img)): (B, 3, R, R) in [-1, 1] -> (B, Cvae, R/16, R/16).

        Split from the quantizer so a caller can run the convs under another precision and quantize in float32.
        """
        return self.quant_conv(self.encoder(img))

    def img_to_idxBl(
        self, img: torch.Tensor, v_patch_nums: Sequence[PatchNum] | None = None
    ) -> list[torch.Tensor]:
        """Codes per scale, coarse to fine: a list of S tensors (B, pn_k^2) int64."""
        return self.quantize.f_to_idxBl_or_fhat(
            self.encode_latent(img), to_fhat=False, v_patch_nums=v_patch_nums
        )

    def idxBl_to_var_input(self, idx_Bl: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """VAR's teacher-forcing input (B, L - pn_0^2, Cvae) float32."""
        return self.quantize.idxBl_to_var_input(idx_Bl)

    # -- codes / f_hat -> image ---------------------------------------------------------------------------

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decode f_hat to an image clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def embed_to_img(
        self, ms_h_BChw: Sequence[torch.Tensor], all_to_max_scale: bool, last_one: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=last_one)
        if isinstance(f_hats, torch.Tensor):  # last_one
            return self.fhat_to_img(f_hats)
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    @overload
    def idxBl_to_img(
        self, idx_Bl: Sequence[torch.Tensor], same_shape: bool = True, last_one: Literal[True] = True
    ) -> torch.Tensor: ...

    @overload
    def idxBl_to_img(
        self, idx_Bl: Sequence[torch.Tensor], same_shape: bool = True, *, last_one: Literal[False]
    ) -> list[torch.Tensor]: ...

    @overload
    def idxBl_to_img(
        self, idx_Bl: Sequence[torch.Tensor], same_shape: bool = True, last_one: bool = True
    ) -> torch.Tensor | list[torch.Tensor]: ...

    def idxBl_to_img(
        self, idx_Bl: Sequence[torch.Tensor], same_shape: bool = True, last_one: bool = True
    ) -> torch.Tensor | list[torch.Tensor]:
        """Decode codes: the final image (last_one) or one image per scale, each clamped to [-1, 1].

        Defaults are VAR's usual call (`same_shape=True, last_one=True`); VAR's own default is last_one=False.
        """
        ms_h = self.quantize.idxBl_to_embeds(idx_Bl)
        return self.embed_to_img(ms_h, all_to_max_scale=same_shape, last_one=last_one)

    def img_to_reconstructed_img(
        self, img: torch.Tensor, v_patch_nums: Sequence[PatchNum] | None = None, last_one: bool = True
    ) -> torch.Tensor | list[torch.Tensor]:
        """Encode then decode: the final reconstruction (last_one) or one per scale (VAR defaults to all)."""
        f_hats = self.quantize.f_to_idxBl_or_fhat(
            self.encode_latent(img), to_fhat=True, v_patch_nums=v_patch_nums
        )
        if last_one:
            return self.fhat_to_img(f_hats[-1])
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    # -- loading ------------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As nn.Module's, but a checkpoint's hit buffer with another number of scales is replaced by ours.

        That lets the 10-scale checkpoint load into any schedule. Unlike VAR, the caller's dict is not mutated.
        """
        ema = state_dict.get(EMA_KEY)
        own = self.quantize.ema_vocab_hit_SV
        if ema is not None and ema.shape[0] != own.shape[0]:
            patched = OrderedDict(state_dict)
            metadata = getattr(state_dict, "_metadata", None)
            if metadata is not None:
                # torch reads a state dict's `_metadata`; typeshed's OrderedDict does not declare it.
                patched._metadata = metadata  # type: ignore[attr-defined]
            patched[EMA_KEY] = own.detach().clone()
            state_dict = patched
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
