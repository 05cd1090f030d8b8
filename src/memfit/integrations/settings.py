"""What a memfit trainer callback was asked to do: :class:`MemfitSettings`, validated,
and :class:`IncompatibleSetup`, the error for a set-up memfit cannot honour.

This module owns the callbacks' arguments (budget, bits, policy, state bits,
optimizer, planner and activation options, measuring) and turning them into a plan
or a compressor; it imports neither framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..step.config import OPTIMIZERS as _OPTIMIZERS

__all__ = ["IncompatibleSetup", "MemfitSettings"]


class IncompatibleSetup(ValueError):
    """A training set-up that memfit cannot honour; raised before any step runs, with
    the reason and what to change."""


def _as_widths(value, what: str, allowed: tuple[int, ...]) -> tuple[int, ...] | None:
    if value is None:
        return None
    widths = (value,) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    for w in widths:
        if isinstance(w, bool) or w not in allowed:
            raise ValueError(f"{what} must be among {allowed}, got {value!r}")
    return widths


class MemfitSettings:
    """What a memfit callback was asked to do, validated. Shared by both callbacks.

    ``budget``: bytes or a string (``"600MB"``, ``"2GiB"``, ``"40%"`` of the plain
    estimated peak); the planner then chooses activations and optimizer, ``bits`` and
    ``state_bits`` only restrict its choices (widths it may use). Without a budget,
    ``bits``/``policy``/``head_bits`` go to :func:`memfit.activations` and
    ``state_bits`` (8 or 4; 32 = torch's own) picks memfit's optimizer.
    """

    def __init__(
        self,
        budget=None,
        bits=None,
        policy: Mapping[str, Any] | None = None,
        state_bits=None,
        *,
        head_bits="auto",
        optimizer: str = "adamw",
        plan_kwargs: Mapping[str, Any] | None = None,
        activation_kwargs: Mapping[str, Any] | None = None,
        measure: bool = False,
    ):
        self.budget = budget
        self.optimizer = str(optimizer).lower()
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
        self.plan_kwargs = dict(plan_kwargs or {})
        self.activation_kwargs = dict(activation_kwargs or {})
        self.head_bits = head_bits
        self.measure = bool(measure)
        if budget is not None:
            if policy is not None:
                raise ValueError(
                    "policy= and budget= together: with a budget the planner chooses the per-module policy itself; "
                    "pass bits=(8, 4) to restrict the widths it may use, or drop the budget to apply your policy"
                )
            self._check_budget(budget)
            self.bits = _as_widths(bits, "bits (with a budget: the widths the planner may use)", (8, 4, 2))
            self.state_bits = _as_widths(state_bits, "state_bits (with a budget: the widths the planner may use)",
                                         (32, 8, 4))
            self.policy = None
            for k in ("bits", "state_bits", "optimizer", "loss_fn", "grad_accumulation", "clip_grad_norm"):
                if k in self.plan_kwargs:
                    raise ValueError(
                        f"plan_kwargs may not set {k!r}: it comes from the callback's own arguments "
                        "or from the training loop's settings (gradient accumulation, clipping)"
                    )
            self._check_plan_kwargs()
            if self.activation_kwargs or head_bits != "auto":
                raise ValueError("activation_kwargs= and head_bits= are for bits=/policy= without a budget; "
                                 "with a budget the planner sets them")
        else:
            if plan_kwargs:
                raise ValueError("plan_kwargs= is for the planner and needs budget=")
            if bits is None and policy is None and state_bits is None:
                raise ValueError(
                    "memfit callback with nothing to do: pass budget= (plan activations and optimizer to fit it), "
                    "bits=/policy= (compress activations) or state_bits= (8- or 4-bit optimizer state)"
                )
            if isinstance(bits, (list, tuple)):
                raise ValueError(f"bits must be one setting (8, 4, 2, 'fp8' or None) without a budget, got {bits!r}")
            self.bits = bits
            self.policy = dict(policy) if policy is not None else None
            if state_bits is not None and (isinstance(state_bits, bool) or state_bits not in (32, 8, 4)):
                raise ValueError(f"state_bits must be 32, 8 or 4, got {state_bits!r}")
            self.state_bits = state_bits
            if self.bits is not None or self.policy is not None:
                # validate now, not at the first step
                import memfit

                memfit.activations(None, self.bits if self.bits is not None else None,
                                   head_bits=head_bits, **self.activation_kwargs)

    def _check_plan_kwargs(self) -> None:
        """Unknown :func:`memfit.plan` options and a bad ``autocast`` are refused here,
        not at the first training batch."""
        import inspect

        from ..plan.planner import plan
        from ..step.config import autocast_name

        taken = ("model", "batch", "budget", "optimizer", "loss_fn")
        known = [k for k in inspect.signature(plan).parameters if k not in taken]
        unknown = sorted(k for k in self.plan_kwargs if k not in known)
        if unknown:
            raise TypeError(f"plan_kwargs: unknown memfit.plan option(s) {unknown}; known: {', '.join(known)}")
        if "autocast" in self.plan_kwargs:
            self.plan_kwargs["autocast"] = autocast_name(self.plan_kwargs["autocast"])

    @staticmethod
    def _check_budget(budget) -> None:
        from memfit.plan import parse_budget

        if isinstance(budget, str) and budget.strip().endswith("%"):
            parse_budget(budget, plain_peak_bytes=1 << 30)  # validates the number
        else:
            parse_budget(budget)

    # -- what is asked --------------------------------------------------------------

    @property
    def plans(self) -> bool:
        return self.budget is not None

    @property
    def compresses(self) -> bool:
        """Activations are compressed (or planned)."""
        return self.plans or self.bits is not None or self.policy is not None

    @property
    def supplies_optimizer(self) -> bool:
        return self.plans or self.state_bits is not None

    def budget_bytes(self, plain_peak_bytes: int | None = None) -> int | None:
        from memfit.plan import parse_budget

        if self.budget is None:
            return None
        return parse_budget(self.budget, plain_peak_bytes=plain_peak_bytes)

    def forced_in_backward(self) -> bool:
        return bool(self.plan_kwargs.get("optimizer_in_backward"))

    def describe(self) -> str:
        if self.plans:
            return f"budget={self.budget!r}"
        parts = []
        if self.bits is not None or self.policy is not None:
            parts.append(f"bits={self.bits!r}" + (f", policy={self.policy!r}" if self.policy else ""))
        if self.state_bits is not None:
            parts.append(f"state_bits={self.state_bits}")
        return ", ".join(parts)

    # -- pieces ----------------------------------------------------------------------

    def make_plan(self, model: torch.nn.Module, batch, loss_fn, *, grad_accumulation: int,
                  clip_grad_norm: float | None, budget=None, **overrides):
        """:func:`memfit.plan` for this model and batch, with the training loop's
        gradient accumulation and clipping (which rule optimizer-in-backward out).
        ``budget`` replaces the callback's (a rank's budget less what the planner
        cannot see); ``overrides`` replace ``plan_kwargs`` entries."""
        import memfit

        kwargs: dict[str, Any] = dict(self.plan_kwargs)
        kwargs.update(overrides)
        if self.bits is not None:
            kwargs["bits"] = self.bits
        if self.state_bits is not None:
            kwargs["state_bits"] = self.state_bits if len(self.state_bits) > 1 else self.state_bits[0]
        return memfit.plan(model, batch, self.budget if budget is None else budget, optimizer=self.optimizer,
                           loss_fn=loss_fn,
                           grad_accumulation=grad_accumulation, clip_grad_norm=clip_grad_norm, **kwargs)

    def make_compressor(self, model: torch.nn.Module):
        import memfit

        return memfit.activations(model, self.bits, policy=self.policy, head_bits=self.head_bits,
                                  **self.activation_kwargs)

    def check_in_backward(self, grad_accumulation: int, clip: float | None, where: str) -> None:
        """Refuse a forced optimizer-in-backward with accumulation or clipping."""
        if not self.forced_in_backward():
            return
        if grad_accumulation > 1 or clip is not None:
            why = (f"gradient accumulation ({grad_accumulation} steps)" if grad_accumulation > 1
                   else f"gradient clipping (max norm {clip:g})")
            raise IncompatibleSetup(
                f"memfit: plan_kwargs asks for optimizer_in_backward=True, but {where} uses {why}. Stepping "
                "inside backward applies and frees each gradient as soon as it exists, so gradients cannot be "
                "accumulated over micro-batches and there is no global norm to clip. Turn those off, or drop "
                "optimizer_in_backward and let the planner decide."
            )

