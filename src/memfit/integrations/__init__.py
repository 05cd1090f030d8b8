"""memfit in training frameworks: Hugging Face ``Trainer`` and PyTorch Lightning.

* :mod:`memfit.integrations.transformers`: :class:`~memfit.integrations.transformers.MemfitCallback`
  and :class:`~memfit.integrations.transformers.MemfitTrainer` (needs ``transformers``
  and ``accelerate``).
* :mod:`memfit.integrations.lightning`: :class:`~memfit.integrations.lightning.MemfitCallback`
  (needs ``lightning``).

Both callbacks do the same three things, each only when asked:

* with ``budget=``: plan the training step on the first training batch
  (:func:`memfit.plan`), apply the plan's activation choices (compression per module,
  recomputed blocks) around every training step and supply the optimizer the plan
  chose (8/4-bit state, optimizer-in-backward when nothing rules it out);
* without a budget: ``bits=``/``policy=`` compress activations
  (:func:`memfit.activations`) around every training step, ``state_bits=`` puts the
  optimizer state in 8 or 4 bits (:mod:`memfit.optim`);
* with ``measure=True``: track the real peak of every training step after the first
  with ``MemTracker`` (slower steps) and report it against the budget.

With several processes (DDP, or a model sharded with FSDP2) the budget is per rank:
each rank plans its own step and the ranks agree on one plan that fits every rank
(:mod:`.distributed`, shared by both callbacks). Settings memfit cannot honour
(DeepSpeed, accelerate's FSDP plugin, Lightning's FSDP1 strategy, an optimizer the user
built while memfit is asked to choose one, ...) raise
:class:`IncompatibleSetup` before any step runs. This package imports neither
framework; the parts both callbacks share live in named modules:

* :mod:`.settings`: :class:`MemfitSettings` (the callbacks' arguments, validated) and
  :class:`IncompatibleSetup`;
* :mod:`.optimizers`: :class:`DeferredOptimizer`, :func:`build_optimizer`,
  :func:`optimizer_family`, :func:`optimizer_for_tracking`;
* :mod:`.batches`: :class:`BatchGuard` (batches larger than the planned one);
* :mod:`.meter`: :class:`PeakMeter` (measured peaks, with :mod:`memfit.step`'s tracker);
* :mod:`.applier`: :class:`StepApplier` (the plan or compressor around each forward);
* :mod:`.distributed`: :func:`plan_per_rank` and :class:`RankPlanning` (per-rank
  budgets under DDP and FSDP2);
* :mod:`.results`: :class:`CallbackResults` and :func:`summary`;
* :mod:`.loop`: :func:`first_loss`, :func:`as_float_or_none`.
"""

from .applier import StepApplier
from .batches import BatchGuard, tensor_sizes
from .distributed import RankPlanning, plan_per_rank
from .loop import as_float_or_none, first_loss
from .meter import PeakMeter
from .optimizers import DeferredOptimizer, build_optimizer, optimizer_family, optimizer_for_tracking
from .results import CallbackResults, summary
from .settings import IncompatibleSetup, MemfitSettings

# names this package held before it was split, kept importable from here
from .._units import format_bytes  # noqa: E402,F401
from ..step.track import tensors_in as batch_tensors  # noqa: E402,F401

__all__ = ["IncompatibleSetup", "MemfitSettings", "PeakMeter", "RankPlanning"]
