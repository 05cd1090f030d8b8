"""The largest batch that fits a budget: :func:`max_batch_size`, by doubling then
bisecting the batch size over :func:`~memfit.plan.estimate` calls (fake tensors:
nothing runs out of memory)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .._units import format_bytes
from ..step import Loss
from .budget import parse_budget
from .estimate import Estimate, estimate
from .result import BudgetTooSmall, Plan, dominant_part

__all__ = ["max_batch_size"]


def max_batch_size(
    model: torch.nn.Module,
    make_batch: Callable[[int], Any],
    budget: int | str,
    margin: float = 0.05,
    loss_fn: Loss | None = None,
    *,
    limit: int = 1 << 16,
    plan: Plan | None = None,
    **estimate_kwargs,
) -> int:
    """The largest batch size whose *estimated* peak is at most ``budget * (1 - margin)``.

    ``make_batch(n)`` builds a batch of ``n`` samples. The search doubles the size
    until the estimate exceeds the limit, then bisects; each probe is one
    :func:`memfit.estimate` call (fake tensors: nothing runs out of memory).
    ``estimate_kwargs`` (``optimizer``, ``state_bits``, ``policy``, ``checkpoint``,
    ``optimizer_in_backward``, ``autocast``) or ``plan=`` (its configuration, a
    planned autocast included) set the step.
    A percentage budget is of the plain estimated peak at batch size 1. Raises
    :class:`BudgetTooSmall` if even one sample does not fit.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    if plan is not None:
        if estimate_kwargs:
            raise ValueError("pass either plan= or estimate options, not both")
        estimate_kwargs = {"config": plan.config}
    cache: dict[int, Estimate] = {}

    def est(n: int) -> Estimate:
        if n not in cache:
            cache[n] = estimate(model, make_batch(n), loss_fn=loss_fn, **estimate_kwargs)
        return cache[n]

    first = est(1)
    budget_bytes = parse_budget(budget, plain_peak_bytes=first.peak_bytes)
    limit_bytes = budget_bytes * (1 - margin)
    if first.peak_bytes > limit_bytes:
        dom = dominant_part(first.peak_breakdown)
        raise BudgetTooSmall(
            f"even a batch of 1 needs {format_bytes(first.peak_bytes)} (estimated), more than "
            f"{format_bytes(limit_bytes)} ({format_bytes(budget_bytes)} less a {margin:.0%} margin); "
            f"dominated by {dom}",
            budget_bytes=budget_bytes, min_peak_bytes=first.peak_bytes, dominant=dom,
            breakdown=first.peak_breakdown,
        )
    lo, hi = 1, 2
    while hi <= limit and est(hi).peak_bytes <= limit_bytes:
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if est(mid).peak_bytes <= limit_bytes:
            lo = mid
        else:
            hi = mid
    return lo
