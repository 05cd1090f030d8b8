"""Reference kernels in plain PyTorch: always available, always correct, any device.

The fused CPU kernels in ``csrc/`` compute exactly the same arithmetic (fp32, no
fused multiply-add), so for round-to-nearest both give identical codes; the tests
hold them to that.
"""

from __future__ import annotations

import torch

_SHIFTS = {4: (0, 4), 2: (0, 2, 4, 6)}


def block_min_max(xb: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-block (min, max) over the finite elements of ``xb`` (shape ``[nb, B]``, fp32,
    of which only the first ``n`` flattened elements are real) and a per-block flag
    saying whether the block held a non-finite element."""
    nb, block = xb.shape
    finite = torch.isfinite(xb)
    pad = nb * block - n
    nonfinite_block = ~finite.all(dim=1)  # the zero padding is finite
    if pad or bool(nonfinite_block.any()):
        valid = finite
        if pad:
            valid[-1, block - pad :] = False
        lo = torch.where(valid, xb, float("inf")).amin(dim=1)
        hi = torch.where(valid, xb, float("-inf")).amax(dim=1)
        empty = ~valid.any(dim=1)
        lo = lo.masked_fill(empty, 0.0)
        hi = hi.masked_fill(empty, 0.0)
    else:
        lo, hi = xb.aminmax(dim=1)
    return lo, hi, nonfinite_block


def quantize_int(
    x: torch.Tensor, bits: int, block: int, symmetric: bool, stochastic: bool, seed: int,
    col_inv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Quantize a contiguous 1-D float tensor. Returns ``(codes, scale, lo, nonfinite_block)``;
    ``lo`` is None for the symmetric layout. Non-finite elements get code 0.

    ``col_inv`` (fp32, ``[C]``): the tensor is rows of ``C`` channels, each multiplied
    by its factor (in fp32) before it is quantized."""
    n = x.numel()
    nb = -(-n // block)
    xf = x.to(torch.float32)
    if col_inv is not None:
        xf = (xf.view(-1, col_inv.numel()) * col_inv).view(-1)
    if nb * block != n:
        xf = torch.nn.functional.pad(xf, (0, nb * block - n))
    xb = xf.view(nb, block)
    lo, hi, nonfinite_block = block_min_max(xb, n)
    if symmetric:
        mid = (1 << (bits - 1)) - 1
        scale = torch.maximum(lo.abs(), hi.abs()) / mid
    else:
        scale = (hi - lo) / ((1 << bits) - 1)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    if symmetric:
        v = xb * inv[:, None] + float(mid)
    else:
        v = (xb - lo[:, None]) * inv[:, None]
    if stochastic:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        v = v + torch.rand(v.shape, generator=gen, device=x.device, dtype=torch.float32)
    else:
        v = v + 0.5
    top = (2 * mid) if symmetric else ((1 << bits) - 1)
    q = v.floor_().clamp_(0, top)
    if bool(nonfinite_block.any()):
        q = q.nan_to_num_(0.0, 0.0, 0.0)
    q = q.to(torch.uint8)
    codes = _pack_codes(q, bits)
    return codes, scale, (None if symmetric else lo), nonfinite_block


def _pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return q.reshape(-1)
    per_byte = 8 // bits
    q = q.reshape(-1, per_byte)
    out = q[:, 0].clone()
    for i, shift in enumerate(_SHIFTS[bits][1:], start=1):
        out |= q[:, i] << shift
    return out


def _unpack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes
    mask = (1 << bits) - 1
    parts = [(codes >> shift) & mask for shift in _SHIFTS[bits]]
    return torch.stack(parts, dim=1).reshape(-1)


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
    """The ``n`` values ``codes`` stand for, as ``out_dtype``; with ``col_scale`` (fp32,
    ``[C]``) each channel of the rows of ``C`` is multiplied back, in fp32, first."""
    nb = scale.numel()
    q = _unpack_codes(codes, bits).view(nb, block).to(torch.float32)
    if lo is None:
        mid = float((1 << (bits - 1)) - 1)
        x = (q - mid) * scale[:, None]
    else:
        x = lo[:, None] + q * scale[:, None]
    x = x.reshape(-1)[:n]
    if col_scale is not None:
        x = (x.view(-1, col_scale.numel()) * col_scale).view(-1)
    return x.to(out_dtype)


FP8_MAX = 448.0


def quantize_fp8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.numel()
    nb = -(-n // block)
    xf = x.to(torch.float32)
    if nb * block != n:
        xf = torch.nn.functional.pad(xf, (0, nb * block - n))
    xb = xf.view(nb, block)
    lo, hi, nonfinite_block = block_min_max(xb, n)
    scale = torch.maximum(lo.abs(), hi.abs()) / FP8_MAX
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    v = (xb * inv[:, None]).clamp_(-FP8_MAX, FP8_MAX)
    if bool(nonfinite_block.any()):
        v = v.nan_to_num_(0.0, 0.0, 0.0)
    codes = v.to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1)
    return codes, scale, nonfinite_block


def dequantize_fp8(
    codes: torch.Tensor, scale: torch.Tensor, block: int, n: int, out_dtype: torch.dtype
) -> torch.Tensor:
    nb = scale.numel()
    v = codes.view(torch.float8_e4m3fn).view(nb, block).to(torch.float32)
    return (v * scale[:, None]).reshape(-1)[:n].to(out_dtype)


_BIT_WEIGHTS = {}


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool/uint8 {0,1} tensor into bytes, element ``8*i + j`` in bit ``j``."""
    n = x.numel()
    nbytes = -(-n // 8)
    b = x.to(torch.uint8)
    if nbytes * 8 != n:
        b = torch.nn.functional.pad(b, (0, nbytes * 8 - n))
    b = b.view(nbytes, 8)
    out = b[:, 0].clone()
    for j in range(1, 8):
        out |= b[:, j] << j
    return out


def unpack_bits(codes: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
    bits = (codes[:, None] >> shifts) & 1
    return bits.reshape(-1)[:n].to(torch.bool)


def channel_absmax(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Largest ``|x|`` of each column of ``x`` read as row-major ``[-1, channels]``, in
    fp32. NaNs are ignored (a column of NaNs only gives 0); infinities count."""
    rows = x.reshape(-1, channels)
    amax, amin = rows.amax(dim=0), rows.amin(dim=0)  # two reductions, no |x| copy
    if bool(torch.isnan(amax).any() | torch.isnan(amin).any()):
        rows = rows.nan_to_num(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        amax, amin = rows.amax(dim=0), rows.amin(dim=0)
    return torch.maximum(amax.abs(), amin.abs()).to(torch.float32)
