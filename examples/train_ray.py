"""Train a (toy) VAR-style next-scale model on vqpipe tokens with Ray Train; a checkpoint per epoch, resumable.

    python examples/train_ray.py tokens/ --workers 2 --epochs 2 --storage /tmp/ray_results --name toy
    python examples/train_ray.py tokens/ --workers 2 --epochs 4 --storage /tmp/ray_results --name toy  # resumes

`vqpipe.raydata.read_tokens(OUT)` is every committed row once; Ray Train splits it among the workers each epoch
with an equal split (every worker the same number of rows, so DDP never waits on a worker with fewer batches):
up to workers - 1 rows may sit out an epoch, none is seen twice. On GPUs: --gpu (ScalingConfig(use_gpu=True)).
The model and its step are train_ddp.py's (ToyVAR: VAR's interface, not its transformer); with codes-only OUTs
(--no-var-input) pass --checkpoint vae.pth: var_input is then rebuilt on the device by VarInputBuilder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.cloudpickle
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device, prepare_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_ddp  # noqa: E402 - the same toy model as the DDP example

from vqpipe.data import TokenDataset, VarInputBuilder  # noqa: E402
from vqpipe.raydata import TokenCollate, read_tokens  # noqa: E402

# Ray Train's workers get the loop and the model by value: neither file is part of an installed package.
ray.cloudpickle.register_pickle_by_value(train_ddp)
if __name__ != "__main__":
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: its share of each epoch's rows, a checkpoint (rank 0) and a report per epoch."""
    rank, device = ray.train.get_context().get_world_rank(), get_device()
    torch.manual_seed(0)
    toy = train_ddp.ToyVAR(config["num_classes"], config["cvae"], config["vocab"]).to(device)
    model = prepare_model(toy)  # DDP when there are several workers
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    builder = None
    if config["checkpoint"]:  # codes-only OUT: var_input rebuilt from the codes
        builder = VarInputBuilder.from_checkpoint(config["checkpoint"], config["preset"], device)
    start = 0
    checkpoint = ray.train.get_checkpoint()  # the last one of this run name, when it ran before
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=True)
        toy.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["epoch"] + 1
        print(f"rank {rank}: resumed after epoch {state['epoch']}", flush=True)

    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start, config["epochs"]):
        keys: list[str] = []
        loss = torch.zeros(())
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"], collate_fn=TokenCollate()):
            loss = train_ddp.train_step(
                model, opt, batch, builder, device
            )  # var_batch takes Ray's batch as is
            keys += batch["key"]
        if config["log_keys"]:
            log = Path(config["log_keys"], f"keys-epoch{epoch}-rank{rank}.txt")
            log.write_text("".join(k + "\n" for k in keys))
        metrics = {"epoch": epoch, "loss": loss.item(), "rows": len(keys)}
        with tempfile.TemporaryDirectory() as d:
            saved = None
            if rank == 0:  # every rank holds the same weights after the step; one copy is enough
                torch.save(
                    {"model": toy.state_dict(), "opt": opt.state_dict(), "epoch": epoch}, Path(d, "state.pt")
                )
                saved = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=saved)  # every rank reports: it is a barrier


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", help="a vqpipe OUT (local path or fsspec URL)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker")
    ap.add_argument("--epochs", type=int, default=2, help="train until this many epochs are done in total")
    ap.add_argument("--batch-size", type=int, default=8, help="per worker")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--checkpoint", help="tokenizer weights, to rebuild var_input when the OUT has none")
    ap.add_argument("--storage", default="ray_results", help="Ray Train's storage_path (checkpoints)")
    ap.add_argument("--name", default="vqpipe-toy", help="the run's name: the same name resumes")
    ap.add_argument("--log-keys", help="write each epoch's keys per worker to DIR/keys-epochE-rankR.txt")
    args = ap.parse_args(argv)

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS, or a new local cluster
    meta = TokenDataset(args.out, columns=()).metadata
    stored = meta["var_input"] is not None
    if not stored and not args.checkpoint:
        sys.exit(f"{args.out} has no var_input: pass --checkpoint to rebuild it from the codes")
    config = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "num_classes": args.num_classes,
        "cvae": meta["cvae"],
        "vocab": meta["vocab_size"],
        "preset": meta["model"]["preset"],
        "checkpoint": None if stored else args.checkpoint,
        "log_keys": args.log_keys,
    }
    columns = ("key", "label", "codes", "var_input") if stored else ("key", "label", "codes")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu),
        run_config=RunConfig(
            name=args.name,
            storage_path=os.path.abspath(args.storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": read_tokens(args.out, columns)},
    )
    result = trainer.fit()
    print(f"done: {result.metrics}; checkpoint {result.checkpoint}", flush=True)
    return dict(result.metrics or {})


if __name__ == "__main__":
    main()
