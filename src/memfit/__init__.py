"""memfit: train bigger PyTorch models in the memory you have.

* :func:`activations` compresses what autograd saves for backward (8/4/2-bit, fp8,
  1-bit masks) on any model, through saved-tensor hooks.
* :mod:`memfit.optim` has AdamW, SGD and Lion with 8- and 4-bit block-wise state.
* :mod:`memfit.codec` is the block-wise codec underneath.
* :mod:`memfit.plan`: :func:`estimate` gives the peak memory of a training step from
  fake tensors (nothing computed or allocated); :func:`profile` measures per-module
  saved bytes and times; ``memfit.plan(model, batch, budget)`` picks compression,
  recomputation and optimizer-state bits to fit a byte budget.
* :func:`causal_lm_loss` computes a causal LM's loss in chunks, without full logits.
"""

from . import codec, optim
from .activations import ActivationCompressor, ActivationStats, ModuleStats, activations

__version__ = "0.1.0"
__all__ = [
    "ActivationCompressor",
    "ActivationStats",
    "ModuleStats",
    "__version__",
    "activations",
    "codec",
    "optim",
]

from . import plan  # noqa: E402
from .plan import Estimate, StepConfig, estimate  # noqa: E402

__all__ += ["Estimate", "StepConfig", "estimate", "plan"]

from .plan import Profile, profile  # noqa: E402

__all__ += ["Profile", "profile"]

# The planner: memfit.plan(model, batch, budget) -> Plan (memfit.plan stays the
# package holding estimate, measure_peak, StepConfig, ...; calling it plans).
from .plan import BudgetTooSmall, Plan, max_batch_size  # noqa: E402

__all__ += ["BudgetTooSmall", "Plan", "max_batch_size"]

from .loss import causal_lm_loss  # noqa: E402

__all__ += ["causal_lm_loss"]

# memfit.weights(model, bits="nf4") compresses frozen parameters (the package is callable).
from . import weights  # noqa: E402
from .weights import CompressedWeights  # noqa: E402

__all__ += ["CompressedWeights", "weights"]
