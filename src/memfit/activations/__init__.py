"""memfit.activations: compress the tensors autograd saves for backward.

The package is callable: ``memfit.activations(model, bits=4)`` is
:func:`~memfit.activations.engine.activations`, while ``memfit.activations.ops`` and
the other modules stay importable (:func:`memfit._callable.make_callable`).

:func:`activations` returns an :class:`ActivationCompressor`, a context manager built on
``torch.autograd.graph.saved_tensors_hooks``; :mod:`.saved` says what a saved tensor is
and which module saved it (the rule every memfit pack hook shares); :mod:`.ops` is the
op table (how the op that saves a tensor changes its format; :data:`OP_KINDS` are the
kinds a policy can name as ``"op:<kind>"``) and :mod:`.fewbit` its few-bit
derivatives; :mod:`.policy` maps modules to formats; :mod:`.offload` holds the saved
tensors of ``"offload"`` modules in pinned host memory (:class:`Offload` its options,
:class:`HostMemoryError` when the host has too little); :class:`ActivationStats` reports
what was saved and what was held, per module and per op kind.
"""

from .engine import ActivationCompressor, ActivationStats, ModuleStats, activations
from .offload import HostMemoryError, Offload
from .ops import OP_KINDS
from .saved import ModuleStack, classify

__all__ = ["OP_KINDS", "ActivationCompressor", "ActivationStats", "HostMemoryError", "ModuleStack", "ModuleStats",
           "Offload", "activations", "classify"]

from .._callable import make_callable  # noqa: E402

make_callable(__name__, "activations")
