"""Checks of a saved `TokenDataset` state before it is applied: a checkpoint is a file a person can edit, and a
hand-edited `yielded` of 10**9 used to resume past the end (an epoch of nothing), a negative one to fail deep in
numpy. Each check names the field and the value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Fields a state must hold, and what each may be (the settings are compared with the dataset's own as well).
_COUNTS = ("version", "epoch", "yielded", "seed", "shuffle_buffer", "world_size", "rank", "worker")


def check_state(state: Any) -> None:
    """`state` has every field of `TokenDataset.state_dict()`, each of its type and in its range."""
    if not isinstance(state, Mapping):
        raise ValueError(f"a TokenDataset state is a dict, not {type(state).__name__}")
    missing = [
        k for k in (*_COUNTS, "num_workers", "shuffle", "drop_last", "shards_digest") if k not in state
    ]
    if missing:
        raise ValueError(
            f"TokenDataset state: no {', '.join(missing)} (not a state_dict() of a TokenDataset)"
        )
    for name in _COUNTS:
        _count(name, state[name], minimum=0)
    _count("num_workers", state["num_workers"], minimum=1)
    if state["worker"] >= state["num_workers"]:
        raise ValueError(
            f"TokenDataset state: worker is {state['worker']}, not one of num_workers={state['num_workers']}"
        )
    for name in ("shuffle", "drop_last"):
        if not isinstance(state[name], bool):
            raise ValueError(f"TokenDataset state: {name} is {state[name]!r}, not true or false")
    if not isinstance(state["shards_digest"], str):
        raise ValueError(f"TokenDataset state: shards_digest is {state['shards_digest']!r}, not a string")


def check_position(state: Mapping[str, Any], rows: int) -> None:
    """The saved `yielded` is within the `rows` this worker yields in the state's epoch (equal: it had finished)."""
    if state["yielded"] > rows:
        raise ValueError(
            f"TokenDataset state: yielded is {state['yielded']}, but worker {state['worker']} of "
            f"{state['num_workers']} yields {rows} rows in epoch {state['epoch']}"
        )


def _count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"TokenDataset state: {name} is {value!r}, not an integer >= {minimum}")
