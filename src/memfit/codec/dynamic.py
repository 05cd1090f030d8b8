"""Code-book ("map") quantization: block-wise absmax scaling, then round-to-nearest
onto a fixed, sorted set of 2**bits values in [-1, 1].

This is the quantization used for optimizer states (``memfit.optim``), but nothing
here knows about optimizers:

* :func:`dynamic_map` is the "dynamic tree" map of bitsandbytes (Dettmers et al.,
  "8-bit Optimizers via Block-wise Quantization"): resolution doubles in each decade,
  so values spanning many orders of magnitude keep their relative precision. Signed
  (256 codes at 8 bits, 16 at 4 bits) or unsigned.
* :func:`float_map` is an 8-bit floating-point map (sign, exponent, mantissa; the top
  code exactly 1.0): the same relative resolution in every binade, and rounding to it
  is integer rounding of the fp32 bits, so a kernel needs no search and no table.
  memfit's 8-bit optimizer states use it (E4M3-like signed, E5M3-like unsigned
  without zero).
* :func:`linear_map` with ``zero=False`` is the linear map without a zero code of
  Li et al. 2023 ("Memory Efficient Optimizers with 4-bit States"): ``k / 2**bits``
  for ``k = 1 .. 2**bits``. A second moment stored with it can never decode to 0,
  which is what avoids the "zero-point problem" (m / sqrt(v) blowing up).

A :class:`QuantMap` holds the values, the midpoints between neighbours (round to
nearest = count the midpoints strictly below ``x``), and a lookup table indexed by the
sign, exponent and top mantissa bits of an fp32 ``x``: each table cell holds the code
of its lower end and the one midpoint (at most) inside it, so a fused kernel finds the
nearest code with one load and one comparison, giving exactly the result of
:func:`quantize_normalized` (``torch.searchsorted``).

Block-wise layout (:func:`quantize_blockwise` / :func:`dequantize_blockwise`): the
flattened tensor is cut into blocks of ``block`` elements (the last one padded); each
block stores ``absmax`` (fp32, over its finite elements) and one code per element,
two codes a byte at 4 bits (element ``2i`` in the low nibble). ``x`` is normalised as
``x * (1 / absmax)`` (fp32; ``0`` when ``absmax == 0``), clamped to [-1, 1], and
decoded as ``values[code] * absmax``. Non-finite elements get the code nearest 0;
callers that must keep them store them elsewhere (:func:`nonfinite_index`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "QuantMap",
    "dequantize_blockwise",
    "dynamic_map",
    "float_map",
    "get_map",
    "linear_map",
    "pack_nibbles",
    "quantize_blockwise",
    "quantize_normalized",
    "table_lookup",
    "unpack_nibbles",
]


# --------------------------------------------------------------------------- maps


def dynamic_map(bits: int = 8, signed: bool = True) -> torch.Tensor:
    """The bitsandbytes dynamic (tree) map with ``2**bits`` sorted fp32 values.

    Same construction as ``bitsandbytes.functional.create_dynamic_map`` with
    ``max_exponent_bits = bits - 1`` (8 bits: 7; 4 bits: 3, as torchao's 4-bit map):
    decade ``i`` holds ``2**i`` (signed) or ``2**(i+1)`` (unsigned) evenly spaced
    values, plus 0 and 1. The signed map has no -1 (127 negative, 0, 128 positive
    values at 8 bits).
    """
    if bits not in (4, 8):
        raise ValueError(f"dynamic_map supports 4 or 8 bits, got {bits!r}")
    max_exp = bits - 1
    non_sign = bits - 1
    data: list[float] = []
    for i in range(max_exp):
        items = 2 ** (i + non_sign - max_exp) + 1 if signed else 2 ** (i + non_sign - max_exp + 1) + 1
        bounds = np.linspace(0.1, 1.0, items, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = 10.0 ** (-(max_exp - 1) + i)
        data += (scale * means.astype(np.float64)).tolist()
        if signed:
            data += (-scale * means.astype(np.float64)).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**bits:  # pragma: no cover - construction invariant
        raise AssertionError(len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def float_map(mant_bits: int, signed: bool) -> torch.Tensor:
    """An 8-bit floating-point map (sign, exponent, ``mant_bits`` mantissa bits) whose
    largest code is exactly 1.0, as sorted fp32 values.

    Magnitude code ``k`` (7 bits signed, 8 unsigned) stands for the fp32 whose bits are
    ``(k + off) << (23 - mant_bits)``, with ``off`` chosen so that the top code is 1.0:
    every binade below 1 holds ``2**mant_bits`` equally spaced codes, so rounding to the
    nearest code is rounding the fp32 mantissa, a few integer operations in a kernel
    (no search, no table). The same family as the FP8 formats used for optimizer states
    by FP8-LM and COAT (E4M3 for the first moment).

    * signed (``mant_bits=3``: E4M3-like): magnitude 0 is 0.0, magnitudes 1..127 are
      normal (down to 1.25 * 2**-16); 127 negative values, 0, 127 positive ones, and 1.0
      twice (the top code 255 is never produced by rounding) to make 256.
    * unsigned (``mant_bits=3``: E5M3-like): 256 normal codes down to 1.125 * 2**-32 and no
      zero code, so that a second moment never decodes to 0 (the zero-point problem:
      ``m / sqrt(v)`` blowing up; Li et al. 2023); anything below the smallest code
      rounds up to it.
    """
    if not 2 <= mant_bits <= 6:
        raise ValueError(f"mant_bits must be in 2..6, got {mant_bits!r}")
    mag_bits = 7 if signed else 8
    top = (1 << mag_bits) - 1
    off = (127 << mant_bits) - top
    k = np.arange(top + 1, dtype=np.int64)
    mag = _f32_bits_to_float((k + off) << (23 - mant_bits)).astype(np.float64)
    if not signed:
        return torch.tensor(mag.tolist(), dtype=torch.float32)
    mag[0] = 0.0
    vals = np.concatenate([-mag[:0:-1], mag, [1.0]])
    return torch.tensor(vals.tolist(), dtype=torch.float32)


def linear_map(bits: int = 4, signed: bool = False, zero: bool = False) -> torch.Tensor:
    """Evenly spaced values. Unsigned without zero (the default): ``k / 2**bits`` for
    ``k = 1 .. 2**bits``; unsigned with zero: ``k / (2**bits - 1)``, ``k = 0 ..``;
    signed (always with zero): ``k / (2**(bits-1) - 1)`` for ``k = -(2**(bits-1)) + 1 ..``,
    plus -1 repeated as the extra code."""
    n = 2**bits
    if not signed:
        if zero:
            vals = np.arange(n, dtype=np.float64) / (n - 1)
        else:
            vals = np.arange(1, n + 1, dtype=np.float64) / n
    else:
        half = n // 2 - 1
        vals = np.concatenate([[-1.0], np.arange(-half, half + 1, dtype=np.float64) / half])
    return torch.tensor(sorted(vals.tolist()), dtype=torch.float32)


# --------------------------------------------------------------------------- QuantMap


def _f32_bits_to_float(u: np.ndarray) -> np.ndarray:
    return u.astype(np.uint32).view(np.float32)


@dataclass(frozen=True, eq=False)
class QuantMap:
    """A sorted code book plus what the kernels need to round onto it quickly."""

    name: str
    bits: int
    values: torch.Tensor  # [2**bits] fp32, sorted ascending, within [-1, 1]
    midpoints: torch.Tensor = field(repr=False)  # [2**bits - 1] fp32
    table: torch.Tensor = field(repr=False)  # [2 * cells] int32, see _build_table
    mant_bits: int = 0
    emin: int = 0
    cells: int = 0  # table cells per sign

    @functools.cached_property
    def zero_code(self) -> int:
        """The code that non-finite and padding elements get: the one nearest 0."""
        return int(quantize_normalized(torch.zeros(1), self)[0])

    @classmethod
    def build(cls, name: str, values: torch.Tensor) -> "QuantMap":
        values = values.to(torch.float32).contiguous()
        n = values.numel()
        bits = int(round(math.log2(n)))
        if 2**bits != n or bits not in (4, 8):
            raise ValueError(f"a map needs 16 or 256 values, got {n}")
        if not bool((values[1:] >= values[:-1]).all()) or float(values.abs().max()) > 1.0:
            raise ValueError("map values must be sorted and within [-1, 1]")
        mids = ((values[:-1] + values[1:]) * 0.5).contiguous()  # fp32 arithmetic
        table, mb, emin, cells = _build_table(mids.numpy())
        return cls(name, bits, values, mids, torch.from_numpy(table), mb, emin, cells)


def _build_table(mids: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """Find the fewest mantissa bits B (then the highest lowest exponent ``emin``) such
    that every table cell holds at most one midpoint and no midpoint lies in
    ``[-2**(emin-127), 2**(emin-127)]`` (everything smaller in magnitude shares cell 0),
    and build the packed table: ``code_lo << 24 | t_off`` per cell and sign, where
    ``t_off`` is the midpoint's fp32 bit pattern minus the cell's lowest (magnitudes),
    or a sentinel (``0xFFFFFF`` for x >= 0, ``0`` for x < 0) when the cell holds none."""
    mids = mids.astype(np.float32)

    def count_below(x: np.ndarray) -> np.ndarray:  # code of x = #(mids < x)
        return np.searchsorted(mids, x, side="left").astype(np.int64)

    for B in range(3, 12):
        emin = 126
        while emin > 1:
            base0 = np.float32(2.0 ** (emin - 127))
            if not ((mids >= -base0) & (mids <= base0)).any():
                break
            emin -= 1
        cells = ((127 - emin) << B) + 1
        j = np.arange(cells, dtype=np.int64)
        lo_bits = (j + (emin << B)) << (23 - B)
        hi_bits = ((j + 1 + (emin << B)) << (23 - B)) - 1  # last float of the cell
        a = _f32_bits_to_float(lo_bits)
        b = _f32_bits_to_float(hi_bits)
        packed, fine = [], True
        for sign in (0, 1):
            lo, hi = (a, b) if sign == 0 else (-b, -a)
            ca, cb = count_below(lo), count_below(hi)
            d = cb - ca
            if (d > 1).any():
                fine = False
                break
            t_off = np.full(cells, 0xFFFFFF if sign == 0 else 0, dtype=np.int64)
            sel = d == 1
            t = np.abs(mids[ca[sel]]).astype(np.float32)
            t_off[sel] = t.view(np.uint32).astype(np.int64) - lo_bits[sel]
            packed.append((ca << 24) | t_off)
        if fine:
            table = np.concatenate(packed).astype(np.uint32).view(np.int32)
            return table, B, emin, cells
    raise ValueError("map too dense for a lookup table")  # pragma: no cover


def nozero(values: torch.Tensor) -> torch.Tensor:
    """An unsigned map with its zero code replaced by half its smallest positive value,
    so that nothing decodes to exactly 0 (the zero-point problem of second moments)."""
    v = values.clone()
    pos = v[v > 0]
    v[v == 0] = float(pos.min()) / 2
    return torch.sort(v).values


_MAP_BUILDERS = {
    "dynamic8_signed": lambda: dynamic_map(8, True),
    "dynamic8_unsigned": lambda: dynamic_map(8, False),
    "dynamic4_signed": lambda: dynamic_map(4, True),
    "dynamic4_unsigned": lambda: dynamic_map(4, False),
    "float8_e4m3_signed": lambda: float_map(3, True),
    "float8_e5m3_unsigned": lambda: float_map(3, False),
    "float8_e3m4_signed": lambda: float_map(4, True),
    "float8_e4m4_unsigned": lambda: float_map(4, False),
    "dynamic8_unsigned_nozero": lambda: nozero(dynamic_map(8, False)),
    "dynamic4_unsigned_nozero": lambda: nozero(dynamic_map(4, False)),
    "linear4_unsigned_nozero": lambda: linear_map(4, False, zero=False),
    "linear8_unsigned_nozero": lambda: linear_map(8, False, zero=False),
    "linear4_unsigned": lambda: linear_map(4, False, zero=True),
    "linear8_unsigned": lambda: linear_map(8, False, zero=True),
}


@functools.lru_cache(maxsize=None)
def get_map(name: str) -> QuantMap:
    """A named, cached :class:`QuantMap` (names are stable: checkpoints store them)."""
    try:
        builder = _MAP_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown quantization map {name!r}; known: {sorted(_MAP_BUILDERS)}") from None
    return QuantMap.build(name, builder())


# --------------------------------------------------------------------------- element-wise


def quantize_normalized(xn: torch.Tensor, qmap: QuantMap) -> torch.Tensor:
    """Nearest code (int64) of already-normalised fp32 values; clamps to [-1, 1];
    ties go to the lower code; NaN gets the code nearest 0."""
    x = xn.to(torch.float32).clamp(-1.0, 1.0)
    x = torch.nan_to_num(x, nan=0.0)
    return torch.searchsorted(qmap.midpoints.to(x.device), x.contiguous(), side="left")


def table_lookup(xn: torch.Tensor, qmap: QuantMap) -> torch.Tensor:
    """The same codes as :func:`quantize_normalized`, computed the way the fused kernels
    do (bit tricks, one table load, one integer comparison); used to test the table."""
    x = torch.nan_to_num(xn.to(torch.float32).clamp(-1.0, 1.0), nan=0.0).contiguous()
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    neg = (u >> 31).bool()
    mag = u & 0x7FFFFFFF
    shift = 23 - qmap.mant_bits
    j = ((mag >> shift) - (qmap.emin << qmap.mant_bits)).clamp(0, qmap.cells - 1)
    x_off = (mag - ((j + (qmap.emin << qmap.mant_bits)) << shift)).clamp(min=0)
    e = qmap.table.to(torch.int64)[j + neg.to(torch.int64) * qmap.cells] & 0xFFFFFFFF
    code, t_off = e >> 24, e & 0xFFFFFF
    up = torch.where(neg, x_off < t_off, x_off > t_off)
    return code + up.to(torch.int64)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16 (even count) to bytes, element 2i in the low nibble."""
    q = q.reshape(-1, 2).to(torch.uint8)
    return q[:, 0] | (q[:, 1] << 4)


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    return torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)


# --------------------------------------------------------------------------- block-wise


def inv_scale(absmax: torch.Tensor) -> torch.Tensor:
    """``1 / absmax`` in fp32, 0 where absmax is 0 (the kernels compute the same)."""
    one = torch.ones((), dtype=torch.float32)
    safe = torch.where(absmax > 0, absmax, one)
    return torch.where(absmax > 0, one / safe, torch.zeros((), dtype=torch.float32))


def quantize_blocks(xb: torch.Tensor, qmap: QuantMap, valid: torch.Tensor | None = None):
    """Quantize rows of a [nb, block] fp32 tensor. ``valid`` (bool, same shape) marks
    real elements (padding and non-finite elements are left out of absmax and get the
    zero code). Returns ``(codes uint8 [nb, block] unpacked, absmax fp32 [nb])``."""
    finite = torch.isfinite(xb)
    keep = finite if valid is None else (finite & valid)
    xk = torch.where(keep, xb, torch.zeros((), dtype=torch.float32))
    absmax = xk.abs().amax(dim=1) if xb.shape[1] else torch.zeros(xb.shape[0])
    inv = inv_scale(absmax)
    q = quantize_normalized(xk * inv[:, None], qmap)
    q = torch.where(keep, q, torch.full((), qmap.zero_code, dtype=q.dtype))
    return q.to(torch.uint8), absmax


def dequantize_blocks(q: torch.Tensor, absmax: torch.Tensor, qmap: QuantMap) -> torch.Tensor:
    """[nb, block] uint8 codes (unpacked) to fp32 values."""
    return qmap.values[q.to(torch.int64)] * absmax[:, None]


def quantize_blockwise(x: torch.Tensor, qmap: QuantMap, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize any float tensor (flattened) to ``(codes, absmax)``; codes are packed two
    a byte at 4 bits. Non-finite elements get the zero code (see module docstring)."""
    if block <= 0 or block % 2:
        raise ValueError(f"block must be a positive even number, got {block}")
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = -(-n // block)
    pad = nb * block - n
    valid = None
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
        valid = torch.ones(nb * block, dtype=torch.bool)
        valid[n:] = False
        valid = valid.view(nb, block)
    q, absmax = quantize_blocks(flat.view(nb, block), qmap, valid)
    q = q.reshape(-1)
    return (pack_nibbles(q) if qmap.bits == 4 else q), absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, qmap: QuantMap, block: int, n: int
) -> torch.Tensor:
    """The flat fp32 tensor of ``n`` elements that ``(codes, absmax)`` stand for."""
    q = unpack_nibbles(codes) if qmap.bits == 4 else codes
    nb = absmax.numel()
    return dequantize_blocks(q.view(nb, block), absmax, qmap).reshape(-1)[:n]


def nonfinite_index(x: torch.Tensor) -> torch.Tensor:
    """Flat int64 indices of the non-finite elements of ``x``."""
    return torch.nonzero(~torch.isfinite(x.reshape(-1))).reshape(-1)
