"""Picks the fastest available implementation of each codec kernel for a device.

CPU: the fused C++/OpenMP kernels from ``csrc/`` (JIT-built once per machine with
torch's cpp_extension; needs a C++ compiler and ninja), else the eager reference.
Other devices: Triton kernels when Triton is importable, else the eager reference.
``MEMFIT_KERNELS=eager`` forces the reference everywhere.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import _eager

_cpu_module: ModuleType | None = None
_cpu_tried = False


def _load_cpu() -> ModuleType | None:
    global _cpu_module, _cpu_tried
    if _cpu_tried:
        return _cpu_module
    _cpu_tried = True
    try:
        from . import _cpu  # builds or loads the extension

        _cpu_module = _cpu.load()
    except Exception as exc:  # no compiler, no ninja, ...: stay correct, just slower
        import warnings

        warnings.warn(
            f"memfit: fused CPU kernels unavailable ({type(exc).__name__}: {exc}); "
            "using the eager PyTorch fallback, which is correct but slower. "
            "Install a C++ compiler and `pip install ninja` for the fast path.",
            RuntimeWarning,
            stacklevel=3,
        )
        _cpu_module = None
    return _cpu_module


def backend_for(device: torch.device) -> ModuleType:
    """The kernel module used for tensors on ``device``: it exposes ``quantize_int``,
    ``dequantize_int``, ``quantize_fp8``, ``dequantize_fp8``, ``pack_bits`` and
    ``unpack_bits`` with the signatures of :mod:`memfit.codec._eager`."""
    choice = os.environ.get("MEMFIT_KERNELS", "auto")
    if choice == "eager":
        return _eager
    if device.type == "cpu":
        mod = _load_cpu()
        return mod if mod is not None else _eager
    if device.type == "cuda" and choice in ("auto", "triton"):
        try:
            from . import _triton

            if _triton.available():
                return _triton
        except ImportError:
            pass
    return _eager


def backend_name(device: torch.device | str = "cpu") -> str:
    mod = backend_for(torch.device(device))
    return getattr(mod, "NAME", "eager")
