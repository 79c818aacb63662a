"""The VQ-VAE from SPEC.md: state-dict layout, presets, quantizer rules, schedules, decode paths, precision."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vqpipe.model import PRESETS, VQVAE, ModelPreset, build_model, exact_mode, precision_settings
from vqpipe.model.phi import phi_index, phi_ticks
from vqpipe.model.precision import precision_mode
from vqpipe.model.presets import get_preset
from vqpipe.model.quant import MultiScaleQuantizer

STATE_DICT_TXT = Path(__file__).parent / "data" / "var256_state_dict.txt"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test in this module runs on one intra-op thread."""


def _expected_state_dict() -> list[tuple[str, tuple[int, ...]]]:
    # Verbatim copy of SPEC.md Appendix B: "name  (d0, d1, ...)".
    rows = []
    for line in STATE_DICT_TXT.read_text().splitlines():
        name, shape = line.split("  ")
        rows.append((name, tuple(int(d) for d in shape.strip("()").split(",") if d.strip())))
    return rows


def _meta_model(**kwargs) -> VQVAE:
    with torch.device("meta"):
        return VQVAE(**kwargs)


def _data_codebook(model: VQVAE, seed: int = 0) -> VQVAE:
    """Codebook rows drawn from encoder features, so random-weight models give varied codes (and near-ties)."""
    g = torch.Generator().manual_seed(seed)
    res = model.resolution
    with torch.inference_mode():
        f = model.encode_latent(torch.rand(8, 3, res, res, generator=g) * 2 - 1)
    feats = f.permute(0, 2, 3, 1).reshape(-1, model.Cvae)
    rows = feats[torch.randint(len(feats), (model.V,), generator=g)]
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(rows + 0.01 * torch.randn(rows.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tiny() -> VQVAE:
    return _data_codebook(build_model("tiny"))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


# -- state dict and parameter counts (SPEC §1, Appendix B) ---------------------------------------------


def test_default_state_dict_matches_spec():
    expected = _expected_state_dict()
    assert len(expected) == 324
    assert sum(math.prod(s) for _, s in expected) == 108_989_315
    for kwargs in ({}, {"v_patch_nums": PRESETS["var512"].patch_nums}):
        model = _meta_model(**kwargs)
        assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
        assert all(v.dtype == torch.float32 for v in model.state_dict().values())


def test_default_parameter_counts():
    model = _meta_model()

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(model.encoder) == 44_107_872
    assert count(model.decoder) == 64_653_923
    assert count(model.quantize) == 168_064
    assert count(model.quantize.embedding) == 131_072
    assert count(model.quant_conv) == count(model.post_quant_conv) == 9_248
    assert count(model) == 108_948_355


def test_presets_build_the_default_architecture():
    for name in ("var256", "var512"):
        kwargs = PRESETS[name].model_kwargs()
        assert [tuple(v.shape) for v in _meta_model(**kwargs).state_dict().values()] == [
            s for _, s in _expected_state_dict()
        ]


def test_test_mode_freezes():
    m = build_model("tiny")
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    trainable = VQVAE(**PRESETS["tiny"].model_kwargs(), test_mode=False)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize(
    ("share", "quant_resi", "phi_keys"),
    [
        (0, 0.5, ["quant_resi.0.weight", "quant_resi.3.bias"]),
        (1, 0.5, ["quant_resi.qresi.weight", "quant_resi.qresi.bias"]),
        (2, 0.5, ["quant_resi.qresi_ls.0.weight", "quant_resi.qresi_ls.1.bias"]),
        (4, 0.0, []),
    ],
)
def test_phi_wrapper_keys(share, quant_resi, phi_keys):
    q = MultiScaleQuantizer(64, 8, v_patch_nums=(1, 2, 3, 4), quant_resi=quant_resi, share_quant_resi=share)
    keys = [k for k in q.state_dict() if k.startswith("quant_resi.")]
    assert all(k in keys for k in phi_keys)
    assert len(keys) == {0: 8, 1: 2, 2: 4, 4: 0}[share]
    assert list(q.state_dict())[0] == "ema_vocab_hit_SV" and list(q.state_dict())[-1] == "embedding.weight"


# -- presets --------------------------------------------------------------------------------------------


def test_preset_geometry():
    v256, v512, tiny = PRESETS["var256"], PRESETS["var512"], PRESETS["tiny"]
    assert (v256.resolution, v256.seq_len, v256.var_input_len) == (256, 680, 679)
    assert v256.scale_offsets == (0, 1, 5, 14, 30, 55, 91, 155, 255, 424, 680)
    assert (v512.resolution, v512.seq_len, v512.var_input_len) == (512, 2240, 2239)
    assert v512.scale_offsets == (0, 1, 5, 14, 30, 66, 147, 316, 640, 1216, 2240)
    assert (tiny.resolution, tiny.seq_len, tiny.var_input_len) == (64, 30, 29)


def test_unknown_preset_lists_known_names():
    with pytest.raises(ValueError, match="var256.*var512.*tiny"):
        build_model("var1024")
    custom = ModelPreset("c", 64, 8, 32, (1, 2), 1, 1, 0.5, (1, 2, 4))
    assert get_preset(custom) is custom and build_model(custom).resolution == 8


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = build_model("tiny", seed=0), build_model("tiny", seed=0), build_model("tiny", seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["encoder.conv_in.weight"], sc["encoder.conv_in.weight"])
    # Layer init still works afterwards (VAR's builder disables it process-wide).
    assert torch.nn.Linear(64, 64).weight.abs().max() <= 1 / 8


# -- quantizer rules (SPEC §3) ----------------------------------------------------------------------------


def test_phi_selection_maps():
    assert phi_ticks(4).tolist() == pytest.approx([1 / 12, 13 / 36, 23 / 36, 11 / 12])
    assert [phi_index(4, si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(4, si, 14) for si in range(14)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert [phi_index(4, si, 4) for si in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        phi_index(4, 0, 1)


def test_phi_wrappers_select_by_position():
    q = MultiScaleQuantizer(16, 8, v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), share_quant_resi=4)
    ls = q.quant_resi.qresi_ls
    assert [q.quant_resi.select(si, 10) for si in (2, 7)] == [ls[1], ls[3]]  # the two float64 ties
    shared = MultiScaleQuantizer(16, 8, v_patch_nums=(1, 2, 3), share_quant_resi=1).quant_resi
    assert shared.select(0, 3) is shared.select(2, 3) is shared.qresi
    non_shared = MultiScaleQuantizer(16, 8, v_patch_nums=(1, 2, 3), share_quant_resi=0).quant_resi
    assert [non_shared.select(si, 3) for si in range(3)] == list(non_shared)


def test_argmin_ties_pick_the_lowest_index():
    q = MultiScaleQuantizer(8, 4, v_patch_nums=(1, 2))
    with torch.no_grad():
        q.embedding.weight.copy_(torch.arange(32.0).view(8, 4) * 10)
        q.embedding.weight[6] = q.embedding.weight[2]
        f = q.embedding.weight[2].view(1, 4, 1, 1).expand(1, 4, 2, 2).contiguous()
    idx = q.f_to_idxBl(f)
    assert idx[0].tolist() == [[2]]


def test_var_input_shapes_from_random_codes():
    g = torch.Generator().manual_seed(0)
    for name in ("var256", "var512"):
        p = PRESETS[name]
        q = MultiScaleQuantizer(p.vocab_size, p.z_channels, v_patch_nums=p.patch_nums)
        codes = [torch.randint(p.vocab_size, (2, pn * pn), generator=g) for pn in p.patch_nums]
        with torch.inference_mode():
            vi = q.idxBl_to_var_input(codes)
        assert vi.shape == (2, p.var_input_len, 32) and vi.dtype == torch.float32


def test_var_input_matches_the_encode_pass():
    # Mathematically var_input is the encode pass's f_hat area-downsampled to the next scale; in float32 the
    # layouts differ (SPEC §3.2), so agreement is to ~1e-6, not bitwise.
    p = PRESETS["var512"]
    q = MultiScaleQuantizer(256, 32, v_patch_nums=p.patch_nums)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        q.embedding.weight.normal_(generator=g)
    f = torch.randn(2, 32, 32, 32, generator=g)
    with torch.inference_mode():
        codes = q.f_to_idxBl(f)
        f_hats = q.f_to_idxBl_or_fhat(f, to_fhat=True)
        vi = q.idxBl_to_var_input(codes)
    assert [c.shape for c in codes] == [(2, pn * pn) for pn in p.patch_nums]
    derived = torch.cat(
        [
            F.interpolate(f_hats[si], size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
            for si, pn in enumerate(p.patch_nums[1:])
        ],
        dim=1,
    )
    assert vi.shape == derived.shape == (2, 2239, 32)
    assert (vi - derived).abs().max() <= 1e-5


def test_var512_schedule_end_to_end_on_a_small_model():
    # ch_mult (1, 2) downsamples 2x, so a 64 px image gives the 32x32 latent of the 512 px schedule.
    p = PRESETS["var512"]
    m = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, v_patch_nums=p.patch_nums)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        codes = m.img_to_idxBl(img)
        vi = m.idxBl_to_var_input(codes)
        rec = m.idxBl_to_img(codes)
    assert [c.shape for c in codes] == [(2, pn * pn) for pn in p.patch_nums]
    assert vi.shape == (2, 2239, 8)
    assert rec.shape == img.shape


def test_schedule_override_and_mismatch():
    q = MultiScaleQuantizer(32, 8, v_patch_nums=(1, 2, 4))
    f = torch.randn(2, 8, 4, 6)
    with torch.inference_mode():
        codes = q.f_to_idxBl(f, v_patch_nums=[(1, 1), (2, 3), (4, 6)])
    assert [c.shape for c in codes] == [(2, 1), (2, 6), (2, 24)]
    with pytest.raises(ValueError, match="latent is 4x6"):
        q.f_to_idxBl(f)


def test_backbone_without_residual_blocks():
    m = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=0, v_patch_nums=(1, 2, 4))
    with torch.inference_mode():
        codes = m.img_to_idxBl(torch.rand(1, 3, 16, 16))
        assert m.idxBl_to_img(codes).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="num_res_blocks=0 needs equal ch_mult"):
        VQVAE(ch=32, ch_mult=(1, 2), num_res_blocks=0)


def test_wrong_image_size_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="schedule ends at 4x4 but the latent is 2x2"):
        tiny.img_to_idxBl(torch.zeros(1, 3, 32, 32))


# -- model paths ------------------------------------------------------------------------------------------


def test_codes_are_int64_coarse_to_fine_and_split_path_agrees(tiny, images):
    with torch.inference_mode():
        codes = tiny.img_to_idxBl(images)
        split = tiny.quantize.f_to_idxBl(tiny.encode_latent(images))
    assert [c.shape for c in codes] == [(3, pn * pn) for pn in PRESETS["tiny"].patch_nums]
    assert all(c.dtype == torch.int64 for c in codes)
    assert all(torch.equal(a, b) for a, b in zip(codes, split))
    assert len(torch.cat(codes, 1).unique()) > 10  # the data codebook gives varied codes


def test_quantizer_runs_in_float32_only_and_ignores_autocast(tiny, images):
    with torch.inference_mode():
        f = tiny.encode_latent(images)
        plain = tiny.quantize.f_to_idxBl(f)
        with pytest.raises(TypeError, match="cast the latent"):
            tiny.quantize.f_to_idxBl(f.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = tiny.quantize.f_to_idxBl(f)
            vi_autocast = tiny.idxBl_to_var_input(plain)
        vi = tiny.idxBl_to_var_input(plain)
    assert all(torch.equal(a, b) for a, b in zip(plain, autocast))
    assert torch.equal(vi, vi_autocast)


def test_decode_paths(tiny, images):
    s = len(PRESETS["tiny"].patch_nums)
    images = images[:1]  # eleven decodes: keep them cheap
    with torch.inference_mode():
        codes = tiny.img_to_idxBl(images)
        last = tiny.idxBl_to_img(codes)
        every = tiny.idxBl_to_img(codes, same_shape=True, last_one=False)
        native = tiny.idxBl_to_img(codes, same_shape=False, last_one=True)
        recon = tiny.img_to_reconstructed_img(images)
        recon_all = tiny.img_to_reconstructed_img(images, last_one=False)
        f_hats = tiny.quantize.f_to_idxBl_or_fhat(tiny.encode_latent(images), to_fhat=True)
    assert last.shape == native.shape == recon.shape == images.shape
    assert len(every) == len(recon_all) == s and torch.equal(every[-1], last)
    assert torch.equal(recon, tiny.fhat_to_img(f_hats[-1]))
    assert last.abs().max() <= 1 and recon.abs().max() <= 1
    # Decoding the codes and decoding the encode pass's f_hat agree up to layout rounding.
    assert (last - recon).abs().max() <= 1e-4


def test_autoregressive_accumulation_matches_embed_to_fhat(tiny, images):
    q = tiny.quantize
    s = len(q.v_patch_nums)
    with torch.inference_mode():
        embeds = q.idxBl_to_embeds(tiny.img_to_idxBl(images))
        want = q.embed_to_fhat(embeds, all_to_max_scale=True, last_one=True)
        f_hat = torch.zeros_like(want)
        for si, h in enumerate(embeds):
            f_hat, nxt = q.get_next_autoregressive_input(si, s, f_hat, h)
            if si < s - 1:
                assert nxt.shape[-1] == q.v_patch_nums[si + 1]
    assert torch.equal(f_hat, want)


def test_hit_buffer_with_other_scale_count_loads_without_mutating_the_callers_dict(tiny):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    ten_rows = torch.ones(10, 64)
    state["quantize.ema_vocab_hit_SV"] = ten_rows
    target = build_model("tiny", seed=5)
    target.load_state_dict(state, strict=True)
    assert state["quantize.ema_vocab_hit_SV"] is ten_rows and ten_rows.shape == (10, 64)
    assert target.quantize.ema_vocab_hit_SV.shape == (4, 64)
    assert torch.equal(target.quantize.embedding.weight, tiny.quantize.embedding.weight)


def test_using_znorm_runs(images):
    m = VQVAE(**PRESETS["tiny"].model_kwargs(), using_znorm=True)
    with torch.inference_mode():
        codes = m.img_to_idxBl(images)
    assert [c.shape[1] for c in codes] == [1, 4, 9, 16]


# -- precision --------------------------------------------------------------------------------------------


def _flags():
    return (
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )


def test_exact_mode_sets_and_restores_flags():
    before = _flags()
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        outer = _flags()
        with exact_mode() as settings:
            assert _flags() == (False, False, "highest", True, False)
            assert settings["mode"] == "exact"
            with precision_mode("tf32"):
                assert _flags() == (True, True, "high", True, False)
            assert _flags() == (False, False, "highest", True, False)
        assert _flags() == outer
        with pytest.raises(RuntimeError), exact_mode():
            raise RuntimeError("boom")
        assert _flags() == outer
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = before[0], before[4]
    assert _flags() == before


def test_precision_settings_are_json_and_modes_are_checked():
    s = precision_settings("exact")
    assert json.loads(json.dumps(s)) == s
    assert s["cudnn_allow_tf32"] is False and s["torch_version"] == torch.__version__
    assert {"device", "cudnn_version", "num_threads"} <= set(s)
    assert precision_settings("tf32")["matmul_allow_tf32"] is True
    with pytest.raises(ValueError, match="exact, tf32"):
        precision_settings("bf16")
    with pytest.raises(ValueError), precision_mode("fp8"):
        pass
