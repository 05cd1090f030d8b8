"""memfit.activations: compress the tensors autograd saves for backward.

:func:`activations` returns an :class:`ActivationCompressor`, a context manager built on
``torch.autograd.graph.saved_tensors_hooks``; :mod:`.policy` maps modules to formats;
:class:`ActivationStats` reports what was saved and what was held, per module.
"""

from .engine import ActivationCompressor, ActivationStats, ModuleStats, activations

__all__ = ["ActivationCompressor", "ActivationStats", "ModuleStats", "activations"]
