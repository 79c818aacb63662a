"""The encode stage's modes: exact equals the model; every opt-in mode is really in effect, is measured against
exact per scale, and is named in the metadata. Random weights, real pixels from the sample photos."""

import tarfile

import numpy as np
import pytest
import torch

from vqpipe.encode import Encoder, EncoderMode, load_model
from vqpipe.preprocess import preprocess
from vqpipe.sample import write_sample_dataset
from vqpipe.schema import TokenLayout


@pytest.fixture(scope="module")
def small(one_torch_thread, tmp_path_factory):
    loaded = load_model("small256", None, None, torch.device("cpu"))
    p = loaded.preset
    layout = TokenLayout(p.patch_nums, p.vocab_size, p.z_channels, True, "float16")
    (shard,) = write_sample_dataset(tmp_path_factory.mktemp("photos"), shards=1, samples_per_shard=6, seed=3)
    with tarfile.open(shard) as tar:
        images = [tar.extractfile(m).read() for m in tar if m.name.endswith((".jpg", ".png"))]
    pixels = np.stack([preprocess(b, p.resolution) for b in images])
    return loaded, layout, pixels


def _encoder(small, mode: EncoderMode) -> Encoder:
    loaded, layout, _ = small
    return Encoder(loaded, torch.device("cpu"), mode, layout)


def test_exact_mode_is_the_model_itself(small):
    loaded, _, pixels = small
    codes, var_input = _encoder(small, EncoderMode())(pixels)
    x = torch.from_numpy(pixels).float().div(255).mul(2).sub(1)
    with torch.inference_mode():
        direct = loaded.model.img_to_idxBl(x)
        want_var = loaded.model.idxBl_to_var_input(direct).half().numpy()
    np.testing.assert_array_equal(codes, torch.cat(direct, 1).numpy())
    np.testing.assert_array_equal(var_input, want_var)


def test_mode_names_and_exactness():
    assert EncoderMode().exact and EncoderMode().name == "exact"
    assert EncoderMode("tf32", channels_last=True, compile=True).name == "tf32+channels_last+compile"
    assert not EncoderMode("exact", channels_last=True).exact
    assert not EncoderMode("bf16").exact


def test_bf16_changes_codes_and_says_by_how_much_per_scale(small):
    _, layout, pixels = small
    enc = _encoder(small, EncoderMode("bf16"))
    report = enc.agreement_with_exact(pixels)
    assert report["mode"] == "bf16" and report["images"] == len(pixels)
    assert len(report["per_scale"]) == len(layout.patch_nums)
    # bf16 keeps 8 mantissa bits: on these weights ~7% of codes flip (measured 0.925), the coarsest scales least.
    assert 0.8 < report["overall"] < 1.0
    codes, _ = enc(pixels)
    exact, _ = _encoder(small, EncoderMode())(pixels)
    assert (codes == exact).mean() == pytest.approx(report["overall"], abs=1e-6)
    assert enc.settings["mode"] == "bf16" and "autocast" in enc.settings


def test_channels_last_runs_nhwc_and_leaves_the_exact_reference_alone(small):
    loaded, _, pixels = small
    enc = _encoder(small, EncoderMode("exact", channels_last=True))
    convs = [m for m in enc._latent.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert all(m.weight.is_contiguous() for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d)), (
        "the reference model must keep VAR's layout"
    )
    report = enc.agreement_with_exact(pixels)
    assert report["mode"] == "exact+channels_last"
    assert report["overall"] >= 0.99  # float32 in another loop order: rare near-tie flips at most
    assert enc.settings["channels_last"] is True


def test_agreement_compares_against_the_exact_decoders_pixels_when_given(small):
    _, _, pixels = small
    enc = _encoder(small, EncoderMode("exact", channels_last=True))
    shifted = np.clip(pixels.astype(np.int16) + 40, 0, 255).astype(np.uint8)  # a "different decoder"
    same = enc.agreement_with_exact(pixels, exact_pixels=pixels)["overall"]
    other = enc.agreement_with_exact(shifted, exact_pixels=pixels)["overall"]
    assert same >= 0.99 and other < same - 0.2


@pytest.mark.slow  # torch.compile's first compile: ~15 s of CPU
def test_compile_mode_compiles_once_and_agrees(small):
    _, _, pixels = small
    enc = _encoder(small, EncoderMode("exact", compile=True))
    first, _ = enc(pixels[:4])
    again, _ = enc(pixels[:4])
    np.testing.assert_array_equal(first, again)
    tail, _ = enc(pixels[4:])  # another batch size: recompiled (dynamic), not an error
    assert tail.shape[0] == 2
    report = enc.agreement_with_exact(pixels)
    assert report["mode"] == "exact+compile" and report["overall"] >= 0.99
    assert "OptimizedModule" in type(enc._latent).__name__


@pytest.mark.gpu
def test_cuda_exact_matches_cpu_exact_and_fast_modes_report_agreement(small):
    loaded_cpu, layout, pixels = small
    cpu_codes, _ = _encoder(small, EncoderMode())(pixels)
    loaded = load_model("small256", None, None, torch.device("cuda"))
    exact = Encoder(loaded, torch.device("cuda"), EncoderMode(), layout)
    codes, _ = exact(pixels)
    assert (codes == cpu_codes).mean() >= 0.999  # different kernels: near ties may flip, almost none do
    for mode in (EncoderMode("tf32"), EncoderMode("bf16", channels_last=True)):
        report = Encoder(loaded, torch.device("cuda"), mode, layout).agreement_with_exact(pixels)
        assert 0.5 < report["overall"] <= 1.0
