"""``encode`` / ``decode``: any tensor in, an :class:`Encoded` out, and back."""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import torch

from .formats import BitMaskFormat, FP8Format, Format, IntFormat, RawFormat
from ._eager import FP8_MAX
from .kernels import backend_for

try:
    from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor
except ImportError:  # pragma: no cover - very old torch
    _FakeTensor = ()

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# A private stream of seeds for stochastic rounding, so encoding never consumes the
# global RNG (a compressed run must draw the same dropout masks as a plain one).
_seed_gen = torch.Generator().manual_seed(0x6D656D666974)


def _next_seed() -> int:
    return int(torch.randint(0, 2**62, (1,), generator=_seed_gen))


@dataclass
class Encoded:
    """A tensor in compressed form. ``decode(enc)`` gives back a contiguous tensor with
    the original shape and dtype (exactly, for lossless formats)."""

    format: Format
    shape: torch.Size
    dtype: torch.dtype
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    nonfinite_index: torch.Tensor | None = None
    nonfinite_value: torch.Tensor | None = None
    raw: torch.Tensor | None = field(default=None, repr=False)
    #: Per-channel factors (fp32, ``[C]``) the values were divided by before coding, and
    #: are multiplied by when decoded; None when the tensor was coded as it is.
    channel_scale: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        """Bytes actually held by this object's tensors."""
        total = 0
        for t in (self.codes, self.scale, self.lo, self.nonfinite_index, self.nonfinite_value, self.channel_scale):
            if t is not None:
                total += t.numel() * t.element_size()
        if self.raw is not None:
            total += tensor_nbytes(self.raw)
        return total


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements; 0 for kinds without a flat storage we can size."""
    try:
        if t.is_sparse:
            return tensor_nbytes(t._values()) + tensor_nbytes(t._indices())
        return t.numel() * t.element_size()
    except Exception:  # nested, exotic subclasses
        return 0


def is_fake(t: torch.Tensor) -> bool:
    """True for a FakeTensor (``FakeTensorMode``: shapes and dtypes, no data) or a meta
    tensor. The codec gives them correctly sized, empty encodings (see ``_fake``)."""
    return isinstance(t, _FakeTensor) or t.device.type == "meta"


def is_plain_dense(t: torch.Tensor) -> bool:
    """True for an ordinary strided tensor (not sparse, quantized, nested, meta or a
    tensor subclass such as DTensor), the only kind memfit re-encodes. A FakeTensor
    counts as the dense tensor it stands for, so memory estimates under
    ``FakeTensorMode`` see the same encodings as real runs."""
    return (
        type(t) is torch.Tensor or type(t) is torch.nn.Parameter or type(t) is _FakeTensor
    ) and t.layout is torch.strided and not t.is_quantized and not t.is_nested and t.device.type != "meta"


def _kernels_for(t: torch.Tensor):
    if is_fake(t):
        from . import _fake

        return _fake
    return backend_for(t.device)


def can_encode(x: torch.Tensor, fmt: Format) -> bool:
    """Whether ``fmt`` applies to ``x``; otherwise :func:`encode` stores it raw."""
    if isinstance(fmt, RawFormat) or not is_plain_dense(x):
        return False
    if isinstance(fmt, BitMaskFormat):
        return x.dtype in (torch.bool, torch.uint8, torch.int8) or x.dtype in FLOAT_DTYPES
    return x.dtype in FLOAT_DTYPES


def encode(x: torch.Tensor, fmt: Format, *, seed: int | None = None, channels: int | None = None) -> Encoded:
    """Compress ``x`` in format ``fmt``.

    Any shape works (empty, 0-dim, non-contiguous views); the result is about the
    flattened values, so views are not preserved. Tensors that ``fmt`` does not apply
    to (integer tensors under a float format, complex, sparse, quantized, nested and
    subclass tensors) are stored as they are, by reference, never copied or altered.

    Non-finite values in float formats come back exactly: each block's scale is taken
    over its finite elements only, so an inf or nan does not spoil its neighbours.

    ``seed`` fixes the stochastic-rounding noise; by default a private stream is used,
    never the global RNG.

    ``channels``: ``x`` is rows of this many channels (the last dimension of what a
    linear layer sees). Under an :class:`IntFormat`, when a few channels are far wider
    than the rest (trained transformers' outlier channels: the widest at least
    ``OUTLIER_SPREAD`` times the median), each channel is divided by its largest
    magnitude before coding and multiplied back when decoded, so that one outlier
    channel does not set the step of every block it falls in (blocks run along the
    rows). It costs one fp32 per channel; see :func:`channel_scales`.
    """
    if not can_encode(x, fmt):
        if isinstance(fmt, BitMaskFormat) and is_plain_dense(x):
            raise ValueError(f"BitMaskFormat needs a bool or {{0,1}} tensor, got dtype {x.dtype}")
        return Encoded(RawFormat(), torch.Size([x.numel()]) if x.is_nested else x.shape, x.dtype, raw=x)
    flat = x.detach().reshape(-1)
    if not flat.is_contiguous():  # reshape of a 0-stride expand can stay strided
        flat = flat.contiguous()
    fake = is_fake(flat)
    k = _kernels_for(flat)
    if isinstance(fmt, BitMaskFormat):
        if x.dtype is not torch.bool:
            if flat.numel() and not fake and not bool(((flat == 0) | (flat == 1)).all()):
                raise ValueError("BitMaskFormat needs values in {0, 1}; this tensor has others")
            flat = flat.to(torch.bool)
        return Encoded(fmt, x.shape, x.dtype, codes=k.pack_bits(flat))
    if flat.numel() == 0:
        return Encoded(fmt, x.shape, x.dtype, codes=flat.new_empty(0, dtype=torch.uint8),
                       scale=flat.new_empty(0, dtype=torch.float32))
    channel_scale = None
    if isinstance(fmt, IntFormat):
        stochastic = fmt.rounding == "stochastic"
        col_inv = None
        if channels is not None:
            channel_scale = channel_scales(flat, channels)
            if channel_scale is not None:
                col_inv = 1.0 / channel_scale
        codes, scale, lo, nonfinite_block = k.quantize_int(
            flat, fmt.bits, fmt.block_size, fmt.symmetric, stochastic,
            (_next_seed() if seed is None else seed) if stochastic else 0, col_inv,
        )
    elif isinstance(fmt, FP8Format):
        codes, scale, nonfinite_block = k.quantize_fp8(flat, fmt.block_size)
        lo = None
    else:
        raise TypeError(f"unknown format {fmt!r}")
    enc = Encoded(fmt, x.shape, x.dtype, codes=codes, scale=scale, lo=lo, channel_scale=channel_scale)
    if fake:
        return enc
    overflow_block = _overflow_blocks(fmt, scale, lo)
    if overflow_block is not None or bool(nonfinite_block.any()):
        exact = ~torch.isfinite(flat)
        if overflow_block is not None:
            exact |= overflow_block.repeat_interleave(fmt.block_size)[: flat.numel()]
        idx = torch.nonzero(exact).view(-1)
        enc.nonfinite_index = idx
        enc.nonfinite_value = flat[idx].clone()
    return enc


def _overflow_blocks(fmt: Format, scale: torch.Tensor, lo: torch.Tensor | None) -> torch.Tensor | None:
    """Blocks of finite values whose codes cannot be decoded in fp32, or None if there
    are none: the range ``max - min`` overflows (``scale`` is inf: two values near
    opposite float limits), the largest decoded magnitude rounds past the float
    limit, or the scale is so small (subnormal values only) that its inverse, by
    which the kernels multiply, overflows. Their elements are stored exactly beside the codes, like non-finite ones,
    so every backend decodes them the same way and finitely."""
    if scale.numel() and _surely_decodable(fmt, scale, lo):
        return None
    if isinstance(fmt, IntFormat):
        if lo is None:
            top = ((1 << (fmt.bits - 1)) - 1) * scale
        else:
            top = torch.maximum(lo.abs(), (lo + fmt.levels * scale).abs())
    else:
        top = FP8_MAX * scale
    bad = ~torch.isfinite(top) | ((scale > 0) & ~torch.isfinite(1.0 / scale))
    return bad if bool(bad.any()) else None


# The smallest scale whose fp32 inverse is finite, and the largest finite fp32.
_MIN_INVERTIBLE = 1.0 / torch.finfo(torch.float32).max
_F32_MAX = torch.finfo(torch.float32).max


def _surely_decodable(fmt: Format, scale: torch.Tensor, lo: torch.Tensor | None) -> bool:
    """A sufficient condition for :func:`_overflow_blocks` to find none, from the
    extremes of ``scale`` (and ``lo``) alone: a couple of reductions instead of a
    pass of element-wise tests, which every encode would otherwise pay. False only
    means "look block by block"."""
    smin, smax = (float(v) for v in torch.aminmax(scale))
    if smin == 0.0:  # all-zero blocks: the smallest positive scale is what matters
        smin = float(torch.where(scale > 0, scale, math.inf).amin())
    if not (smin >= _MIN_INVERTIBLE and math.isfinite(smax)):
        return False
    if isinstance(fmt, IntFormat):
        if lo is None:
            top = ((1 << (fmt.bits - 1)) - 1) * smax
        else:
            lmin, lmax = (float(v) for v in torch.aminmax(lo))
            top = max(abs(lmin), abs(lmax)) + fmt.levels * smax
    else:
        top = FP8_MAX * smax
    return top < 0.5 * _F32_MAX  # margin for fp32 rounding of the kernels' products


def channel_absmax(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The largest ``|x|`` of each of ``channels`` columns of ``x`` read row-major as
    ``[-1, channels]`` (fp32, one pass on CPU): what per-channel scaling needs to know
    before coding. NaNs are ignored; infinities count. ``x`` must be a plain dense
    float tensor whose size is a multiple of ``channels``."""
    if channels <= 0 or x.numel() % channels:
        raise ValueError(f"channel_absmax: {x.numel()} elements are not rows of {channels} channels")
    flat = x.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if is_fake(flat) or flat.numel() == 0:
        return flat.new_zeros(channels, dtype=torch.float32)
    return _kernels_for(flat).channel_absmax(flat, channels)


#: Per-channel scaling applies to rows of at least this many channels, when the widest
#: channel's largest magnitude is at least OUTLIER_SPREAD times the median channel's.
MIN_CHANNELS = 16
OUTLIER_SPREAD = 2.0


def channel_scales(x: torch.Tensor, channels: int) -> torch.Tensor | None:
    """The factors :func:`encode` divides ``x``'s channels by (each channel's largest
    finite magnitude; 1 for an all-zero channel, or one with infinities or magnitudes
    near the float limits), or None when scaling does not pay: fewer than
    ``MIN_CHANNELS`` channels, fewer than two rows, a size that is not whole rows, or
    channels of similar widths. For a fake tensor (a memory
    estimate, no data to decide from) the factors a real run may hold."""
    n = x.numel()
    if channels < MIN_CHANNELS or n % channels or n // channels < 2:
        return None
    if is_fake(x):
        return x.new_ones(channels, dtype=torch.float32)
    absmax = channel_absmax(x, channels)
    # Channels whose factor or its inverse would leave fp32's range keep factor 1.
    usable = (absmax >= _MIN_INVERTIBLE) & (absmax <= 0.25 * _F32_MAX)
    positive = absmax[usable]
    if positive.numel() == 0 or float(positive.max()) < OUTLIER_SPREAD * float(positive.median()):
        return None
    return torch.where(usable, absmax, torch.ones_like(absmax))


def decode(enc: Encoded) -> torch.Tensor:
    """The tensor ``enc`` stands for: raw tensors are returned as stored; the others
    come back contiguous, with the original shape and dtype."""
    fmt = enc.format
    if isinstance(fmt, RawFormat):
        return enc.raw
    n = enc.numel
    k = _kernels_for(enc.codes)
    if isinstance(fmt, BitMaskFormat):
        flat = k.unpack_bits(enc.codes, n)
        return flat.view(enc.shape) if enc.dtype is torch.bool else flat.to(enc.dtype).view(enc.shape)
    if n == 0:
        return torch.empty(enc.shape, dtype=enc.dtype, device=enc.codes.device)
    if isinstance(fmt, IntFormat):
        flat = k.dequantize_int(enc.codes, enc.scale, enc.lo, fmt.bits, fmt.block_size, n, enc.dtype,
                                enc.channel_scale)
    else:
        flat = k.dequantize_fp8(enc.codes, enc.scale, fmt.block_size, n, enc.dtype)
    if enc.nonfinite_index is not None:
        flat[enc.nonfinite_index] = enc.nonfinite_value
    return flat.view(enc.shape)
