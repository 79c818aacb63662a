"""VAR's training forward (SPEC §3.4) against golden fixtures made by VAR's own class in train mode.

`golden_forward_mini.npz` (on golden_mini.npz's weights) is committed and always runs; `golden_forward.npz`
(on golden_tiny.npz's, the `tiny` preset) comes from ../shared/var/ and must be present under CI=true.
The fixtures were made in a one-process gloo group with deterministic algorithms on one CPU thread; the
test reproduces that, and also checks that without a process group the result is the same.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from var_fixtures import committed, shared

from vqpipe.model import VQVAE, build_model

FIXTURES = {
    "mini": lambda: (committed("golden_forward_mini.npz"), committed("golden_mini.npz")),
    "tiny": lambda: (shared("golden_forward.npz"), shared("golden_tiny.npz")),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """The fixtures were made on one intra-op thread."""


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def _one_process_group(tmp_path: Path) -> Iterator[None]:
    # A file store: no port, nothing listens.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _trainable(forward_npz: Path, weights_npz: Path) -> tuple[VQVAE, dict[str, np.ndarray]]:
    with np.load(forward_npz, allow_pickle=False) as z:
        golden = {k: z[k] for k in z.files}
    config = json.loads(str(golden["config"]))
    keys = ("vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "share_quant_resi", "quant_resi")
    model = VQVAE(
        **{k: config[k] for k in keys},
        v_patch_nums=tuple(config["v_patch_nums"]),
        beta=config["beta"],
        dropout=config["dropout"],
        test_mode=False,
    )
    with np.load(weights_npz, allow_pickle=False) as z:
        model.load_state_dict({k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("sd/")})
    return model, golden


def _two_steps(model: VQVAE, images: torch.Tensor) -> dict:
    """Step 1 with backward of mse + vq_loss, then a forward of the mirrored images (weights unchanged)."""
    rec, usages1, vq1 = model(images, ret_usages=True)
    loss = F.mse_loss(rec, images) + vq1
    loss.backward()
    with torch.no_grad():
        _, usages2, vq2 = model(images.flip(-1), ret_usages=True)
    return dict(rec=rec.detach(), loss=loss.item(), vq=[vq1.item(), vq2.item()], usages=[usages1, usages2])


def _check(model: VQVAE, golden: dict[str, np.ndarray], got: dict) -> None:
    np.testing.assert_allclose(
        got["rec"].numpy(), golden["rec"], rtol=0, atol=1e-5 * np.abs(golden["rec"]).max()
    )
    np.testing.assert_allclose(got["vq"], golden["vq_loss"], rtol=1e-5)
    np.testing.assert_allclose(got["loss"], golden["loss"], rtol=1e-5)
    assert got["usages"] == [golden["usages_step1"].tolist(), golden["usages_step2"].tolist()]
    assert torch.equal(model.quantize.ema_vocab_hit_SV, torch.from_numpy(golden["ema_vocab_hit_SV"]))
    assert model.quantize.record_hit == int(golden["record_hit"])
    params = dict(model.named_parameters())
    for key in (k for k in golden if k.startswith("grad/")):
        want = golden[key]
        grad = params[key[len("grad/") :]].grad.numpy()
        np.testing.assert_allclose(grad, want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=key)
    names = golden["grad_norm_names"].tolist()
    assert sorted(names) == sorted(params), "every parameter gets a gradient"
    norms = np.array([params[n].grad.double().norm().item() for n in names])
    # Biases followed by GroupNorm have a zero gradient in exact arithmetic (~1e-8 of rounding noise here).
    np.testing.assert_allclose(norms, golden["grad_norms"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_training_forward_matches_var_in_a_process_group(name, tmp_path):
    model, golden = _trainable(*FIXTURES[name]())
    with _deterministic(), _one_process_group(tmp_path):
        got = _two_steps(model, torch.from_numpy(golden["images"]))
    _check(model, golden, got)


def test_without_a_process_group_it_acts_as_one_process():
    assert not dist.is_initialized()
    model, golden = _trainable(*FIXTURES["mini"]())
    with _deterministic():
        got = _two_steps(model, torch.from_numpy(golden["images"]))
    _check(model, golden, got)


def test_eval_mode_leaves_the_hit_statistics_alone():
    model, golden = _trainable(*FIXTURES["mini"]())
    model.eval()
    _, usages, vq_loss = model(torch.from_numpy(golden["images"]), ret_usages=True)
    assert model.quantize.record_hit == 0 and not model.quantize.ema_vocab_hit_SV.any()
    assert usages == [0.0] * 4 and vq_loss.requires_grad


def test_gradients_reach_codebook_phi_and_encoder_through_the_quantizer():
    model, golden = _trainable(*FIXTURES["mini"]())
    images = torch.from_numpy(golden["images"])
    f = model.encode_latent(images).detach().requires_grad_(True)
    f_hat, usages, vq_loss = model.quantize(f)
    assert usages is None
    # Straight-through: d(sum f_hat)/df is exactly one everywhere, and f_hat's value is the quantized one.
    f_hat.sum().backward()
    assert torch.equal(f.grad, torch.ones_like(f))
    with torch.no_grad():
        encoded = model.quantize.f_to_idxBl_or_fhat(f.detach(), to_fhat=True)[-1]
    torch.testing.assert_close(f_hat.detach(), encoded, rtol=0, atol=1e-6)
    # vq_loss alone trains the codebook and every phi conv.
    model.zero_grad()
    vq_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.quantize.quant_resi.parameters())


def test_frozen_model_forward_trains_nothing():
    model = build_model("tiny")  # test_mode: eval and requires_grad False
    rec, _, vq_loss = model(torch.zeros(1, 3, 64, 64))
    assert not rec.requires_grad and not vq_loss.requires_grad
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.quantize.record_hit == 0
