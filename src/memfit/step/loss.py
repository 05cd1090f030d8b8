"""The loss of a batch: :func:`resolve_loss_fn` and the default ``model(**batch).loss``.

This module owns what a step calls to get its scalar loss, and the clear errors for
batches the model's ``forward`` does not accept and losses that are not scalars
(:class:`StepInputError`, also for a ``ValueError`` or ``TypeError`` the model raises
about its inputs). Any other error raised while the model runs (a kernel's, a hook's)
reaches the caller as it was raised, so it names its real cause.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import inspect

import torch

__all__ = ["Loss", "StepInputError", "is_fake_limitation", "resolve_loss_fn"]

Loss = Callable[[torch.nn.Module, Any], torch.Tensor]


class StepInputError(ValueError):
    """The batch or the loss cannot make a training step: the batch does not fit the
    model's ``forward``, its output has no ``.loss``, or the loss is not a scalar that
    requires grad. Found by memfit's own checks, the same on real and fake tensors."""


def _check_batch_fits(model: torch.nn.Module, batch: Mapping) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C forward: let the call say
        return
    try:
        sig.bind(**batch)
    except TypeError as exc:
        raise StepInputError(
            f"model(**batch) failed: {type(model).__name__}.forward does not accept the batch "
            f"(keys {sorted(map(str, batch))}): {exc}"
        ) from None


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"without a loss_fn the batch must be a dict of keyword arguments for the model "
            f"(the loss is model(**batch).loss), got {type(batch).__name__}; pass loss_fn=lambda model, batch: ..."
        )
    _check_batch_fits(model, batch)
    try:
        out = model(**batch)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, StepInputError):
            raise
        # how models refuse their inputs ("You have to specify either input_ids or ...")
        raise StepInputError(f"model(**batch) failed: {type(exc).__name__}: {exc}") from exc
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise StepInputError(
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
    whose ``forward`` does not accept it raises ``ValueError("model(**batch) failed: ...")``; an output without
    ``.loss`` raises ``ValueError``). Otherwise ``loss_fn(model, batch)``. Either way the
    result must be a scalar tensor (``ValueError("loss_fn must return a scalar tensor,
    got shape ...")``) that requires grad. These ``ValueError`` are
    :class:`StepInputError`; so is a ``ValueError``/``TypeError`` the model raises
    (``"model(**batch) failed: ..."``). Any other error from the model is passed on
    unchanged.
    """
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    fn = _default_loss if loss_fn is None else loss_fn

    def checked(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = fn(model, batch)
        if not isinstance(loss, torch.Tensor):
            raise StepInputError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise StepInputError(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise StepInputError(
                "the loss does not require grad (no trainable parameters, or computed under torch.no_grad())"
            )
        return loss

    checked.__wrapped__ = fn  # type: ignore[attr-defined]
    return checked

