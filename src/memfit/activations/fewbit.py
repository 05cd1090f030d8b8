"""Few-bit derivatives for smooth activations (GELU, SiLU), as in "Few-bit backward".

The backward of ``y = f(x)`` needs only ``f'(x)``, not ``x``. So instead of codes of
``x``, each element stores which of ``2**bits`` derivative levels its ``f'(x)`` is
nearest to; decoding gives, per level, a representative ``x`` whose derivative *is*
that level, so the op's own backward runs unchanged and sees the level.

The levels minimise the mean squared derivative error (Lloyd-Max) over inputs drawn
from an even mix of N(0, 1) and N(0, 3): the activations' inputs in trained models.
They are computed once per (function, bits) on first use. A representative is found
by bisection on the branch where ``f'`` rises from its minimum to its maximum (GELU:
about [-1.41, 1.41]; SiLU: about [-2.40, 2.40]), which holds every derivative value.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


def _gelu_tanh_derivative(x: torch.Tensor) -> torch.Tensor:
    u = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
    th = torch.tanh(u)
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


def _silu_derivative(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


#: function name -> its derivative
FUNCTIONS = {"gelu": _gelu_derivative, "gelu_tanh": _gelu_tanh_derivative, "silu": _silu_derivative}


@lru_cache(maxsize=None)
def levels(function: str, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boundaries, derivative_levels, representatives)`` for ``function`` at ``bits``:
    an element whose derivative lies between ``boundaries[i-1]`` and ``boundaries[i]``
    gets level ``i``, decoded to ``representatives[i]`` (fp32, on the CPU)."""
    with unset_fake_temporarily():  # first use may come inside a memory estimate
        return _levels(function, bits)


def _levels(function: str, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    derivative = FUNCTIONS[function]
    grid = torch.linspace(-6.0, 6.0, 120_001)
    on_grid = derivative(grid)
    lo, hi = grid[on_grid.argmin()].item(), grid[on_grid.argmax()].item()  # the rising branch
    g = torch.Generator().manual_seed(0)
    samples = torch.cat([torch.randn(50_000, generator=g), 3.0 * torch.randn(50_000, generator=g)])
    d = derivative(samples)
    n = 1 << bits
    level = torch.quantile(d, (torch.arange(n, dtype=torch.float32) + 0.5) / n)
    for _ in range(50):
        bounds = (level[1:] + level[:-1]) / 2
        idx = torch.bucketize(d, bounds)
        sums = torch.zeros(n).index_add_(0, idx, d)
        counts = torch.zeros(n).index_add_(0, idx, torch.ones_like(d))
        level = torch.where(counts > 0, sums / counts.clamp(min=1), level)
    bounds = (level[1:] + level[:-1]) / 2
    a = torch.full((n,), lo)
    b = torch.full((n,), hi)
    for _ in range(60):  # bisection for x in [lo, hi] with derivative(x) == level
        mid = (a + b) / 2
        below = derivative(mid) < level
        a = torch.where(below, mid, a)
        b = torch.where(below, b, mid)
    return bounds, derivative(a), a


def bucket(function: str, bits: int, x: torch.Tensor) -> torch.Tensor:
    """The level index of every element of ``x`` (float32, values 0 .. 2**bits - 1)."""
    derivative = FUNCTIONS[function]
    bounds = levels(function, bits)[0].to(x.device)
    with torch.no_grad():
        return torch.bucketize(derivative(x.to(torch.float32)), bounds).to(torch.float32)


def representatives(function: str, bits: int) -> torch.Tensor:
    """The input value each level decodes to."""
    return levels(function, bits)[2]
