"""The `demo` preset (the README quick start's tokenizer): its layout, a strict checkpoint round trip, and
`vqpipe finetune --model demo` -> `vqpipe tokenize --model demo --checkpoint` on real image shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shards import good_image_bytes, write_shard
from test_job import job_config

from vqpipe.encode import build_encoder
from vqpipe.finetune import FinetuneConfig, finetune, save_checkpoint
from vqpipe.model import PRESETS, build_model, load_checkpoint
from vqpipe.model.checkpoint import fitting_presets
from vqpipe.preprocess import preprocess


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Small model: one intra-op thread is fastest on a busy 2-core CPU."""


def test_layout_is_64px_with_a_16x16_last_scale():
    p = PRESETS["demo"]
    assert (p.resolution, p.downsample, p.patch_nums[-1]) == (64, 4, 16)
    assert p.seq_len == 1 + 4 + 16 + 64 + 256
    # Every GroupNorm (32 groups) sees at least 2 channels per group: see the preset's comment.
    model = build_model("demo")
    widths = {m.num_channels for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert min(widths) >= 64, widths


def test_checkpoint_round_trips_strictly(tmp_path):
    trained = build_model("demo", seed=5)
    path = tmp_path / "demo.pth"
    save_checkpoint(trained, str(path))
    state = torch.load(path, weights_only=True)
    assert fitting_presets(state) == ["demo"]  # told apart from every other preset by its shapes
    loaded = build_model("demo", seed=0)
    load_checkpoint(loaded, str(path))
    for name, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_finetuned_demo_checkpoint_tokenizes(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    samples = [{"__key__": f"k{i}", "jpg": good_image_bytes(i, "jpg", (96, 80))} for i in range(4)]
    write_shard(shards / "part-000000.tar", samples)
    out = tmp_path / "demo-ft.pth"
    cfg = FinetuneConfig(
        inputs=(str(shards),), out=str(out), preset="demo", steps=3, batch_size=2, shuffle_buffer=2,
        eval_images=2, log_every=3,
    )  # fmt: skip
    result = finetune(cfg)
    assert len(result.losses) == 3 and len(result.usages) == len(PRESETS["demo"].patch_nums)
    trained = build_model("demo")
    load_checkpoint(trained, str(out))

    encoder, _, resolution = build_encoder(
        job_config(
            [shards],
            tmp_path / "tok",
            model={"preset": "demo", "checkpoint": str(out), "random_weights": False},
        )
    )
    pixels = np.stack([preprocess(good_image_bytes(i, "jpg", (96, 80)), resolution) for i in range(2)])
    codes, _ = encoder(pixels)
    with torch.no_grad():
        x = torch.from_numpy(pixels).float().div(255).mul(2).sub(1)
        want = torch.cat(trained.img_to_idxBl(x), dim=1).numpy()
    assert codes.shape == (2, PRESETS["demo"].seq_len) and np.array_equal(codes.astype(np.int64), want)
