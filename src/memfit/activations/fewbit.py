"""Few-bit derivatives for smooth activations (GELU, SiLU), as in "Few-bit backward".

The backward of ``y = f(x)`` needs only ``f'(x)``, not ``x``. So instead of codes of
``x``, each element stores which of ``2**bits`` derivative levels its ``f'(x)`` is
nearest to; decoding gives, per level, a representative ``x`` whose derivative *is*
that level, so the op's own backward runs unchanged and sees the level.

The levels minimise the mean squared derivative error (Lloyd-Max) over inputs drawn
from an even mix of N(0, 1) and N(0, 3): the activations' inputs in trained models.
They are computed once per (function, bits) on first use. A representative is found
by bisection on the branch where ``f'`` rises from its minimum to its maximum (GELU:
about [-1.41, 1.41]; SiLU: about [-2.40, 2.40]; quick GELU, SiLU at ``1.702 x``: about
[-1.41, 1.41]), which holds every derivative value.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..codec.blockwise import is_fake

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


def _quick_gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    # x * sigmoid(1.702 x), the GELU approximation of CLIP's "quick_gelu"
    s = torch.sigmoid(1.702 * x)
    return s * (1.0 + 1.702 * x * (1.0 - s))


#: function name -> its derivative
FUNCTIONS = {"gelu": _gelu_derivative, "gelu_tanh": _gelu_tanh_derivative, "silu": _silu_derivative,
             "quick_gelu": _quick_gelu_derivative}


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


@lru_cache(maxsize=None)
def _intervals(function: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(breaks, interval_levels)``: the sorted inputs ``x`` where ``f'(x)`` crosses a
    level boundary, and the level of each of the ``len(breaks) + 1`` intervals they
    make, so that an element's level is one ``bucketize`` of ``x`` itself (``f'`` is
    not monotonic: GELU's rises from about -0.13 to 1.13 and falls back to 0 and 1
    on either side)."""
    with unset_fake_temporarily():
        derivative = FUNCTIONS[function]
        bounds = levels(function, bits)[0].to(torch.float64)
        grid = torch.linspace(-20.0, 20.0, 40_001, dtype=torch.float64)  # beyond, f' is flat
        d = derivative(grid)
        breaks = []
        for b in bounds.tolist():
            above = d > b
            for i in torch.nonzero(above[1:] != above[:-1]).flatten().tolist():
                lo, hi = grid[i].item(), grid[i + 1].item()
                rising = bool(above[i + 1])
                for _ in range(60):  # bisection on the monotonic piece between two grid points
                    mid = (lo + hi) / 2
                    if (derivative(torch.tensor(mid, dtype=torch.float64)).item() > b) == rising:
                        hi = mid
                    else:
                        lo = mid
                breaks.append((lo + hi) / 2)
        edges = torch.tensor(sorted(breaks), dtype=torch.float64)
        # each interval's level: that of a point inside it (the ends: just outside)
        inside = torch.cat([edges[:1] - 1.0, (edges[1:] + edges[:-1]) / 2, edges[-1:] + 1.0]) \
            if len(edges) else torch.zeros(1, dtype=torch.float64)
        interval_levels = torch.bucketize(derivative(inside), bounds).to(torch.float32)
        return edges.to(torch.float32), interval_levels


#: Elements per piece in :func:`bucket`: its temporaries (an int32 index) exist for one
#: piece at a time, not for a whole activation at the forward's peak.
CHUNK = 1 << 16


def bucket(function: str, bits: int, x: torch.Tensor) -> torch.Tensor:
    """The level index of every element of ``x`` (float32, values 0 .. 2**bits - 1):
    which interval of ``x`` between the points where ``f'`` crosses a level boundary
    it lies in (:func:`_intervals`), found piece by piece (:data:`CHUNK`). NaN lands in
    the last interval. Under a ``FakeTensorMode`` (a memory estimate) it runs the same
    ops on fake tensors, so the estimate sees the same temporaries."""
    breaks, interval_levels = _intervals(function, bits)
    if is_fake(x):
        # values do not matter to sizes
        breaks, interval_levels = torch.empty(len(breaks), device=x.device), torch.empty(len(interval_levels),
                                                                                           device=x.device)
    else:
        breaks, interval_levels = breaks.to(x.device), interval_levels.to(x.device)
    with torch.no_grad():
        flat = x.reshape(-1)
        out = torch.empty(flat.shape, dtype=torch.float32, device=x.device)
        for i in range(0, flat.numel(), CHUNK):
            idx = torch.bucketize(flat[i:i + CHUNK].to(torch.float32), breaks, out_int32=True)
            torch.index_select(interval_levels, 0, idx, out=out[i:i + CHUNK])
    return out.view(x.shape)


def prepare(function: str, bits: int) -> None:
    """Compute ``function``'s tables at ``bits`` now (they are cached per process), so
    that the first training step's memory peak does not include their temporaries."""
    _intervals(function, bits)


def representatives(function: str, bits: int) -> torch.Tensor:
    """The input value each level decodes to."""
    return levels(function, bits)[2]
