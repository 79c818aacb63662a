"""A rerun whose checkpoint is the one OUT's run.json records (same bytes, same preset) skips the driver's torch
check of it (issue 16: a no-op rerun needs neither torch, ~300 MB, nor the checkpoint in memory); other bytes
or another preset are checked again. In-process, no Ray."""

import hashlib
import json

import pytest
import torch

from vqpipe import job
from vqpipe.config import build_config
from vqpipe.errors import CheckpointError
from vqpipe.ledger import Ledger
from vqpipe.model import build_model
from vqpipe.model import checkpoint as checkpoint_module


@pytest.fixture
def checks(monkeypatch):
    """The checkpoints the driver checked with torch."""
    seen = []
    real = checkpoint_module.verify_checkpoint

    def verify(url, preset, storage_options=None):
        seen.append(url)
        return real(url, preset, storage_options)

    monkeypatch.setattr(checkpoint_module, "verify_checkpoint", verify)
    return seen


def test_the_checkpoint_run_json_records_is_not_checked_again(tmp_path, checks):
    ckpt, out = tmp_path / "vae.pth", tmp_path / "out"
    torch.save(build_model("tiny", seed=3).state_dict(), ckpt)
    model = {"preset": "tiny", "checkpoint": str(ckpt)}
    cfg = build_config({"inputs": [str(tmp_path / "in")], "output": str(out), "model": model})
    ledger = Ledger(str(out))
    sha = job.model_sha256(cfg, ledger)  # a first run: checked
    assert sha == hashlib.sha256(ckpt.read_bytes()).hexdigest() and len(checks) == 1
    assert not out.exists()  # only read
    ledger.start_run(job.run_record(cfg, sha), allow_change=False)  # what the run writes once checked
    assert job.model_sha256(cfg, ledger) == sha and len(checks) == 1  # the same bytes: not again

    run = json.loads((out / "_vqpipe" / "run.json").read_text())
    run["output_settings"]["preset"] = "other"
    (out / "_vqpipe" / "run.json").write_text(json.dumps(run))
    assert job.model_sha256(cfg, ledger) == sha and len(checks) == 2  # recorded for another preset: again

    ledger.start_run(job.run_record(cfg, sha), allow_change=True)
    torch.save({"not": torch.zeros(1)}, ckpt)  # other bytes, and they do not fit
    with pytest.raises(CheckpointError, match="does not fit"):
        job.model_sha256(cfg, ledger)
    assert len(checks) == 3
