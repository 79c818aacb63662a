"""Train a (toy) VAR-style next-scale model on vqpipe tokens with DistributedDataParallel; resumable.

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py tokens/ --steps 20 --ckpt run/ckpt
    torchrun ... same command again          # continues from run/ckpt: no sample repeated, none skipped

CPU + gloo here; on GPUs use backend "nccl" and device f"cuda:{local_rank}". With codes-only OUTs
(--no-var-input) pass --checkpoint vae.pth: var_input is then rebuilt on the device by VarInputBuilder.
Every rank sees the same number of batches (TokenDataset mirrors DistributedSampler), so DDP never hangs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from vqpipe.data import TokenDataset, VarInputBuilder, var_batch


class ToyVAR(nn.Module):
    """VAR's interface, not its transformer: a class token starts the sequence, x_BLCv_wo_first_l feeds the rest,
    and every position predicts its code (gt_BL). Label `num_classes` is VAR's "no class" (unlabeled rows)."""

    def __init__(self, num_classes: int, cvae: int, vocab: int, width: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, width)
        self.word_embed = nn.Linear(cvae, width)
        self.mlp = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, vocab)
        )

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        label_B = torch.where(label_B < 0, self.num_classes, label_B)  # label_fill -1 -> "no class"
        h = torch.cat([self.class_emb(label_B)[:, None], self.word_embed(x_BLCv_wo_first_l)], dim=1)
        return self.mlp(h)  # (B, L, vocab)


def save_atomically(state: dict, path: Path) -> None:
    """A checkpoint is whole or absent: written to a temporary file, flushed to disk, then renamed over the
    previous one, which is kept as `<name>.prev` (a kill mid-save once left an unloadable checkpoint)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, path.with_name(path.name + ".prev"))
    os.replace(tmp, path)


def load_last_good(path: Path) -> dict | None:
    """The newest checkpoint that loads: `path`, else the one before it (`<name>.prev`), else None."""
    for candidate in (path, path.with_name(path.name + ".prev")):
        if candidate.exists():
            try:
                return torch.load(candidate, weights_only=True)
            except Exception as e:  # noqa: BLE001 - damaged by something outside this script: try the older one
                print(
                    f"{candidate}: cannot be loaded ({type(e).__name__}: {e}); trying an older one",
                    flush=True,
                )
    return None


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch, builder, device) -> torch.Tensor:
    """One step on a token batch (TokenDataset's, or Ray's iter_torch_batches of read_tokens): its loss."""
    b = var_batch(batch, builder, device)
    logits = model(b["label_B"], b["x_BLCv_wo_first_l"])
    loss = F.cross_entropy(logits.flatten(0, 1), b["gt_BL"].flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", help="a vqpipe OUT (local path or fsspec URL)")
    ap.add_argument("--steps", type=int, default=20, help="stop after this many steps in total")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8, help="per rank")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--checkpoint", help="tokenizer weights, to rebuild var_input when the OUT has none")
    ap.add_argument("--ckpt", default="train_ckpt", help="where each rank saves/resumes its training state")
    ap.add_argument(
        "--log-keys", action="store_true", help="append each trained row's key to CKPT/keys-rankN.txt"
    )
    ap.add_argument("--init-method", default="env://", help="torch.distributed rendezvous (torchrun: env://)")
    args = ap.parse_args()
    Path(args.ckpt).mkdir(parents=True, exist_ok=True)

    # torchrun sets RANK and WORLD_SIZE (and MASTER_ADDR/PORT for env://)
    dist.init_process_group(
        "gloo",
        init_method=args.init_method,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    rank = dist.get_rank()
    device = torch.device("cpu")
    torch.manual_seed(0)

    probe = TokenDataset(args.out, columns=())
    stored = probe.metadata["var_input"] is not None
    columns = ("codes", "label", "var_input") if stored else ("codes", "label")
    dataset = TokenDataset(
        args.out, columns=columns, batch_size=args.batch_size, seed=0
    )  # rank, world: from dist
    builder = (
        None
        if stored
        else VarInputBuilder.from_checkpoint(args.checkpoint, probe.metadata["model"]["preset"], device)
    )
    loader = DataLoader(
        dataset, batch_size=None
    )  # the dataset batches; num_workers > 0: torchdata StatefulDataLoader

    model = DDP(ToyVAR(args.num_classes, probe.metadata["cvae"], probe.metadata["vocab_size"]).to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step, epoch = 0, 0
    ckpt = Path(args.ckpt) / f"rank{rank}.pt"
    state = load_last_good(ckpt)
    if state is not None:
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        dataset.load_state_dict(state["data"])
        step, epoch = state["step"], state["data"]["epoch"]
        print(f"rank {rank}: resumed at step {step}, epoch {epoch}", flush=True)

    while epoch < args.epochs and step < args.steps:
        dataset.set_epoch(epoch)  # keeps a loaded state for this epoch
        for batch in loader:
            loss = train_step(model, opt, batch, builder, device)
            step += 1
            if args.log_keys:
                with open(Path(args.ckpt) / f"keys-rank{rank}.txt", "a") as f:
                    f.write("".join(k + "\n" for k in batch["key"]))
            if rank == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.3f}", flush=True)
            state = {
                "model": model.module.state_dict(),
                "opt": opt.state_dict(),
                "data": dataset.state_dict(),
            }
            save_atomically({**state, "step": step}, ckpt)
            if step >= args.steps:
                break
        else:
            epoch += 1
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
