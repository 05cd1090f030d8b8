"""memfit.plan: what a training step costs, and how to make it fit.

This folder owns the measurements the planner builds on (the step mechanics they
run, :class:`StepConfig`, :func:`apply`, :func:`run_step`, ..., live in
:mod:`memfit.step` and are re-exported here):

* :mod:`.estimate`: :func:`estimate` -> :class:`Estimate`, the peak of a step from
  fake tensors (nothing computed or allocated).
* :mod:`.measure`: :func:`measure_peak` -> :class:`MeasuredPeak`, the same on real
  tensors (the ground truth).
* :mod:`.profile`: :func:`profile` -> :class:`Profile`, per-module saved bytes and
  forward/backward times from a few real steps.

The planner (``plan.py``, ``solver.py``, ``budget.py``) builds on these.
"""

from ..step import (
    InBackwardOptimizer,
    SavedCounter,
    StepConfig,
    StepContext,
    apply,
    make_optimizer,
    preserved_state,
    resolve_loss_fn,
    run_step,
)
from .estimate import Estimate, estimate
from .measure import MeasuredPeak, measure_peak
from .profile import ModuleProfile, Profile, profile

__all__ = [
    "Estimate",
    "InBackwardOptimizer",
    "MeasuredPeak",
    "ModuleProfile",
    "Profile",
    "SavedCounter",
    "StepConfig",
    "StepContext",
    "apply",
    "estimate",
    "make_optimizer",
    "measure_peak",
    "preserved_state",
    "profile",
    "resolve_loss_fn",
    "run_step",
]

# --- the planner (plan.py, solver.py, budget.py) ---------------------------------------
from .budget import parse_budget
from .plan import BudgetTooSmall, Plan, UnitChoice, max_batch_size, plan

__all__ += ["BudgetTooSmall", "Plan", "UnitChoice", "max_batch_size", "parse_budget", "plan"]


def _make_callable() -> None:
    """``memfit.plan(model, batch, budget)`` calls :func:`plan` while ``memfit.plan``
    stays this package (``memfit.plan.estimate``, ``memfit.plan.StepConfig``, ...)."""
    import sys
    import types

    class _CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return plan(*args, **kwargs)

    sys.modules[__name__].__class__ = _CallablePackage


_make_callable()
