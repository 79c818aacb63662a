"""What TokenDataset yields: a block of rows as tensors and values, one item at a time or as a `TokenBatch`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from .rows import RowBlock


def block_columns(block: RowBlock, columns: tuple[str, ...], view_fill: str | None) -> dict[str, Any]:
    """The asked `columns` of a block: codes as int64 and labels as numpy int64, other fixed-size lists as tensors,
    other values as Python lists. `view_fill`: the one view of files that have no `view` column."""
    out: dict[str, Any] = {"key": _read(block.keys, "key").tolist()}
    if "label" in columns:
        out["label"] = _read(block.labels, "label")
    if "codes" in columns:
        out["codes"] = torch.from_numpy(_read(block.codes, "codes").astype(np.int64))
    if "var_input" in columns:
        out["var_input"] = torch.from_numpy(np.ascontiguousarray(_read(block.var_input, "var_input")))
    if "meta" in columns:
        out["meta"] = [m if m is not None else "" for m in _read(block.metas, "meta")]
    for name, values in block.extra.items():  # other columns: tensors for fixed-size lists, else values
        if name in columns:  # not a `view` read only to check the picks
            out[name] = values.tolist() if values.dtype == object else torch.from_numpy(values)
    if view_fill is not None:
        out["view"] = [view_fill] * len(block)
    return out


def _read(values: np.ndarray | None, name: str) -> np.ndarray:
    """A column the block must hold: TokenDataset reads every column it yields (`key` always)."""
    if values is None:
        raise ValueError(f"column {name!r} is asked for but was not read")
    return values


@dataclass
class TokenBatch:
    """A batch as TokenDataset(batch_size=...) yields it: what default_collate makes of single items, readable
    as `batch["codes"]` or `batch.codes`. Not a dict on purpose: the DataLoader passes it through untouched
    instead of walking every key string, and `pin_memory=True` pins its tensors."""

    key: list[str]
    label: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    var_input: torch.Tensor | None = None
    meta: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other columns asked for, by name

    @classmethod
    def of(cls, columns: dict[str, Any]) -> TokenBatch:
        """From `block_columns`' output: known columns as fields, the others in `extra`."""
        if "label" in columns:
            columns = {**columns, "label": torch.from_numpy(columns["label"])}
        named = {f.name for f in fields(cls)}
        return cls(
            **{k: v for k, v in columns.items() if k in named},
            extra={k: v for k, v in columns.items() if k not in named},
        )

    def __len__(self) -> int:
        return len(self.key)

    def __contains__(self, name: str) -> bool:
        return name in self.keys()

    def __getitem__(self, name: str) -> Any:
        if name in self.extra:
            return self.extra[name]
        if name not in self:
            raise KeyError(name)
        return getattr(self, name)

    def keys(self) -> list[str]:
        named = [f.name for f in fields(self) if f.name != "extra" and getattr(self, f.name) is not None]
        return named + list(self.extra)

    def pin_memory(self) -> TokenBatch:
        pinned = {n: getattr(self, n).pin_memory() for n in ("label", "codes", "var_input") if n in self}
        extra = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()}
        return replace(self, **pinned, extra=extra)
