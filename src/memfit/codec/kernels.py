"""The codec's kernels for a device, as :mod:`memfit._backends` chooses them.

``backend_for(device)`` is the module whose ``quantize_int``, ``dequantize_int``,
``quantize_fp8``, ``dequantize_fp8``, ``pack_bits`` and ``unpack_bits`` run on tensors
of that device: the fused C++ kernels (:mod:`memfit.codec._cpu`) on CPU, Triton ones
(``memfit.codec._triton``, when that module and Triton are installed) on CUDA, else the
eager reference (:mod:`memfit.codec._eager`). ``MEMFIT_KERNELS`` overrides the choice;
how to add a backend is written in :mod:`memfit._backends`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .._backends import backend


def backend_for(device: torch.device) -> ModuleType:
    """The kernel module used for tensors on ``device``: it exposes ``quantize_int``,
    ``dequantize_int``, ``quantize_fp8``, ``dequantize_fp8``, ``pack_bits`` and
    ``unpack_bits`` with the signatures of :mod:`memfit.codec._eager`."""
    return backend("codec", device).kernels


def backend_name(device: torch.device | str = "cpu") -> str:
    """Which codec backend runs on ``device``'s tensors: ``"cpu"`` (fused C++),
    ``"triton"`` or ``"eager"``. Loads (on first use builds) the kernels it names."""
    return backend("codec", device).name
