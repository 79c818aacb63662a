"""Load a VAR tokenizer checkpoint (a flat state dict) from any URL, checked key by key before loading.

Every way a checkpoint can fail to fit becomes a `CheckpointError` that names the file and the problem, so a
user never has to read a torch traceback. Loading is `weights_only=True`: nothing in the file is executed.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import CheckpointError, StorageError
from ..storage import sha256_of
from .presets import PRESETS, ModelPreset
from .vqvae import EMA_KEY, VQVAE

logger = logging.getLogger(__name__)

_SHOW = 5  # names listed per problem kind


def load_checkpoint(model: VQVAE, url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Load the state dict at `url` into `model` (strictly) and return the file's sha256 hex digest."""
    buf, digest = _read(url, storage_options)
    state = _deserialize(buf, url)
    del buf
    check_state_dict(model, state, url)
    model.load_state_dict(state, strict=True)
    logger.info("loaded checkpoint %s (%d tensors, sha256 %s)", url, len(state), digest)
    return digest


def verify_checkpoint(url: str, preset: str, storage_options: dict[str, Any] | None = None) -> str:
    """Check that the checkpoint at `url` would load strictly into `preset` and return its sha256, building
    no weights (tensors land on the meta device): the driver's check, before OUT is touched or Ray starts."""
    buf, digest = _read(url, storage_options)
    state = _deserialize(buf, url, map_location="meta")
    del buf
    with torch.device("meta"):
        model = VQVAE(**PRESETS[preset].model_kwargs())
    check_state_dict(model, state, url)
    return digest


def _read(url: str, storage_options: dict[str, Any] | None) -> tuple[io.BytesIO, str]:
    # Hash while reading: the digest then describes exactly the bytes that were loaded.
    buf = io.BytesIO()
    try:
        digest = sha256_of(url, storage_options, keep=buf)
    except StorageError as e:
        raise CheckpointError(f"checkpoint {url}: file not found ({e})") from e
    except OSError as e:
        raise CheckpointError(f"checkpoint {url}: cannot be read ({type(e).__name__}: {e})") from e
    buf.seek(0)
    return buf, digest


def _deserialize(buf: io.BytesIO, url: str, map_location: str = "cpu") -> Any:
    head = buf.read(16)
    buf.seek(0)
    if not head:
        raise CheckpointError(f"checkpoint {url}: the file is empty")
    # torch.save writes a zip archive (or, legacy, a protocol-2 pickle); say so plainly for anything else.
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise CheckpointError(f"checkpoint {url}: not a PyTorch file (it starts with {head!r})")
    try:
        return torch.load(buf, map_location=map_location, weights_only=True)
    # torch raises many types for foreign bytes (UnpicklingError, RuntimeError, EOFError, ...).
    except Exception as e:
        raise CheckpointError(f"checkpoint {url}: {_load_failure(e)}") from e


def _load_failure(e: Exception) -> str:
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        # torch's message is mostly advice to disable weights_only; keep the actual reason only.
        reason = next((ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()), "")
        reason = reason.split(". ", 1)[0]
        return (
            f"holds objects that weights_only=True refuses to load ({reason[:200]}); "
            "vqpipe loads plain state dicts of tensors only"
        )
    first = (text.strip().splitlines() or [""])[0][:200]
    return f"not a readable PyTorch file ({type(e).__name__}: {first})"


def check_state_dict(model: VQVAE, state: Any, url: str = "<state dict>") -> None:
    """Raise CheckpointError unless `state` is a flat tensor dict that loads strictly into `model`."""
    _check_flat(state, url)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in state and not _shape_fits(k, tuple(state[k].shape), expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_names(mismatched, sep='; ')}")
    hint = ""
    if unexpected and all(k.startswith("module.") for k in state):
        hint = " The keys carry a 'module.' prefix (a DistributedDataParallel save): strip it."
    raise CheckpointError(
        f"checkpoint {url} does not fit the model: {'; '.join(problems)}.{hint} {_suggest(state)}"
    )


def _check_flat(state: Any, url: str) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"checkpoint {url}: holds a {type(state).__name__}, not a state dict (a flat dict of name -> tensor)"
        )
    nested = [k for k, v in state.items() if isinstance(v, Mapping)]
    if nested:
        raise CheckpointError(
            f"checkpoint {url}: looks like a wrapper, not a flat state dict: key(s) {_names(nested)} hold dicts. "
            f"Save the state dict alone, e.g. torch.save(ckpt[{nested[0]!r}], path)"
        )
    odd = [
        f"{k} ({type(v).__name__})"
        for k, v in state.items()
        if not isinstance(v, torch.Tensor) or not isinstance(k, str)
    ]
    if odd:
        raise CheckpointError(
            f"checkpoint {url}: not a state dict of tensors; non-tensor entries: {_names(odd)}"
        )


def _shape_fits(key: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    # The hit buffer's row count is the number of scales; VQVAE.load_state_dict keeps its own rows.
    if key == EMA_KEY:
        return len(got) == len(want) and got[1:] == want[1:]
    return got == want


def _names(items: list[str], sep: str = ", ") -> str:
    more = f"{sep}... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return sep.join(items[:_SHOW]) + more


@functools.cache
def _preset_shapes(preset: ModelPreset) -> dict[str, tuple[int, ...]]:
    # Meta tensors: shapes without allocating (or initialising) the ~109M weights.
    with torch.device("meta"):
        model = VQVAE(**preset.model_kwargs())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def fitting_presets(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the presets whose architecture matches the checkpoint's keys and shapes."""
    names = []
    for name, preset in PRESETS.items():
        shapes = _preset_shapes(preset)
        if set(shapes) == set(state) and all(
            _shape_fits(k, tuple(state[k].shape), s) for k, s in shapes.items()
        ):
            names.append(name)
    return names


def _suggest(state: Mapping[str, torch.Tensor]) -> str:
    fits = fitting_presets(state)
    if fits:
        return f"The checkpoint fits preset(s): {', '.join(fits)}."
    described = []
    if "quantize.embedding.weight" in state and state["quantize.embedding.weight"].dim() == 2:
        vocab, cvae = state["quantize.embedding.weight"].shape
        described.append(f"vocab_size {vocab}, z_channels {cvae}")
    if "encoder.conv_in.weight" in state and state["encoder.conv_in.weight"].dim() == 4:
        described.append(f"ch {state['encoder.conv_in.weight'].shape[0]}")
    have = f" (it has {', '.join(described)})" if described else ""
    return f"No preset in PRESETS ({', '.join(PRESETS)}) fits the checkpoint{have}."
