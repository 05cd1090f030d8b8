"""The loss of a batch: :func:`resolve_loss_fn` and the default ``model(**batch).loss``.

This module owns what a step calls to get its scalar loss, and the clear errors for
batches the model rejects and losses that are not scalars.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

__all__ = ["Loss", "is_fake_limitation", "resolve_loss_fn"]

Loss = Callable[[torch.nn.Module, Any], torch.Tensor]


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"without a loss_fn the batch must be a dict of keyword arguments for the model "
            f"(the loss is model(**batch).loss), got {type(batch).__name__}; pass loss_fn=lambda model, batch: ..."
        )
    try:
        out = model(**batch)
    except Exception as exc:
        if is_fake_limitation(exc):
            raise
        raise ValueError(f"model(**batch) failed: {type(exc).__name__}: {exc}") from exc
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError(
            f"model(**batch) returned a {type(out).__name__} without a .loss (no labels in the batch?); "
            f"add labels to the batch or pass loss_fn=lambda model, batch: ..."
        )
    return loss


def is_fake_limitation(exc: BaseException) -> bool:
    """Whether ``exc`` is a fake-tensor limitation (data-dependent output), which the
    estimator reports itself rather than as a model failure."""
    try:
        from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException))


def resolve_loss_fn(loss_fn: Loss | None) -> Loss:
    """The loss function a step uses, wrapped with checks.

    ``None`` means ``model(**batch).loss`` (the batch must be a dict; a model that
    rejects it raises ``ValueError("model(**batch) failed: ...")``; an output without
    ``.loss`` raises ``ValueError``). Otherwise ``loss_fn(model, batch)``. Either way the
    result must be a scalar tensor (``ValueError("loss_fn must return a scalar tensor,
    got shape ...")``) that requires grad.
    """
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    fn = _default_loss if loss_fn is None else loss_fn

    def checked(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = fn(model, batch)
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not require grad (no trainable parameters, or computed under torch.no_grad())"
            )
        return loss

    checked.__wrapped__ = fn  # type: ignore[attr-defined]
    return checked

