"""Float32 precision policy: scoped TF32/cuDNN settings, and a record of them for output metadata.

Codes are only reproducible for a fixed precision setting (SPEC §4): PyTorch's own default runs cuDNN
convolutions in TF32, which flips near-tie codes. Settings are changed inside a `with` block only and restored
after it; nothing changes at import.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from typing import Any

import torch

# Only the legacy flags: mixing them with torch's newer `fp32_precision` API makes the legacy getters raise.
_MODES: dict[str, dict[str, Any]] = {
    "exact": dict(
        cudnn_allow_tf32=False,
        matmul_allow_tf32=False,
        float32_matmul_precision="highest",
        cudnn_deterministic=True,
        cudnn_benchmark=False,
    ),
    "tf32": dict(
        cudnn_allow_tf32=True,
        matmul_allow_tf32=True,
        float32_matmul_precision="high",
        cudnn_deterministic=True,
        cudnn_benchmark=False,
    ),
}


def _mode_flags(mode: str) -> dict[str, Any]:
    if mode not in _MODES:
        raise ValueError(f"unknown precision mode {mode!r}; valid modes: {', '.join(_MODES)}")
    return dict(_MODES[mode])


def _current_flags() -> dict[str, Any]:
    return dict(
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        cudnn_deterministic=torch.backends.cudnn.deterministic,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
    )


def _apply(flags: dict[str, Any]) -> None:
    # The matmul precision and matmul.allow_tf32 are one setting seen twice; the precision goes first so a
    # restore of an inconsistent prior state still ends with the prior allow_tf32 value.
    torch.set_float32_matmul_precision(flags["float32_matmul_precision"])
    torch.backends.cuda.matmul.allow_tf32 = flags["matmul_allow_tf32"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn_allow_tf32"]
    torch.backends.cudnn.deterministic = flags["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = flags["cudnn_benchmark"]


@contextlib.contextmanager
def precision_mode(mode: str) -> Iterator[dict[str, Any]]:
    """Run the block under `mode` ("exact": IEEE float32 everywhere; "tf32": TF32 convs and matmuls).

    Yields `precision_settings(mode)`. The previous global values are restored on exit, also on error.
    """
    flags = _mode_flags(mode)
    saved = _current_flags()
    _apply(flags)
    try:
        yield precision_settings(mode)
    finally:
        _apply(saved)


def exact_mode() -> contextlib.AbstractContextManager[dict[str, Any]]:
    """`precision_mode("exact")`: TF32 off for conv and matmul, deterministic cuDNN without benchmarking."""
    return precision_mode("exact")


def precision_settings(mode: str, device: str | torch.device | None = None) -> dict[str, Any]:
    """JSON-able description of `mode` on `device` (default: cuda if available, else cpu) for output metadata."""
    flags = _mode_flags(mode)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        device_name = torch.cuda.get_device_name(dev)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "mode": mode,
        **flags,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(dev),
        "device_name": device_name,
        "num_threads": torch.get_num_threads(),
    }
