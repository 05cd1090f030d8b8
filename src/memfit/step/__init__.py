"""memfit.step: the mechanics of one training step, shared by the estimator, the
profiler, the measurer, the planner and the integrations.

* :mod:`.config`: :class:`StepConfig`, what a step does besides forward and backward
  (activation policy, checkpointed modules, optimizer and state bits,
  optimizer-in-backward, gradient accumulation and clipping, autocast).
* :mod:`.loss`: :func:`resolve_loss_fn`, the loss of a batch (``model(**batch).loss``
  by default) with clear errors.
* :mod:`.optimizer`: :func:`make_optimizer`, the optimizer a config names.
* :mod:`.run`: :func:`apply` installs a config on a model and removes it on exit;
  :func:`run_step` runs one step (forward, backward, step, zero_grad).
* :mod:`.saved`: :class:`SavedCounter` counts what autograd saves, per module.
* :mod:`.preserve`: :func:`preserved_state` puts a model back as it was.
* :mod:`.track`: the ``MemTracker`` subclasses memfit uses for peaks, all
  accepting frozen parameters (:func:`tracker_class`, :func:`peak_tracker_class`), and :func:`tracked_steps`, the peak, phase and
  breakdown of a step on real or fake tensors.

What a step costs is measured above this room, in :mod:`memfit.plan`
(``estimate``, ``measure_peak``, ``profile``); the optimizer that steps inside
backward is :class:`memfit.optim.InBackwardOptimizer`.
"""

from ..optim.in_backward import InBackwardOptimizer
from .config import StepConfig, as_config
from .loss import Loss, StepInputError, resolve_loss_fn
from .optimizer import inner_optimizers, make_optimizer, optimizer_state_bytes
from .preserve import preserved_state
from .run import StepContext, apply, autocast_context, make_compressor, run_step
from .saved import SavedCounter, SavedModuleStats
from .track import main_device, peak_tracker_class, phase_tracker_class, tensors_in, tracked_steps, tracker_class

__all__ = [
    "InBackwardOptimizer",
    "Loss",
    "SavedCounter",
    "SavedModuleStats",
    "StepConfig",
    "StepContext",
    "StepInputError",
    "apply",
    "as_config",
    "autocast_context",
    "inner_optimizers",
    "main_device",
    "make_compressor",
    "make_optimizer",
    "optimizer_state_bytes",
    "peak_tracker_class",
    "phase_tracker_class",
    "preserved_state",
    "resolve_loss_fn",
    "run_step",
    "tensors_in",
    "tracked_steps",
    "tracker_class",
]
