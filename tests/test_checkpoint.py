"""load_checkpoint: round trip through a real .pth file, digest, and a clear CheckpointError for each bad input."""

from __future__ import annotations

import datetime
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from vqpipe.errors import CheckpointError
from vqpipe.model import PRESETS, VQVAE, build_model, load_checkpoint
from vqpipe.model.checkpoint import check_state_dict, fitting_presets


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Every test in this module runs on one intra-op thread."""


@pytest.fixture(scope="module")
def source() -> VQVAE:
    m = build_model("tiny", seed=3)
    with torch.no_grad():
        # Small codebook rows (encoder features are ~0.2) so random-weight codes vary.
        m.quantize.embedding.weight.mul_(0.2)
    return m


@pytest.fixture
def state(source) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in source.state_dict().items()}


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_round_trip_gives_identical_codes_and_the_file_digest(source, state, tmp_path):
    path = _save(state, tmp_path / "vae.pth")
    target = build_model("tiny", seed=4)
    digest = load_checkpoint(target, str(path))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        want, got = source.img_to_idxBl(img), target.img_to_idxBl(img)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert len(torch.cat(got, 1).unique()) > 3


def test_fsspec_url(state, tmp_path):
    path = _save(state, tmp_path / "vae.pth")
    assert (
        load_checkpoint(build_model("tiny"), f"file://{path}", storage_options={})
        == hashlib.sha256(path.read_bytes()).hexdigest()
    )


def test_ten_row_hit_buffer_loads_into_a_four_scale_model(state, tmp_path):
    state["quantize.ema_vocab_hit_SV"] = torch.ones(10, 64)
    target = build_model("tiny")
    load_checkpoint(target, str(_save(state, tmp_path / "vae.pth")))
    assert target.quantize.ema_vocab_hit_SV.shape == (4, 64)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(build_model("tiny"), str(tmp_path / "nope.pth"))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (bytes(range(256)) * 64, "not a PyTorch file"),
        (json.dumps({"encoder.conv_in.weight": [1.0]}).encode(), "not a PyTorch file"),
        (b"PK\x03\x04" + bytes(100), "not a readable PyTorch file"),  # a broken zip
        # Not on the weights_only allow-list: refused, never executed.
        (
            pickle.dumps(datetime.date(2024, 1, 1), protocol=2),
            "holds objects that weights_only=True refuses to load .*datetime.date",
        ),
    ],
    ids=["empty", "random-bytes", "json", "broken-zip", "foreign-pickle"],
)
def test_not_a_torch_file(content, reason, tmp_path):
    path = tmp_path / "vae.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"vae\.pth: {reason}"):
        load_checkpoint(build_model("tiny"), str(path))


def test_not_a_dict(tmp_path):
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_checkpoint(build_model("tiny"), str(_save([1, 2, 3], tmp_path / "vae.pth")))


def test_non_tensor_entries(state, tmp_path):
    state["epoch"] = 3
    with pytest.raises(CheckpointError, match=r"non-tensor entries: epoch \(int\)"):
        load_checkpoint(build_model("tiny"), str(_save(state, tmp_path / "vae.pth")))


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_wrapper_dict(state, key, tmp_path):
    path = _save({key: state, "epoch": 7}, tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match=f"looks like a wrapper.*'{key}'"):
        load_checkpoint(build_model("tiny"), str(path))


def test_missing_and_unexpected_keys(state, tmp_path):
    dropped = list(state)[:7]
    for k in dropped:
        del state[k]
    state["extra.a"] = torch.zeros(1)
    state["extra.b"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build_model("tiny"), str(_save(state, tmp_path / "vae.pth")))
    msg = str(err.value)
    assert "7 missing key(s)" in msg and all(k in msg for k in dropped[:5]) and "(+2 more)" in msg
    assert dropped[5] not in msg
    assert "2 unexpected key(s): extra.a, extra.b" in msg


def test_ddp_prefix_hint(state, tmp_path):
    path = _save({f"module.{k}": v for k, v in state.items()}, tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match="'module.' prefix"):
        load_checkpoint(build_model("tiny"), str(path))


def test_shape_mismatch_names_key_shapes_and_fitting_preset(state, tmp_path):
    wider = VQVAE(**{**PRESETS["tiny"].model_kwargs(), "vocab_size": 128})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(wider, str(_save(state, tmp_path / "vae.pth")))
    msg = str(err.value)
    assert "quantize.embedding.weight: checkpoint (64, 8) vs model (128, 8)" in msg
    assert "fits preset(s): tiny" in msg


def test_hit_buffer_with_wrong_vocab_is_a_mismatch(state):
    state["quantize.ema_vocab_hit_SV"] = torch.zeros(4, 65)
    with pytest.raises(CheckpointError, match=r"ema_vocab_hit_SV: checkpoint \(4, 65\) vs model \(4, 64\)"):
        check_state_dict(build_model("tiny"), state)


def test_released_checkpoint_layout_is_recognised():
    # A meta-device state dict has the released checkpoint's keys and shapes without its 436 MB.
    with torch.device("meta"):
        released = VQVAE().state_dict()
    assert fitting_presets(released) == ["var256", "var512"]
    with pytest.raises(CheckpointError, match=r"fits preset\(s\): var256, var512") as err:
        check_state_dict(build_model("tiny"), released)
    assert "encoder.conv_in.weight: checkpoint (160, 3, 3, 3) vs model (32, 3, 3, 3)" in str(err.value)


def test_unknown_architecture_is_described(state):
    state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    with pytest.raises(
        CheckpointError,
        match="No preset in PRESETS .* fits the checkpoint .*vocab_size 64, z_channels 8, ch 32",
    ):
        check_state_dict(build_model("tiny"), state)


def test_check_does_not_mutate_the_callers_dict(state):
    state["quantize.ema_vocab_hit_SV"] = buf = torch.ones(10, 64)
    before = dict(state)
    check_state_dict(build_model("tiny"), state)
    build_model("tiny").load_state_dict(state)
    assert state == before and state["quantize.ema_vocab_hit_SV"] is buf and buf.shape == (10, 64)


def test_model_package_does_not_import_fsspec():
    package = Path(__file__).resolve().parents[1] / "vqpipe" / "model"
    assert not [p.name for p in package.glob("*.py") if "fsspec" in p.read_text()]
