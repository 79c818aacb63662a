"""The training side: stream an OUT's tokens into a training loop (docs/training.md). torch + pyarrow, no Ray."""

from .batch import TokenBatch
from .dataset import TokenDataset
from .rows import fixed_list_to_numpy
from .var_input import VarInputBuilder, var_batch

__all__ = ["TokenBatch", "TokenDataset", "VarInputBuilder", "fixed_list_to_numpy", "var_batch"]
