"""Fused C++/OpenMP codec kernels for CPU tensors, JIT-built from ``csrc/blockwise.cpp``.

:func:`load` builds the extension once per Python environment through
:mod:`memfit._jit` (ninja and a C++ compiler needed; the build is kept under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and returns this
module, whose functions have exactly the signatures and results of
:mod:`memfit.codec._eager` (for round-to-nearest, bit for bit).

Stochastic rounding draws its noise from a counter-based hash of ``(seed, element
index)``: deterministic for a seed whatever the thread count, but not the same
numbers as the eager reference's ``torch.rand``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .._jit import Extension

NAME = "cpu"

EXTENSION = Extension(
    name="memfit_codec_cpu",
    sources=(Path(__file__).with_name("csrc") / "blockwise.cpp",),
    what="the fused CPU codec kernels",
)

_ext = None


def load():
    """Build (first time in this environment) or load the extension; returns this
    module. Raises if it cannot be built (no compiler, no ninja, a build lock held by
    another process past its timeout, ...)."""
    global _ext
    _ext = EXTENSION.load()
    return sys.modules[__name__]


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _flat(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _FLOATS:
        x = x.to(torch.float32)
    x = x.reshape(-1)
    return x if x.is_contiguous() else x.contiguous()


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _FLOATS else torch.float32


def quantize_int(
    x: torch.Tensor, bits: int, block: int, symmetric: bool, stochastic: bool, seed: int,
    col_inv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    if seed >= 1 << 63:
        seed -= 1 << 64
    codes, scale, lo, nonfinite = _ext.quantize_int(
        _flat(x), int(bits), int(block), bool(symmetric), bool(stochastic), seed, col_inv
    )
    return codes, scale, (None if symmetric else lo), nonfinite


def dequantize_int(
    codes: torch.Tensor,
    scale: torch.Tensor,
    lo: torch.Tensor | None,
    bits: int,
    block: int,
    n: int,
    out_dtype: torch.dtype,
    col_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    dt = _out_dtype(out_dtype)
    out = _ext.dequantize_int(codes, scale, lo, int(bits), int(block), int(n), dt, col_scale)
    return out if dt is out_dtype else out.to(out_dtype)


def quantize_fp8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, scale, nonfinite = _ext.quantize_fp8(_flat(x), int(block))
    return codes, scale, nonfinite


def dequantize_fp8(
    codes: torch.Tensor, scale: torch.Tensor, block: int, n: int, out_dtype: torch.dtype
) -> torch.Tensor:
    dt = _out_dtype(out_dtype)
    out = _ext.dequantize_fp8(codes, scale, int(block), int(n), dt)
    return out if dt is out_dtype else out.to(out_dtype)


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool/uint8 {0,1} tensor into bytes, element ``8*i + j`` in bit ``j``."""
    x = x.reshape(-1)
    if x.dtype not in (torch.bool, torch.uint8):
        x = x.to(torch.uint8)
    return _ext.pack_bits(x if x.is_contiguous() else x.contiguous())


def unpack_bits(codes: torch.Tensor, n: int) -> torch.Tensor:
    return _ext.unpack_bits(codes if codes.is_contiguous() else codes.contiguous(), int(n))


def channel_absmax(x: torch.Tensor, channels: int) -> torch.Tensor:
    return _ext.channel_absmax(_flat(x), int(channels))
