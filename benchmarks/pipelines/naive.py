"""The obvious single-threaded loop: read, decode, encode, write, one after the other."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from vqpipe.encode import Encoder
from vqpipe.errors import SampleError
from vqpipe.preprocess import preprocess
from vqpipe.reader import iter_samples
from vqpipe.schema import data_schema
from vqpipe.writer import ShardWriter

from .common import ROWS_PER_GROUP


def naive(encoder: Encoder, paths: list[str], out: Path, resolution: int, batch_size: int) -> dict[str, Any]:
    """The obvious single-threaded loop: one shard at a time, each stage waits for the one before it.

    It writes with vqpipe's own ShardWriter, so the files and their Parquet settings are the job's.
    """
    schema = data_schema(encoder.layout)
    clock: Counter = Counter()
    images = 0
    start = time.perf_counter()

    def flush(writer: ShardWriter, batch: list) -> None:
        keys, labels, metas, pixels = zip(*batch)
        t = time.perf_counter()
        codes, var_input = encoder(np.stack(pixels))
        clock["encode"] += time.perf_counter() - t
        t = time.perf_counter()
        writer.write(keys, labels, metas, codes, var_input)
        clock["write"] += time.perf_counter() - t

    for path in paths:
        name = Path(path).stem
        with (
            open(path, "rb") as f,
            ShardWriter(
                str(out / "data" / f"{name}.parquet"),
                str(out / "errors" / f"{name}.parquet"),
                schema,
                ROWS_PER_GROUP,
            ) as writer,
        ):
            samples, batch = iter_samples(f, name), []
            while True:
                t = time.perf_counter()
                sample = next(samples, None)
                clock["read"] += time.perf_counter() - t
                if sample is None:
                    break
                t = time.perf_counter()
                try:
                    pixels = preprocess(sample.image, resolution)  # a sample the reader rejected has no bytes
                except SampleError:
                    continue
                finally:
                    clock["decode"] += time.perf_counter() - t
                batch.append((sample.key, sample.label, sample.meta, pixels))
                images += 1
                if len(batch) == batch_size:
                    flush(writer, batch)
                    batch = []
            if batch:
                flush(writer, batch)
            t = time.perf_counter()
            writer.commit()
            clock["write"] += time.perf_counter() - t
    seconds = time.perf_counter() - start
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "stage_seconds": dict(clock),
    }
