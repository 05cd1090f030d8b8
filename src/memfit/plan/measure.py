"""``measure_peak``: the real peak memory of a training step (the ground truth the
estimator is held to).

Real tensors, the real optimizer, real kernels, under ``MemTracker`` (from
``torch.distributed._tools.mem_tracker``: it sees every tensor storage created
through the dispatcher, on CPU as on GPU). The model is put back as it was afterwards
(parameter and buffer values, grads, modes, hooks, RNG state); a copy of its
parameters and buffers is kept meanwhile (untracked).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..step import Loss, StepConfig, main_device, make_optimizer, preserved_state, resolve_loss_fn, tracked_steps
from .estimate import Estimate, fill


@dataclass
class MeasuredPeak(Estimate):
    """Same fields as :class:`~memfit.plan.Estimate`, measured on real tensors, plus
    ``step_seconds`` (wall time of each step run, under the tracker's overhead: not a
    timing)."""

    step_seconds: list[float] = field(default_factory=list)
    method: str = "measured"

    kind = "measured"


def measure_peak(
    model: torch.nn.Module,
    batch: Any,
    config: StepConfig | None = None,
    loss_fn: Loss | None = None,
    steps: int = 2,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> MeasuredPeak:
    """Run ``steps`` real training steps of ``model`` on ``batch`` under MemTracker
    and report the last one's peak, its phase and breakdown.

    ``config`` defaults to ``StepConfig()`` (plain autograd, torch's AdamW). A fresh
    optimizer is made with :func:`~memfit.plan.make_optimizer` unless ``optimizer`` is
    given (its state is then changed by the steps). The model is restored afterwards.
    """
    cfg = config if config is not None else StepConfig()
    if not isinstance(cfg, StepConfig):
        raise TypeError(f"config must be a StepConfig, got {type(cfg).__name__}")
    fn = resolve_loss_fn(loss_fn)
    with preserved_state(model, values=True):
        model.train()
        opt = optimizer if optimizer is not None else make_optimizer(model, cfg)
        res = tracked_steps(model, batch, cfg, fn, opt, steps=steps, device=main_device(model),
                            timer=time.perf_counter)
        del opt
    out = fill(MeasuredPeak(), res, cfg)
    out.step_seconds = list(res["seconds"])
    return out
