"""Shape-only codec kernels for FakeTensors (``FakeTensorMode``) and meta tensors.

They return empty tensors of exactly the sizes and dtypes the real kernels return
(the fused C++ ones and the eager reference agree on outputs), and allocate nothing
else, as the fused C++ kernels do. :func:`memfit.plan.estimate` relies on this to
count what compressed activations hold without running any real computation.
"""

from __future__ import annotations

import torch

NAME = "fake"


def quantize_int(x, bits: int, block: int, symmetric: bool, stochastic: bool, seed: int):
    n = x.numel()
    nb = -(-n // block)
    codes = torch.empty(nb * block * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(nb, dtype=torch.float32, device=x.device)
    lo = None if symmetric else torch.empty(nb, dtype=torch.float32, device=x.device)
    nonfinite = torch.empty(nb, dtype=torch.bool, device=x.device)
    return codes, scale, lo, nonfinite


def dequantize_int(codes, scale, lo, bits: int, block: int, n: int, out_dtype: torch.dtype):
    return torch.empty(n, dtype=out_dtype, device=codes.device)


def quantize_fp8(x, block: int):
    n = x.numel()
    nb = -(-n // block)
    codes = torch.empty(nb * block, dtype=torch.uint8, device=x.device)
    scale = torch.empty(nb, dtype=torch.float32, device=x.device)
    nonfinite = torch.empty(nb, dtype=torch.bool, device=x.device)
    return codes, scale, nonfinite


def dequantize_fp8(codes, scale, block: int, n: int, out_dtype: torch.dtype):
    return torch.empty(n, dtype=out_dtype, device=codes.device)


def pack_bits(x):
    return torch.empty(-(-x.numel() // 8), dtype=torch.uint8, device=x.device)


def unpack_bits(codes, n: int):
    return torch.empty(n, dtype=torch.bool, device=codes.device)
