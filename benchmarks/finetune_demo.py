"""How many fine-tuning steps (and CPU minutes) make a small tokenizer's reconstructions look like the images?

Writes the built-in sample dataset (`vqpipe sample`), trains a preset (`demo` by default) from its random init with
`vqpipe.finetune` (the same code as `vqpipe finetune`), and prints reconstruction PSNR on the first images at
regular steps with the wall and CPU time spent so far. With --grid it also writes a PNG: originals on top,
random-init reconstructions in the middle, fine-tuned reconstructions at the bottom.

    python benchmarks/finetune_demo.py --model demo --steps 200 --eval-every 25 --threads 1 --grid recon.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqpipe.finetune import FinetuneConfig, finetune
from vqpipe.finetune_data import ShardImages, eval_images
from vqpipe.logs import setup_logging
from vqpipe.model import PRESETS, build_model, load_checkpoint
from vqpipe.sample import write_sample_dataset
from vqpipe.storage import expand_inputs


def _grid(rows: list[torch.Tensor], path: str) -> None:
    """Rows of (N, 3, R, R) images in [-1, 1] -> one PNG, 2x nearest upscaled."""
    tiles = [torch.cat(list(row.clamp(-1, 1)), dim=2) for row in rows]  # (3, R, N*R) each
    img = ((torch.cat(tiles, dim=1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(img)).resize((img.shape[1] * 2, img.shape[0] * 2), 0).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards-dir", help="existing shards (default: a fresh `vqpipe sample` in a temp dir)")
    p.add_argument("--model", default="demo", help="preset to train (demo, tiny, ...)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-images", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--recon-loss", default="l1")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--grid", help="write originals / before / after reconstructions to this PNG")
    p.add_argument("--json", help="write the measurements to this file")
    args = p.parse_args()
    setup_logging("INFO")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards_dir or str(Path(tmp) / "shards")
        if not args.shards_dir:
            write_sample_dataset(shards)
        out = str(Path(tmp) / f"{args.model}-finetuned.pth")
        cfg = FinetuneConfig(
            inputs=(shards,), out=out, preset=args.model, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
            recon_loss=args.recon_loss, eval_images=args.eval_images, eval_every=args.eval_every,
            log_every=args.eval_every or args.steps,
        )  # fmt: skip
        result = finetune(cfg)
        print(
            f"{args.model}: torch threads {torch.get_num_threads()}, batch {args.batch_size}, lr {args.lr}, {args.recon_loss}"
        )
        print(f"{'step':>5} {'PSNR dB':>8} {'wall s':>7} {'CPU s':>7}")
        for e in result.evals:
            print(f"{e.step:>5} {e.psnr:>8.2f} {e.seconds:>7.0f} {e.cpu_seconds:>7.0f}")
        if args.grid:
            images = eval_images(
                ShardImages(expand_inputs([shards]), None, 0), PRESETS[args.model].resolution, 8
            )
            before = build_model(args.model, seed=cfg.seed)  # (its codebook is not the data-drawn one)
            after = build_model(args.model)
            load_checkpoint(after, out)
            with torch.no_grad():
                rows = [images] + [m.img_to_reconstructed_img(images) for m in (before, after)]
            _grid(rows, args.grid)
            print(f"wrote {args.grid}")
    if args.json:
        Path(args.json).write_text(json.dumps([e.__dict__ for e in result.evals], indent=2))


if __name__ == "__main__":
    main()
