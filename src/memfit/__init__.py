"""memfit: train bigger PyTorch models in the memory you have.

* :func:`activations` compresses what autograd saves for backward (8/4/2-bit, fp8,
  1-bit masks) on any model, through saved-tensor hooks, or offloads it to pinned
  host memory on CUDA (``"offload"``; options in :class:`Offload`).
* :mod:`memfit.optim` has AdamW, SGD and Lion with 8- and 4-bit block-wise state.
* :mod:`memfit.codec` is the block-wise codec underneath.
* :mod:`memfit.step` holds the mechanics of one training step (:class:`StepConfig`,
  ``apply``, ``run_step``, peak tracking) that the estimator, the planner and the
  integrations share.
* :mod:`memfit.plan`: :func:`estimate` gives the peak memory of a training step from
  fake tensors (nothing computed or allocated); :func:`profile` measures per-module
  saved bytes and times; ``memfit.plan(model, batch, budget)`` picks compression,
  recomputation and optimizer-state bits to fit a byte budget.
* :func:`causal_lm_loss` computes a causal LM's loss in chunks, without full logits.
"""

from . import codec, optim
from ._backends import KernelBackendError

# memfit.activations(model, bits=4) -> ActivationCompressor: the package is callable, so
# memfit.activations.ops & co. stay importable under the verb's name.
from . import activations
from .activations import ActivationCompressor, ActivationStats, HostMemoryError, ModuleStats, Offload

__version__ = "0.1.0"
__all__ = [
    "ActivationCompressor",
    "ActivationStats",
    "HostMemoryError",
    "KernelBackendError",
    "ModuleStats",
    "Offload",
    "__version__",
    "activations",
    "codec",
    "optim",
]

from . import step  # noqa: E402
from .step import StepConfig  # noqa: E402

__all__ += ["StepConfig", "step"]

# memfit.plan(model, batch, budget) -> Plan: memfit.plan is the package holding
# estimate, measure_peak, profile, ...; calling it plans (see its docstring).
from . import plan  # noqa: E402
from .plan import BudgetTooSmall, Estimate, Plan, Profile, estimate, max_batch_size, profile  # noqa: E402

__all__ += ["BudgetTooSmall", "Estimate", "Plan", "Profile", "estimate", "max_batch_size", "plan", "profile"]

from .loss import causal_lm_loss  # noqa: E402

__all__ += ["causal_lm_loss"]

# memfit.weights(model, bits="nf4") compresses frozen parameters (the package is callable).
from . import weights  # noqa: E402
from .weights import CompressedWeights  # noqa: E402

__all__ += ["CompressedWeights", "weights"]
