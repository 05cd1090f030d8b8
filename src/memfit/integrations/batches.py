"""Training batches against the planned one: :class:`BatchGuard` warns once when a
batch is larger than the batch the plan was made on (the budget holds for that size).
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["BatchGuard", "tensor_sizes"]


def tensor_sizes(batch) -> list[tuple[int, ...]]:
    from torch.utils._pytree import tree_leaves

    return [tuple(t.shape) for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]



class BatchGuard:
    """Warns once when a training batch has more elements than the batch the plan was
    made on (dynamic padding, a bigger last batch): the budget holds for the planned size."""

    def __init__(self, planned) -> None:
        self.sizes = tensor_sizes(planned)
        self.numel = sum(math.prod(s) for s in self.sizes)
        self.warned = False

    def check(self, batch) -> None:
        if self.warned:
            return
        sizes = tensor_sizes(batch)
        numel = sum(math.prod(s) for s in sizes)
        if numel > self.numel or any(
            math.prod(a) > math.prod(b) for a, b in zip(sizes, self.sizes)
        ):
            self.warned = True
            warnings.warn(
                f"memfit: a training batch (tensor shapes {sizes}) is larger than the one the plan was made on "
                f"({self.sizes}); the budget is only guaranteed for the planned size. Pad to a fixed length "
                "(e.g. padding='max_length') and keep the batch size fixed (drop_last=True).",
                RuntimeWarning,
                stacklevel=3,
            )

