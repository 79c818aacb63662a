"""The Ray Data recipe: read raw WebDataset members, preprocess in CPU tasks (or fused into the actor), encode
in one actor, write Parquet."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray.cloudpickle
import torch

from vqpipe.config import build_config
from vqpipe.encode import build_encoder
from vqpipe.errors import SampleError
from vqpipe.preprocess import IMAGE_EXTENSIONS, preprocess

_PREPROCESS_MEMORY = 256 << 20  # a block of raw members plus its decoded pixels, with room to spare

# The callables below are shipped to Ray's workers by value, so workers need not import this module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def ray_preprocess(batch: dict[str, np.ndarray], resolution: int) -> dict[str, np.ndarray]:
    """Raw WebDataset members -> key, label, meta, uint8 pixels (the same function the job uses)."""
    columns = [c for c in IMAGE_EXTENSIONS if c in batch]
    keys, labels, metas, pixels = [], [], [], []
    for i, key in enumerate(batch["__key__"]):
        data = next((batch[c][i] for c in columns if isinstance(batch[c][i], bytes)), None)
        try:
            pixels.append(preprocess(data, resolution))
        except (SampleError, TypeError):
            continue
        keys.append(key)
        labels.append(int(batch["cls"][i]) if "cls" in batch else -1)
        metas.append(batch["json"][i].decode() if "json" in batch else "")
    return {
        "key": np.array(keys),
        "label": np.array(labels),
        "meta": np.array(metas),
        "pixels": np.stack(pixels),
    }


class RayEncoder:
    """One model replica in a Ray Data actor, built from the same job config as vqpipe's."""

    def __init__(self, cfg: dict[str, Any], threads: int):
        torch.set_num_threads(threads)
        self.encoder, _, _ = build_encoder(build_config(cfg))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        codes, var_input = self.encoder(np.require(batch.pop("pixels"), requirements=("C", "W")))
        return {**batch, "codes": codes, "var_input": var_input}


def ray_data(
    args: argparse.Namespace, cfg: dict[str, Any], paths: list[str], out: Path, resolution: int, fused: bool
) -> dict:
    """The recipe: read raw WebDataset members, preprocess in CPU tasks, encode in one actor, write Parquet.

    On a CPU-only cluster Ray Data fuses the preprocessing into the encoder actor when both ask for the same
    resources (a GPU actor never does), so decoding then runs inside the actor, between batches. `fused=False`
    keeps it in separate CPU tasks, as on a GPU cluster: a memory request on the preprocess step (any
    difference in resources) stops the fusion.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    cuda = cfg["run"]["gpus_per_replica"] > 0
    t = time.perf_counter()
    ds = ray.data.read_webdataset(
        paths, decoder=None
    )  # raw bytes: the default decoder would unpickle .pkl/.pth
    ds = ds.map_batches(
        ray_preprocess,
        fn_kwargs={"resolution": resolution},
        batch_format="numpy",
        **({} if fused else {"memory": _PREPROCESS_MEMORY}),
    )
    ds = ds.map_batches(
        RayEncoder,
        fn_constructor_kwargs={"cfg": cfg, "threads": args.cpus},
        batch_size=args.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,  # the preprocess tasks need the other CPUs; the actor still runs --cpus torch threads
        num_gpus=1 if cuda else 0,
    )
    ds.write_parquet(str(out))
    seconds = time.perf_counter() - t
    images = pq.ParquetDataset(str(out)).read(columns=["key"]).num_rows
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "fused": fused}


def ray_tokenize(args: argparse.Namespace, cfg: dict[str, Any], paths: list[str], out: Path) -> dict:
    """vqpipe.raydata.Tokenize in the same Ray Data pipeline: raw members -> one actor that decodes and encodes with
    the job's code, a batch at a time -> the rows without an error -> Parquet.

    Like the recipe's actor it holds one Ray CPU (the read tasks need the other) and runs --cpus torch threads
    (OMP_NUM_THREADS, which Ray otherwise sets to the actor's num_cpus); like the job's replica it decodes a
    batch's images on --cpus threads."""
    import ray.data
    from ray.data.expressions import col

    from vqpipe.raydata import Tokenize

    model = cfg["model"]
    settings = {k: model[k] for k in ("precision", "channels_last", "compile")}
    settings.update(model=model["preset"], checkpoint=model.get("checkpoint"))
    settings.update(random_weights=model.get("random_weights", False), decode_threads=args.cpus)
    t = time.perf_counter()
    ds = ray.data.read_webdataset(paths, decoder=None).map_batches(
        Tokenize,
        fn_constructor_kwargs=settings,
        batch_size=args.batch_size,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
        num_gpus=1 if cfg["run"]["gpus_per_replica"] > 0 else 0,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.cpus)}},
    )
    ds.filter(expr=col("error").is_null()).write_parquet(str(out))
    seconds = time.perf_counter() - t
    images = pq.ParquetDataset(str(out)).read(columns=["key"]).num_rows
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}
