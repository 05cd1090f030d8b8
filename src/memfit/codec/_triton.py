"""Triton kernels of the block-wise codec, for CUDA tensors (and CPU tensors under
Triton's interpreter, ``TRITON_INTERPRET=1`` set before ``triton`` is imported).

The functions have exactly the signatures and results of :mod:`memfit.codec._eager`:
round-to-nearest codes, scales, offsets, flags, fp8 codes, masks and decoded values
are bit-identical to it. Every block is encoded in one pass: a program loads a tile of
whole blocks, takes each block's min/max over its finite elements, quantizes and packs
the codes into bytes itself. The arithmetic is the reference's, in fp32 with no fused
multiply-add (kernels are launched with ``enable_fp_fusion=False``; divisions are
``div_rn``); bf16 widening and the fp8 e4m3 and bf16 rounding are done on the bits, so
the result does not depend on the GPU generation or on the interpreter's casts.

Stochastic rounding adds ``tl.rand(seed, element index)`` (Philox) before the floor:
deterministic for a seed, unbiased, but not the same numbers as the reference's
``torch.rand``.
"""

from __future__ import annotations

import torch

# Without the `triton` extra this import fails: the backend loader takes an ImportError
# to mean "not installed", which needs no warning.
import triton
import triton.language as tl

# A column reduction that PyTorch's own CUDA kernels already do in one pass.
from ._eager import channel_absmax  # noqa: F401

NAME = "triton"

# Elements per program: a tile of whole blocks. The interpreter runs programs one after
# the other in Python, so it gets fewer, larger tiles.
_TILE = 4096
_TILE_INTERPRETED = 1 << 16


def jit_kernel(**options):
    """``triton.jit`` with ``options``."""
    return triton.jit(**options)


def interpreted() -> bool:
    """Whether these kernels run under Triton's interpreter (decided when ``triton`` was
    imported: ``TRITON_INTERPRET=1`` must be set before that)."""
    from triton.runtime.interpreter import InterpretedFunction

    mine = isinstance(_quantize_int_kernel, InterpretedFunction)
    library = isinstance(tl.rand, InterpretedFunction)
    if mine != library:
        raise RuntimeError(
            "memfit.codec._triton: triton was imported before TRITON_INTERPRET changed; "
            "set TRITON_INTERPRET=1 before anything imports triton (or leave it unset)"
        )
    return mine


def available() -> bool:
    """True when these kernels can run here: on a CUDA device, or on CPU tensors under
    the interpreter."""
    try:
        return interpreted() or torch.cuda.is_available()
    except RuntimeError:
        return False


def check_device(t: torch.Tensor, who: str) -> None:
    """Raise ValueError unless the kernels can run on ``t``'s device."""
    dev = t.device.type
    if dev == "cuda" or (dev == "cpu" and interpreted()):  # the interpreter copies CUDA tensors
        return
    raise ValueError(
        f"{who}: tensors on {t.device} cannot run these Triton kernels: they need CUDA tensors, "
        "or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
    )


def tiling(block: int, per_byte: int, nb: int) -> tuple[int, int]:
    """(rows, bytes_p2): blocks per program and the padded byte width of one block, both
    powers of two, for blocks of ``block`` elements packed ``per_byte`` to a byte."""
    bytes_p2 = triton.next_power_of_2(block // per_byte)
    tile = _TILE_INTERPRETED if interpreted() else _TILE
    rows = 1 << (max(1, tile // (bytes_p2 * per_byte)).bit_length() - 1)
    return min(rows, triton.next_power_of_2(max(nb, 1))), bytes_p2


def launch_options() -> dict:
    """Options of every launch: no fused multiply-add, which would change codes."""
    return {"enable_fp_fusion": False, "num_warps": 4}


# --------------------------------------------------------------------------- device code


@jit_kernel()
def block_tile(rows, BLOCK: tl.constexpr, PB: tl.constexpr, BYTES_P2: tl.constexpr):
    """Element offsets ([R, J, K]: row, byte, code within the byte) of a tile of blocks,
    and whether each position lies inside its block."""
    j = tl.arange(0, BYTES_P2)
    k = tl.arange(0, PB)
    col = j[None, :, None] * PB + k[None, None, :]
    offs = rows.to(tl.int64)[:, None, None] * BLOCK + col
    return offs, col < BLOCK


@jit_kernel()
def _finite_mask(x):
    """Elements that are neither NaN nor infinite."""
    return (x == x) & (tl.abs(x) != float("inf"))


@jit_kernel()
def _finite_min_max(x, valid):
    """Per-row (min, max) over the valid elements of an [R, J, K] tile (0, 0 if none)."""
    lo = tl.min(tl.min(tl.where(valid, x, float("inf")), axis=2), axis=1)
    hi = tl.max(tl.max(tl.where(valid, x, float("-inf")), axis=2), axis=1)
    empty = lo > hi
    return tl.where(empty, 0.0, lo), tl.where(empty, 0.0, hi)


@jit_kernel()
def pack_codes(q, k, BITS: tl.constexpr):
    """Codes ([R, J, K] int32, each < 2**BITS) packed into bytes ([R, J] int32)."""
    return tl.sum(q << (k[None, None, :] * BITS), axis=2)


@jit_kernel()
def _load_fp32(ptr, offs, mask, IN_BF16: tl.constexpr):
    """Load float elements as fp32; bf16 arrives as its int16 bits and is widened on the
    bits (exact for subnormals too, which the interpreter's own cast gets wrong)."""
    if IN_BF16:
        b = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        return ((b & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@jit_kernel()
def _store_out(out_ptr, offs, y, mask, OUT_BF16: tl.constexpr):
    """Store fp32 ``y`` cast to the output dtype, bf16 rounded to nearest even on the
    bits (as torch does; the interpreter's own cast truncates)."""
    if OUT_BF16:
        u = y.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(y == y, r, 0x7FC0)
        tl.store(out_ptr + offs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@jit_kernel(do_not_specialize=["n", "seed"])
def _quantize_int_kernel(
    x_ptr, codes_ptr, scale_ptr, lo_ptr, nf_ptr, n, nb, seed,
    BITS: tl.constexpr, PB: tl.constexpr, BLOCK: tl.constexpr, SYMMETRIC: tl.constexpr, MID: tl.constexpr,
    TOP: tl.constexpr, STOCHASTIC: tl.constexpr, WIDE: tl.constexpr, IN_BF16: tl.constexpr, ROWS: tl.constexpr,
    BYTES_P2: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < nb
    offs, in_block = block_tile(rows, BLOCK, PB, BYTES_P2)
    real = in_block & row_ok[:, None, None] & (offs < n)
    x = _load_fp32(x_ptr, offs, real, IN_BF16)
    finite = _finite_mask(x)
    lo, hi = _finite_min_max(x, real & finite)
    nonfinite = tl.max(tl.max((real & ~finite).to(tl.int32), axis=2), axis=1)
    if SYMMETRIC:
        scale = tl.div_rn(tl.maximum(tl.abs(lo), tl.abs(hi)), tl.full(lo.shape, MID, tl.float32))
    else:
        scale = tl.div_rn(hi - lo, tl.full(lo.shape, TOP, tl.float32))
    inv = tl.where(scale > 0, tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), tl.where(scale > 0, scale, 1.0)), 0.0)
    if SYMMETRIC:
        v = x * inv[:, None, None] + MID
    else:
        v = (x - lo[:, None, None]) * inv[:, None, None]
    if STOCHASTIC:
        if WIDE:
            v = v + tl.rand(seed, offs)
        else:
            v = v + tl.rand(seed, offs.to(tl.int32))
    else:
        v = v + 0.5
    v = tl.where(v == v, v, 0.0)  # NaN (non-finite x, or inf * 0) gets code 0
    q = tl.minimum(tl.maximum(tl.floor(v), 0.0), TOP).to(tl.int32)
    j = tl.arange(0, BYTES_P2)
    k = tl.arange(0, PB)
    byte_ok = row_ok[:, None] & (j[None, :] < BLOCK // PB)
    byte_offs = rows.to(tl.int64)[:, None] * (BLOCK // PB) + j[None, :]
    tl.store(codes_ptr + byte_offs, pack_codes(q, k, BITS).to(tl.uint8), mask=byte_ok)
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    if not SYMMETRIC:
        tl.store(lo_ptr + rows, lo, mask=row_ok)
    tl.store(nf_ptr + rows, nonfinite.to(tl.uint8), mask=row_ok)


@jit_kernel(do_not_specialize=["n"])
def _dequantize_int_kernel(
    codes_ptr, scale_ptr, lo_ptr, out_ptr, n, nb,
    BITS: tl.constexpr, PB: tl.constexpr, BLOCK: tl.constexpr, SYMMETRIC: tl.constexpr, MID: tl.constexpr,
    OUT_BF16: tl.constexpr, ROWS: tl.constexpr, BYTES_P2: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < nb
    offs, in_block = block_tile(rows, BLOCK, PB, BYTES_P2)
    j = tl.arange(0, BYTES_P2)
    k = tl.arange(0, PB)
    byte_ok = row_ok[:, None] & (j[None, :] < BLOCK // PB)
    byte_offs = rows.to(tl.int64)[:, None] * (BLOCK // PB) + j[None, :]
    b = tl.load(codes_ptr + byte_offs, mask=byte_ok, other=0).to(tl.int32)
    q = ((b[:, :, None] >> (k[None, None, :] * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None, None]
    if SYMMETRIC:
        y = (q - MID) * scale
    else:
        y = tl.load(lo_ptr + rows, mask=row_ok, other=0.0)[:, None, None] + q * scale
    _store_out(out_ptr, offs, y, in_block & row_ok[:, None, None] & (offs < n), OUT_BF16)


@jit_kernel()
def _fp8_e4m3_bits(v):
    """fp8 e4m3fn codes (int32) of finite fp32 ``v`` within [-448, 448], rounded to
    nearest even, -0 kept (as torch's cast)."""
    u = v.to(tl.uint32, bitcast=True)
    sign = (u >> 31) << 7
    a = tl.abs(v)
    # normal range (a >= 2**-6): round the fp32 mantissa to 3 bits, rebias 127 -> 7
    ua = a.to(tl.uint32, bitcast=True)
    normal = ((ua + 0x7FFFF + ((ua >> 20) & 1)) >> 20) - (120 << 3)
    # subnormals (multiples of 2**-9): a * 2**9 is exact, round it to nearest even
    s = a * 512.0
    f = tl.floor(s)
    r = s - f
    fi = f.to(tl.int32)
    sub = fi + ((r > 0.5) | ((r == 0.5) & ((fi & 1) == 1))).to(tl.int32)
    mag = tl.where(a >= 0.015625, normal.to(tl.int32), sub)
    return mag | sign.to(tl.int32)


@jit_kernel()
def _fp8_e4m3_value(c):
    """fp32 value of fp8 e4m3fn codes (int32 in [0, 256))."""
    e = (c >> 3) & 15
    m = c & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    mag = tl.where(e == 0, sub, normal)
    mag = tl.where((c & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((c & 0x80) != 0, -mag, mag)


@jit_kernel(do_not_specialize=["n"])
def _quantize_fp8_kernel(
    x_ptr, codes_ptr, scale_ptr, nf_ptr, n, nb,
    BLOCK: tl.constexpr, IN_BF16: tl.constexpr, ROWS: tl.constexpr, BYTES_P2: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < nb
    offs, in_block = block_tile(rows, BLOCK, 1, BYTES_P2)
    real = in_block & row_ok[:, None, None] & (offs < n)
    x = _load_fp32(x_ptr, offs, real, IN_BF16)
    finite = _finite_mask(x)
    lo, hi = _finite_min_max(x, real & finite)
    nonfinite = tl.max(tl.max((real & ~finite).to(tl.int32), axis=2), axis=1)
    scale = tl.div_rn(tl.maximum(tl.abs(lo), tl.abs(hi)), 448.0)
    inv = tl.where(scale > 0, tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), tl.where(scale > 0, scale, 1.0)), 0.0)
    v = x * inv[:, None, None]
    v = tl.where(v == v, v, 0.0)  # before the clamp: min/max drop NaN operands on GPUs
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    c = _fp8_e4m3_bits(v)
    tl.store(codes_ptr + offs, c.to(tl.uint8), mask=in_block & row_ok[:, None, None])
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    tl.store(nf_ptr + rows, nonfinite.to(tl.uint8), mask=row_ok)


@jit_kernel(do_not_specialize=["n"])
def _dequantize_fp8_kernel(
    codes_ptr, scale_ptr, out_ptr, n, nb,
    BLOCK: tl.constexpr, OUT_BF16: tl.constexpr, ROWS: tl.constexpr, BYTES_P2: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < nb
    offs, in_block = block_tile(rows, BLOCK, 1, BYTES_P2)
    ok = in_block & row_ok[:, None, None]
    c = tl.load(codes_ptr + offs, mask=ok, other=0).to(tl.int32)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None, None]
    _store_out(out_ptr, offs, _fp8_e4m3_value(c) * scale, ok & (offs < n), OUT_BF16)


@jit_kernel()
def _bit_or(a, b):
    return a | b


@jit_kernel(do_not_specialize=["n"])
def _pack_bits_kernel(x_ptr, out_ptr, n, nbytes, ROWS: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, 8)
    offs = i[:, None] * 8 + j[None, :]
    b = tl.load(x_ptr + offs, mask=offs < n, other=0).to(tl.int32)
    packed = tl.reduce(b << j[None, :], 1, _bit_or)
    tl.store(out_ptr + i, packed.to(tl.uint8), mask=i < nbytes)


@jit_kernel(do_not_specialize=["n"])
def _unpack_bits_kernel(codes_ptr, out_ptr, n, nbytes, ROWS: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, 8)
    c = tl.load(codes_ptr + i, mask=i < nbytes, other=0).to(tl.int32)
    offs = i[:, None] * 8 + j[None, :]
    tl.store(out_ptr + offs, ((c[:, None] >> j[None, :]) & 1).to(tl.uint8), mask=offs < n)


# --------------------------------------------------------------------------- host API


def _float_blocks(x: torch.Tensor, block: int, who: str) -> tuple[torch.Tensor, bool, int]:
    """The flat tensor an encoding kernel reads (bf16 as its int16 bits), whether it is
    bf16, and the number of blocks."""
    if block <= 0 or block % 8:
        raise ValueError(f"{who}: block must be a positive multiple of 8, got {block!r}")
    check_device(x, who)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{who}: x must be float32, float16 or bfloat16, got {x.dtype}")
    flat = x.reshape(-1).contiguous()
    bf16 = flat.dtype is torch.bfloat16
    return (flat.view(torch.int16) if bf16 else flat), bf16, -(-flat.numel() // block)


def _check_codes(codes: torch.Tensor, scale: torch.Tensor, bits: int, block: int, n: int, who: str) -> None:
    check_device(codes, who)
    if codes.dtype != torch.uint8:
        raise TypeError(f"{who}: codes must be uint8, got {codes.dtype}")
    nb = scale.numel()
    if n and not (nb - 1) * block < n <= nb * block:
        raise ValueError(f"{who}: n={n} does not fit {nb} blocks of {block}")
    if codes.numel() != nb * block * bits // 8:
        raise ValueError(f"{who}: codes has {codes.numel()} bytes, {nb} blocks of {block} at {bits} bits need "
                         f"{nb * block * bits // 8}")


def _out_buffer(n: int, out_dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(result tensor, the tensor the kernel writes, whether it writes bf16 bits)."""
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    out = torch.empty(n, dtype=out_dtype, device=device)
    if out_dtype is torch.bfloat16:
        return out, out.view(torch.int16), True
    return out, out, False


def quantize_int(
    x: torch.Tensor, bits: int, block: int, symmetric: bool, stochastic: bool, seed: int,
    col_inv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Quantize a contiguous 1-D float tensor. Returns ``(codes, scale, lo, nonfinite_block)``;
    ``lo`` is None for the symmetric layout (as :func:`memfit.codec._eager.quantize_int`).
    Per-channel factors ``col_inv`` are applied by one PyTorch multiply before the kernel."""
    if bits not in (2, 4, 8):
        raise ValueError(f"quantize_int: bits must be 2, 4 or 8, got {bits!r}")
    if col_inv is not None:
        x = (x.to(torch.float32).view(-1, col_inv.numel()) * col_inv).view(-1)
    x, bf16, nb = _float_blocks(x, block, "quantize_int")
    dev = x.device
    per_byte = 8 // bits
    mid = (1 << (bits - 1)) - 1
    top = 2 * mid if symmetric else (1 << bits) - 1
    codes = torch.empty(nb * block // per_byte, dtype=torch.uint8, device=dev)
    scale = torch.empty(nb, dtype=torch.float32, device=dev)
    lo = None if symmetric else torch.empty(nb, dtype=torch.float32, device=dev)
    nf = torch.zeros(nb, dtype=torch.uint8, device=dev)
    if nb:
        rows, bytes_p2 = tiling(block, per_byte, nb)
        _quantize_int_kernel[(triton.cdiv(nb, rows),)](
            x, codes, scale, scale if lo is None else lo, nf, x.numel(), nb, int(seed),
            BITS=bits, PB=per_byte, BLOCK=block, SYMMETRIC=bool(symmetric), MID=mid, TOP=top,
            STOCHASTIC=bool(stochastic),
            WIDE=nb * block >= 2**31, IN_BF16=bf16, ROWS=rows, BYTES_P2=bytes_p2, **launch_options(),
        )
    return codes, scale, lo, nf.view(torch.bool)


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
    """The ``n`` values that :func:`quantize_int`'s output stands for, as ``out_dtype``
    (per-channel factors ``col_scale`` multiplied back in fp32 by PyTorch, after the kernel)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"dequantize_int: bits must be 2, 4 or 8, got {bits!r}")
    if col_scale is not None:
        x = dequantize_int(codes, scale, lo, bits, block, n, torch.float32)
        return (x.view(-1, col_scale.numel()) * col_scale).view(-1).to(out_dtype)
    _check_codes(codes, scale, bits, block, n, "dequantize_int")
    nb = scale.numel()
    per_byte = 8 // bits
    out, target, bf16 = _out_buffer(n, out_dtype, codes.device)
    if n:
        rows, bytes_p2 = tiling(block, per_byte, nb)
        scale = scale.to(torch.float32).contiguous()
        lo32 = scale if lo is None else lo.to(torch.float32).contiguous()
        _dequantize_int_kernel[(triton.cdiv(nb, rows),)](
            codes.contiguous(), scale, lo32, target, n, nb,
            BITS=bits, PB=per_byte, BLOCK=block, SYMMETRIC=lo is None, MID=(1 << (bits - 1)) - 1, OUT_BF16=bf16,
            ROWS=rows, BYTES_P2=bytes_p2, **launch_options(),
        )
    return out


def quantize_fp8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP8 e4m3 codes (uint8) with one fp32 scale per block (``absmax / 448``) and the
    per-block non-finite flag (as :func:`memfit.codec._eager.quantize_fp8`)."""
    x, bf16, nb = _float_blocks(x, block, "quantize_fp8")
    dev = x.device
    codes = torch.empty(nb * block, dtype=torch.uint8, device=dev)
    scale = torch.empty(nb, dtype=torch.float32, device=dev)
    nf = torch.zeros(nb, dtype=torch.uint8, device=dev)
    if nb:
        rows, bytes_p2 = tiling(block, 1, nb)
        _quantize_fp8_kernel[(triton.cdiv(nb, rows),)](
            x, codes, scale, nf, x.numel(), nb, BLOCK=block, IN_BF16=bf16, ROWS=rows, BYTES_P2=bytes_p2, **launch_options()
        )
    return codes, scale, nf.view(torch.bool)


def dequantize_fp8(
    codes: torch.Tensor, scale: torch.Tensor, block: int, n: int, out_dtype: torch.dtype
) -> torch.Tensor:
    _check_codes(codes, scale, 8, block, n, "dequantize_fp8")
    nb = scale.numel()
    out, target, bf16 = _out_buffer(n, out_dtype, codes.device)
    if n:
        rows, bytes_p2 = tiling(block, 1, nb)
        _dequantize_fp8_kernel[(triton.cdiv(nb, rows),)](
            codes.contiguous(), scale.to(torch.float32).contiguous(), target, n, nb,
            BLOCK=block, OUT_BF16=bf16, ROWS=rows, BYTES_P2=bytes_p2, **launch_options(),
        )
    return out


def _byte_rows(nbytes: int) -> int:
    tile = (_TILE_INTERPRETED if interpreted() else _TILE) // 8
    return min(tile, triton.next_power_of_2(max(nbytes, 1)))


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool/uint8 {0,1} tensor into bytes, element ``8*i + j`` in bit ``j``."""
    check_device(x, "pack_bits")
    if x.dtype not in (torch.bool, torch.uint8, torch.int8):
        raise TypeError(f"pack_bits: x must be bool, uint8 or int8, got {x.dtype}")
    flat = x.reshape(-1).contiguous()
    if flat.dtype is not torch.uint8:
        flat = flat.view(torch.uint8) if flat.dtype is torch.bool else flat.to(torch.uint8)
    n = flat.numel()
    nbytes = -(-n // 8)
    out = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    if nbytes:
        rows = _byte_rows(nbytes)
        _pack_bits_kernel[(triton.cdiv(nbytes, rows),)](flat, out, n, nbytes, ROWS=rows, **launch_options())
    return out


def unpack_bits(codes: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` bools that :func:`pack_bits` packed into ``codes``."""
    check_device(codes, "unpack_bits")
    out = torch.empty(n, dtype=torch.uint8, device=codes.device)
    nbytes = codes.numel()
    if n:
        if n > 8 * nbytes:
            raise ValueError(f"unpack_bits: n={n} exceeds the {8 * nbytes} bits of codes")
        rows = _byte_rows(nbytes)
        _unpack_bits_kernel[(triton.cdiv(nbytes, rows),)](codes.contiguous(), out, n, nbytes, ROWS=rows,
                                                           **launch_options())
    return out.view(torch.bool)
