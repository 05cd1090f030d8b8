"""memfit.plan: what a training step costs, and how to make it fit a memory budget.

Measuring a step (built on :mod:`memfit.step`, the step mechanics):

* :mod:`.estimate`: :func:`estimate` -> :class:`Estimate`, the peak of a step from
  fake tensors (nothing computed or allocated).
* :mod:`.measure`: :func:`measure_peak` -> :class:`MeasuredPeak`, the same on real
  tensors (the ground truth).
* :mod:`.profile`: :func:`profile` -> :class:`Profile`, per-module saved bytes and
  forward/backward times from a few real steps.

The planner, on top of those:

* :mod:`.planner`: :func:`plan`, the search driver;
* :mod:`.units`: the units a plan decides for, traced on fake tensors;
* :mod:`.probes`: codec and optimizer throughput, per-unit forward times;
* :mod:`.solver`: the per-unit choices, their costs and the search over them;
* :mod:`.peak_model`: :class:`~.peak_model.PeakModel`, the calibrated predicted peak;
* :mod:`.verifier`: :class:`~.verifier.Verifier`, which checks picks with ``estimate``;
* :mod:`.result`: :class:`Plan`, :class:`UnitChoice`, :class:`BudgetTooSmall`;
* :mod:`.max_batch`: :func:`max_batch_size`; :mod:`.budget`: :func:`parse_budget`.

The step mechanics (:class:`StepConfig`, :func:`apply`, :func:`run_step`,
:func:`make_optimizer`, :func:`preserved_state`, :class:`SavedCounter`,
:class:`InBackwardOptimizer`) live in :mod:`memfit.step` and :mod:`memfit.optim`;
they are re-exported here so that ``memfit.plan.StepConfig`` etc. keep working.

**Calling the package.** ``memfit.plan(model, batch, budget)`` calls :func:`plan`
while ``memfit.plan`` stays this package (``memfit.plan.estimate``,
``memfit.plan.StepConfig``, ...): the package's module object is given a class whose
``__call__`` is :func:`plan` (:func:`memfit._callable.make_callable`). That is the
whole mechanism; no submodule is named ``plan``.
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
from .budget import parse_budget
from .estimate import Estimate, estimate
from .max_batch import max_batch_size
from .measure import MeasuredPeak, measure_peak
from .planner import plan
from .profile import ModuleProfile, Profile, profile
from .result import BudgetTooSmall, Plan, UnitChoice

__all__ = [
    "BudgetTooSmall",
    "Estimate",
    "InBackwardOptimizer",
    "MeasuredPeak",
    "ModuleProfile",
    "Plan",
    "Profile",
    "SavedCounter",
    "StepConfig",
    "StepContext",
    "UnitChoice",
    "apply",
    "estimate",
    "make_optimizer",
    "max_batch_size",
    "measure_peak",
    "parse_budget",
    "plan",
    "preserved_state",
    "profile",
    "resolve_loss_fn",
    "run_step",
]


from .._callable import make_callable  # noqa: E402

make_callable(__name__, "plan")
