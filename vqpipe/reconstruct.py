"""Codes -> images with the tokenizer's decoder, originals fetched back from the input shards, and the quality
of one against the other (PSNR, SSIM). Used by `vqpipe inspect` and `vqpipe decode`.

Images here are uint8 HWC arrays. A decoded image in [-1, 1] becomes pixels as `round((x + 1) · 127.5)`,
the inverse of the encoder's input scaling `x / 255 · 2 − 1`; originals are preprocessed exactly as the job
preprocessed them (`preprocess.preprocess`, VAR's validation transform), so the two compare pixel for pixel.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from . import storage
from .encode import load_model, pick_device
from .errors import ConfigError, SampleError, ShardError, StorageError
from .model import PRESETS, VQVAE, exact_mode
from .preprocess import DEFAULT_MAX_PIXELS, preprocess
from .reader import iter_samples
from .stats import summary_of

if TYPE_CHECKING:
    from .inspect import InspectOptions
    from .output_reader import OutputReader
    from .report import GridRow

logger = logging.getLogger(__name__)

# Rows are decoded one at a time: float convolutions may round differently with another batch composition,
# and a key must give the same picture whichever other rows were sampled with it (report, `vqpipe decode`).
_DECODE_BATCH = 1
_ENCODE_BATCH = 8  # re-encoding originals: a memory bound


@dataclass(frozen=True)
class Decoder:
    """A loaded tokenizer, ready to turn codes back into images."""

    model: VQVAE
    preset: str
    patch_nums: tuple[int, ...]
    model_sha256: str
    device: torch.device
    source: str  # the checkpoint URL (redacted) or "random weights"

    def scales(self, codes: np.ndarray) -> list[torch.Tensor]:
        """(B, L) concatenated codes -> VAR's idx_Bl: one (B, pn_k²) int64 tensor per scale."""
        offsets = np.cumsum([0] + [pn * pn for pn in self.patch_nums])
        if codes.shape[1] != offsets[-1]:
            raise ConfigError(
                f"codes have {codes.shape[1]} entries per row but preset {self.preset} expects {offsets[-1]}"
            )
        return [
            torch.from_numpy(codes[:, a:b].astype(np.int64)).to(self.device)
            for a, b in zip(offsets[:-1], offsets[1:])
        ]

    def images(self, codes: np.ndarray) -> np.ndarray:
        """(B, L) codes -> (B, R, R, 3) uint8: `idxBl_to_img` (the final image), in batches."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(codes), _DECODE_BATCH):
                out.append(to_uint8(self.model.idxBl_to_img(self.scales(codes[i : i + _DECODE_BATCH]))))
        return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)

    def progressive(self, codes: np.ndarray) -> list[list[np.ndarray]]:
        """Per row, the image after scales 1, 2, …, K (VAR's coarse-to-fine picture), each at full size."""
        rows: list[list[np.ndarray]] = []
        with torch.inference_mode():
            for i in range(0, len(codes), _DECODE_BATCH):
                per_scale = [
                    to_uint8(img)
                    for img in self.model.idxBl_to_img(
                        self.scales(codes[i : i + _DECODE_BATCH]), same_shape=True, last_one=False
                    )
                ]
                rows.extend([s[b] for s in per_scale] for b in range(len(per_scale[0])))
        return rows

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(B, R, R, 3) uint8 -> (B, L) codes the exact way the job encodes (float32, deterministic)."""
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).to(self.device)
        with exact_mode(), torch.inference_mode():
            idx = self.model.img_to_idxBl(x.float() / 255 * 2 - 1)
        return torch.cat(idx, dim=1).cpu().numpy()


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(B, 3, R, R) in [-1, 1] -> (B, R, R, 3) uint8 pixels."""
    pixels = ((img.float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def load_decoder(
    preset: str,
    checkpoint: str | None,
    storage_options: dict[str, Any] | None = None,
    device: str = "auto",
) -> Decoder:
    """The preset with the checkpoint's weights, or its fixed-seed random weights when `checkpoint` is None."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    dev = pick_device(device)
    loaded = load_model(preset, checkpoint, storage_options, dev)
    source = storage.redact(checkpoint) if checkpoint else "random weights"
    return Decoder(loaded.model, preset, loaded.preset.patch_nums, loaded.model_sha256, dev, source)


def fetch_originals(
    shard_id: str,
    url: str,
    keys: Sequence[str],
    resolution: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    storage_options: dict[str, Any] | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> dict[str, np.ndarray | str]:
    """key -> the original image, preprocessed as the job did it ((R, R, 3) uint8), or why it is missing.

    Streams the shard only until every wanted key was seen. When the done marker's input `fingerprint` is
    given and the input changed since, nothing is read: its images may no longer be the ones encoded.
    """
    wanted = set(keys)
    found: dict[str, np.ndarray | str] = {}
    try:
        if fingerprint and storage.input_version(url, storage_options) != fingerprint:
            return dict.fromkeys(keys, f"{url} changed since {shard_id} was committed")
        with storage.open_input(url, storage_options) as stream:
            for sample in iter_samples(stream, shard_id):
                if sample.key not in wanted or sample.key in found:
                    continue
                if sample.error is not None or sample.image is None:
                    found[sample.key] = f"{sample.error.reason if sample.error else 'no image'} in {url}"
                else:
                    try:
                        found[sample.key] = preprocess(sample.image, resolution, max_pixels).transpose(
                            1, 2, 0
                        )
                    except SampleError as e:
                        found[sample.key] = f"{e.reason}: {e.detail}"
                if len(found) == len(wanted):
                    break
    except (StorageError, ShardError, OSError) as e:
        reason = f"cannot read {url}: {storage.redact(str(e))}"
        return {k: found.get(k, reason) for k in keys}
    return {k: found.get(k, f"key not found in {url}") for k in keys}


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images, over all pixels and channels (inf if equal)."""
    mse = np.mean((original.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(original: np.ndarray, reconstruction: np.ndarray) -> float | None:
    """Mean structural similarity (scikit-image, colour channels averaged); None without scikit-image."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return None
    return float(structural_similarity(original, reconstruction, channel_axis=-1, data_range=255))


def measure(reader: OutputReader, opts: InspectOptions) -> tuple[dict[str, Any], list[GridRow], str | None]:
    """Decode a seeded sample of rows, fetch their originals, and measure PSNR/SSIM and code agreement.

    Returns the `quality` record of stats.json, the rows of the reconstruction grid, and a warning for the page
    when the model differs from the one the tokens were made with (its reconstructions then mean little)."""
    from .report import GridRow

    rows = reader.sample_rows(opts.samples, opts.seed)
    lay = reader.read_layout()
    decoder = load_decoder(opts.preset or lay.preset, opts.checkpoint, opts.storage_options)
    if decoder.patch_nums != lay.patch_nums:
        raise ConfigError(
            f"preset {decoder.preset} has scales {decoder.patch_nums}, the tokens {lay.patch_nums} ({lay.preset})"
        )
    note = None
    if decoder.model_sha256 != lay.model_sha256:
        note = (
            f"The tokens were made with model {lay.model_sha256[:16]}, not with {decoder.source} "
            f"({decoder.model_sha256[:16]}): reconstructions below do not show what the tokens hold."
        )
    codes = np.stack([r.codes for r in rows])
    images = decoder.images(codes)
    run = reader.ledger.read_run() or {}
    max_pixels = run.get("config", {}).get("encode", {}).get("max_image_pixels", DEFAULT_MAX_PIXELS)
    originals: dict[tuple[str, str], np.ndarray | str] = {}
    for shard_id in dict.fromkeys(r.shard_id for r in rows):
        inp = reader.input(shard_id)
        keys = [r.key for r in rows if r.shard_id == shard_id]
        got = fetch_originals(
            shard_id,
            inp.url,
            keys,
            lay.resolution,
            max_pixels,
            opts.storage_options,
            inp.fingerprint,
        )
        originals.update(((shard_id, k), v) for k, v in got.items())
    # Re-encoding the originals checks the whole chain: same preprocessing, same model, same codes.
    have = [i for i, r in enumerate(rows) if not isinstance(originals[r.shard_id, r.key], str)]
    agree: dict[int, float] = {}
    for i in range(0, len(have), _ENCODE_BATCH):
        part = have[i : i + _ENCODE_BATCH]
        recoded = decoder.encode(np.stack([originals[rows[j].shard_id, rows[j].key] for j in part]))
        agree.update((j, float((c == codes[j]).mean())) for j, c in zip(part, recoded))
    per_sample, missing = [], []
    for i, (row, img) in enumerate(zip(rows, images)):
        orig = originals[row.shard_id, row.key]
        rec: dict[str, Any] = {"shard": row.shard_id, "key": row.key, "label": row.label}
        if isinstance(orig, str):
            missing.append({**rec, "reason": orig})
        else:
            p = psnr(orig, img)
            rec.update(psnr=p if np.isfinite(p) else None, ssim=ssim(orig, img), codes_agree=agree[i])
        per_sample.append(rec)
    quality = {
        "model": decoder.source,
        "model_sha256": decoder.model_sha256,
        "seed": opts.seed,
        "samples": len(rows),
        "psnr": summary_of([r.get("psnr") for r in per_sample]),
        "ssim": summary_of([r.get("ssim") for r in per_sample]),
        "codes_agree": float(np.mean(list(agree.values()))) if agree else None,
        "per_sample": per_sample,
        "missing_originals": missing,
    }
    n = min(opts.grid_rows, len(rows))
    grid = []
    for row, rec, img, steps in zip(rows[:n], per_sample, images, decoder.progressive(codes[:n])):
        orig = originals[row.shard_id, row.key]
        label = f"{row.key} · {row.shard_id} · " + (
            f"no original: {orig}"
            if isinstance(orig, str)
            else f"PSNR {_fmt(rec.get('psnr'))} dB, SSIM {_fmt(rec.get('ssim'), 3)}"
        )
        grid.append(GridRow(label, None if isinstance(orig, str) else orig, img, steps))
    return quality, grid, note


def _fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def key_filename(key: str) -> str:
    """A file name for a WebDataset key (which may hold `/`), reversible with urllib.parse.unquote."""
    return urllib.parse.quote(key, safe="") + ".png"


def decode_keys(
    output: str,
    keys: list[str],
    to_dir: str,
    preset: str | None,
    checkpoint: str | None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[list[str], list[str]]:
    """Write `<to_dir>/<key>.png` (decoded codes) for each key; returns (paths written, keys not found).

    A key committed in several shards gets one file per shard, named `<key>@<shard_id>.png`."""
    from .output_reader import OutputReader

    reader = OutputReader.open(output, storage_options)
    rows = reader.find_keys(keys)
    if not rows:
        return [], keys
    decoder = load_decoder(preset or reader.read_layout().preset, checkpoint, storage_options)
    images = decoder.images(np.stack([r.codes for r in rows]))
    per_key = Counter(r.key for r in rows)
    os.makedirs(to_dir, exist_ok=True)
    paths = []
    for row, img in zip(rows, images):
        name = key_filename(row.key)
        if per_key[row.key] > 1:
            name = name[: -len(".png")] + f"@{row.shard_id}.png"
        paths.append(os.path.join(to_dir, name))
        Image.fromarray(img).save(paths[-1])
    return paths, [k for k in keys if k not in per_key]
