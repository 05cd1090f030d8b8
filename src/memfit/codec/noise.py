"""How much rounding error an integer encoding carries, predicted without decoding it.

An :class:`IntFormat` block of step ``scale`` adds, per element, an error of variance
``scale**2 * f * (1 - f)`` under stochastic rounding (``f``: where the value falls
between two codes), ``scale**2 / 6`` on average over ``f``, and ``scale**2 / 12``
under round-to-nearest. So the per-block scales of an encoding and the energy
``sum(x**2)`` of the tensor give its expected relative squared error
(:func:`predicted_error`), and the same arithmetic on the expected block range of
independent Gaussian values gives the reference a well-behaved tensor gets at that
width (:func:`gaussian_error`). Their ratio depends on the shape of the values within
blocks, not on the bits or the rounding: about 1 for Gaussian values, larger for
heavy-tailed ones (a product of two activations, such as a gated MLP's
``silu(gate) * up``), below 1 for values with a common offset or a bounded range.
"""

from __future__ import annotations

import functools
import math
import statistics

import torch

from .blockwise import Encoded, is_fake
from .formats import IntFormat


def _mean_square_error_per_step(fmt: IntFormat) -> float:
    """The expected squared rounding error per element, in units of ``scale**2``."""
    return 1.0 / 6.0 if fmt.rounding == "stochastic" else 1.0 / 12.0


def predicted_error(x: torch.Tensor, enc: Encoded) -> float:
    """The expected ``||decode(enc) - x||**2 / ||x||**2`` of ``enc = encode(x, fmt)``
    under an :class:`IntFormat`, from ``enc``'s per-block scales (and per-channel
    factors) and one pass over ``x`` for its energy; nothing is decoded.

    The prediction assumes values fall anywhere between two codes. It errs high where
    they cluster on a code: elements stored exactly beside the codes (non-finite
    values, overflowing blocks), and the values near 0 of a heavy-tailed block under a
    symmetric format, whose middle code is exactly 0. NaN when it cannot
    be predicted: ``x`` has no energy, infinite energy (non-finite values, or squares
    past the fp32 range), is a fake tensor, or ``enc`` is not integer codes.

    Cost: a tensor of more than ``2 * SAMPLE_BLOCKS`` whole blocks is judged on
    :data:`SAMPLE_BLOCKS` evenly spaced ones (their scales and their elements' energy),
    a fixed read of at most ``SAMPLE_BLOCKS * block_size`` elements, so the check
    costs a small fraction of the encode however large the tensor; a smaller tensor
    takes one read of ``x`` (its squared norm in fp32; no temporary for fp32, pieces
    of at most 1 MiB for 16-bit tensors). Then reductions over the (sampled) block
    scales. A sample sees non-finite values only in the blocks it reads.
    """
    fmt = enc.format
    if not isinstance(fmt, IntFormat) or enc.scale is None or is_fake(x) or x.numel() == 0:
        return math.nan
    x = x.detach().reshape(-1)
    scale = enc.scale.reshape(-1)
    block, n = fmt.block_size, x.numel()
    starts = None
    if n // block > 2 * SAMPLE_BLOCKS:
        picked = _sample(n // block, SAMPLE_BLOCKS)
        starts = picked * block
        x = x[: n // block * block].view(-1, block)[picked.to(x.device)]  # whole blocks only
        scale = scale[picked.to(scale.device)]
    energy = _energy(x)
    if not (0.0 < energy < math.inf):
        return math.nan
    # fp32, which every device has; near its limit a sum may overflow to inf (errs high).
    scale = scale.to(torch.float32)
    scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))  # blocks stored exactly
    weight = _block_weights(n, block, scale.numel(), enc.channel_scale, starts)
    weight = weight.to(device=scale.device, dtype=torch.float32)
    noise = float((scale * scale * weight).sum()) * _mean_square_error_per_step(fmt)
    return noise / energy


#: Above twice this many whole blocks, :func:`predicted_error` judges a tensor on this
#: many evenly spaced blocks: enough that the estimate of a heavy-tailed tensor's
#: ratio stays within a few percent of the whole tensor's (tests/test_activations_adaptive.py),
#: while the check reads a fixed amount of memory.
SAMPLE_BLOCKS = 1024


@functools.lru_cache(maxsize=64)
def _sample(nblocks: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced block indices out of ``nblocks`` (on the CPU)."""
    return torch.linspace(0, nblocks - 1, count, dtype=torch.float64).round().to(torch.int64)


#: Elements per piece when summing the squares of a 16-bit tensor in fp32: a cast of the
#: whole tensor would cost twice its size; a piece costs at most 1 MiB.
_PIECE = 1 << 18


def _energy(x: torch.Tensor) -> float:
    """``sum(x**2)`` accumulated in fp32, in one read of ``x``. fp16's own range
    would overflow, so 16-bit tensors are summed a piece at a time in fp32."""
    if x.dtype is torch.float32:
        return float(torch.linalg.vector_norm(x)) ** 2
    pieces = x.reshape(-1).split(_PIECE)
    norms = torch.stack([torch.linalg.vector_norm(piece, dtype=torch.float32) for piece in pieces])
    return float((norms.double() ** 2).sum())


def _block_weights(n: int, block: int, nblocks: int, channel_scale: torch.Tensor | None,
                   starts: torch.Tensor | None = None) -> torch.Tensor:
    """Per block (all ``nblocks`` of them, or those starting at the flat positions
    ``starts``), the sum over its elements of the squared factor its codes are
    multiplied by when decoded: the element count, or with per-channel factors
    ``c`` (rows of ``C`` channels, blocks along the rows) the sum of ``c[j]**2`` over
    the channels ``j`` its elements fall in, from prefix sums over one row."""
    if starts is None:
        starts = torch.arange(nblocks, dtype=torch.int64) * block
    starts = starts.cpu()
    ends = torch.clamp(starts + block, max=n)
    if channel_scale is None:
        return (ends - starts).to(torch.float64)
    c2 = channel_scale.detach().to(device="cpu", dtype=torch.float64) ** 2
    channels = c2.numel()
    prefix = torch.cat([c2.new_zeros(1), c2.cumsum(0)])

    def below(pos: torch.Tensor) -> torch.Tensor:  # sum of c**2 over flat positions [0, pos)
        return (pos // channels).to(torch.float64) * prefix[channels] + prefix[pos % channels]

    return below(ends) - below(starts)


def gaussian_error(fmt: IntFormat) -> float:
    """:func:`predicted_error` of a tensor of independent standard Gaussian values
    under ``fmt``: each block's range is taken as the expected range of
    ``block_size`` Gaussian samples (twice the expected maximum, or twice the
    expected largest magnitude for symmetric formats, by Blom's approximation
    ``Phi^-1((n - 0.375) / (n + 0.25))``)."""
    if not isinstance(fmt, IntFormat):
        raise TypeError(f"gaussian_error needs an IntFormat, got {type(fmt).__name__}")
    n = fmt.block_size
    quantile = (n - 0.375) / (n + 0.25)
    if fmt.symmetric:
        quantile = (1.0 + quantile) / 2.0  # of |x|: P(|x| < t) = 2 Phi(t) - 1
    block_range = 2.0 * statistics.NormalDist().inv_cdf(quantile)
    step = block_range / fmt.levels
    return step * step * _mean_square_error_per_step(fmt)
