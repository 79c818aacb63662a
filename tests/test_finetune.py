"""`vqpipe finetune`: a few steps on the tiny preset over real tar shards lower the loss, and the checkpoint
it saves is a VAR state dict that the tokenize path loads strictly and encodes with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shards import good_image_bytes, write_shard
from test_job import job_config

from vqpipe.cli import main
from vqpipe.encode import build_encoder
from vqpipe.errors import ConfigError
from vqpipe.finetune import FinetuneConfig, finetune
from vqpipe.finetune_data import train_pixels
from vqpipe.model import build_model, load_checkpoint
from vqpipe.preprocess import preprocess


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny model: one intra-op thread is fastest on a busy 2-core CPU."""


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Two shards of real JPEG/PNG files, one sample without an image (skipped and counted)."""
    d = tmp_path_factory.mktemp("ft_shards")
    for s in range(2):
        samples = [
            {
                "__key__": f"{s}_{i}",
                "jpg" if i % 2 else "png": good_image_bytes(10 * s + i, "jpg" if i % 2 else "png", (80, 72)),
            }
            for i in range(4)
        ]
        if s == 1:
            samples.append({"__key__": "1_meta_only", "json": "{}"})
        write_shard(d / f"part-{s:06d}.tar", samples)
    return d


@pytest.mark.slow  # end to end: trains, evaluates, saves, then tokenizes with the result
def test_a_few_steps_lower_the_loss_and_the_checkpoint_tokenizes(shard_dir, tmp_path):
    out = tmp_path / "tiny-ft.pth"
    cfg = FinetuneConfig(
        inputs=(str(shard_dir),), out=str(out), steps=8, lr=1e-3, batch_size=2, shuffle_buffer=4,
        eval_images=2, eval_every=4,
    )  # fmt: skip
    result = finetune(cfg)
    assert len(result.losses) == 8 and [e.step for e in result.evals] == [0, 4, 8]
    # The reconstruction error (as PSNR) of the same fixed images, through codes, falls: the first steps
    # leave random init's noise far behind; single steps on random crops at batch 2 are too noisy to compare.
    before, during, after = (e.psnr for e in result.evals)
    assert max(during, after) > before + 1.0 and after > before, result.evals
    assert result.skipped_samples >= 1 and len(result.usages) == 4

    # The file is a plain state dict that loads strictly into the preset, and it holds the trained weights.
    state = torch.load(out, weights_only=True)
    assert isinstance(state, dict) and list(state) == list(build_model("tiny").state_dict())
    assert state["quantize.ema_vocab_hit_SV"].any()  # the usage EMA was recorded (and is saved, as VAR does)
    trained = build_model("tiny")
    load_checkpoint(trained, str(out))
    assert not torch.equal(trained.encoder.conv_in.weight, build_model("tiny").encoder.conv_in.weight)

    # tokenize's own loading and encoding path gives the trained model's codes.
    encoder, sha, resolution = build_encoder(
        job_config([shard_dir], tmp_path / "tok", model={"checkpoint": str(out), "random_weights": False})
    )
    pixels = np.stack([preprocess(good_image_bytes(i, "png", (80, 72)), resolution) for i in range(3)])
    codes, _ = encoder(pixels)
    with torch.no_grad():
        x = torch.from_numpy(pixels).float().div(255).mul(2).sub(1)
        want = torch.cat(trained.img_to_idxBl(x), dim=1).numpy()
    assert len(sha) == 64 and np.array_equal(codes.astype(np.int64), want)


@pytest.mark.slow  # two CLI training runs end to end
def test_cli_trains_and_saves(shard_dir, tmp_path):
    out = tmp_path / "cli.pth"
    argv = ["finetune", str(shard_dir), "--out", str(out), "--steps", "1", "--batch-size", "1"]
    assert main([*argv, "--eval-images", "0", "--model", "tiny", "--seed", "3", "--recon-loss", "l2"]) == 0
    load_checkpoint(build_model("tiny"), str(out))
    # Starting from that checkpoint works too; a bad option is a usage error, not a traceback.
    assert (
        main(
            [*argv[:-4], "--steps", "1", "--batch-size", "1", "--eval-images", "0", "--checkpoint", str(out)]
        )
        == 0
    )
    assert main([*argv[:-4], "--steps", "0"]) == 2


def test_bad_settings_and_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown model preset"):
        FinetuneConfig(inputs=("x",), out="o.pth", preset="nope")
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        FinetuneConfig(inputs=("x",), out="o.pth", steps=0)
    (tmp_path / "empty").mkdir()
    write_shard(tmp_path / "empty" / "a.tar", [{"__key__": "k", "txt": "no image"}])
    with pytest.raises(ConfigError, match="no readable image"):
        finetune(
            FinetuneConfig(inputs=(str(tmp_path / "empty"),), out=str(tmp_path / "o.pth"), eval_images=0)
        )
    assert not (tmp_path / "o.pth").exists()


def test_train_crop_is_random_within_the_resized_image():
    data = good_image_bytes(0, "png", (160, 80))
    crops = {train_pixels(data, 64, np.random.default_rng(s)).tobytes() for s in range(6)}
    assert len(crops) > 1 and all(len(c) == 3 * 64 * 64 for c in crops)
    flipped = train_pixels(good_image_bytes(1, "png", (64, 64)), 64, np.random.default_rng(1), hflip=True)
    plain = train_pixels(good_image_bytes(1, "png", (64, 64)), 64, np.random.default_rng(1), hflip=False)
    assert flipped.shape == plain.shape == (3, 64, 64)
