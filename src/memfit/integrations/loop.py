"""What memfit reads from a framework's training loop: the loss in a training step's
output (:func:`first_loss`) and a clipping setting where 0 means off
(:func:`as_float_or_none`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["as_float_or_none", "first_loss"]


def as_float_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if x > 0 else None


def first_loss(out) -> torch.Tensor:
    """The loss in what a training step returned: a tensor, ``{"loss": ...}`` or an
    object with ``.loss``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, Sequence) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(
        f"memfit: the training step returned {type(out).__name__}, without a loss to plan with; "
        "return the loss (or {'loss': loss}) or pass loss_fn=lambda module, batch: ..."
    )
