"""Fused optimizer steps in Triton (AdamW, SGD with momentum, Lion; 8- and 4-bit
states) for CUDA tensors, and for CPU tensors under Triton's interpreter.

:func:`step` takes exactly the arguments of the C++ ``step`` in ``csrc/step.cpp`` and
does what it does, in one pass per block of ``block`` elements:

1. dequantize the block's states (code book value * absmax),
2. update the parameter and the states in fp32, operation by operation as
   :func:`memfit.optim._qstate.eager_step` (no fused multiply-add, ``div_rn`` and
   ``sqrt_rn``), so the results are bit-identical to it,
3. if a new state element is non-finite, write nothing for the block and set its
   ``redo`` flag (the caller redoes it on the eager path, which keeps such elements
   exactly in a side table); blocks flagged on entry are skipped,
4. else store the parameters, the new absmax and the nearest codes (a binary search
   over the map's midpoints: ties go to the lower code, as
   :func:`memfit.codec.dynamic.quantize_normalized`).
"""

from __future__ import annotations

import weakref

import torch

from ..codec._triton import (
    available,
    block_tile,
    check_device,
    jit_kernel,
    launch_options,
    pack_codes,
    tiling,
    tl,
    triton,
)
from ._qstate import ALGO_ADAMW, ALGO_LION, ALGO_SGD, MAX_BLOCK

__all__ = ["NAME", "available", "step"]

NAME = "triton"

_N_HPARAMS = {ALGO_ADAMW: 9, ALGO_SGD: 7, ALGO_LION: 7}
_N_STATES = {ALGO_ADAMW: 2, ALGO_SGD: 1, ALGO_LION: 1}


# --------------------------------------------------------------------------- device code


@jit_kernel()
def _decode_state(codes_ptr, absmax_ptr, values_ptr, rows, todo, byte_offs, byte_ok, k, BITS: tl.constexpr):
    """fp32 values ([R, J, K]) of one state's codes in a tile of blocks."""
    b = tl.load(codes_ptr + byte_offs, mask=byte_ok, other=0).to(tl.int32)
    q = (b[:, :, None] >> (k[None, None, :] * BITS)) & ((1 << BITS) - 1)
    absmax = tl.load(absmax_ptr + rows, mask=todo, other=0.0)
    return tl.load(values_ptr + q) * absmax[:, None, None]


@jit_kernel()
def _nearest_code(x, mids_ptr, BITS: tl.constexpr):
    """Code of the nearest map value to normalised ``x``: the number of midpoints (2**BITS - 1,
    sorted) strictly below ``x`` clamped to [-1, 1]; NaN counts as 0."""
    x = tl.where(x == x, x, 0.0)  # before the clamp: min/max drop NaN operands on GPUs
    x = tl.minimum(tl.maximum(x, -1.0), 1.0)
    pos = tl.zeros(x.shape, tl.int32)
    for s in tl.static_range(BITS):
        cand = pos + (1 << (BITS - 1 - s))
        pos = tl.where(tl.load(mids_ptr + cand - 1) < x, cand, pos)
    return pos


@jit_kernel()
def _bad_rows(s, real):
    """Per-row flag (int32 [R]): a real element of ``s`` is non-finite."""
    nf = real & ((s != s) | (tl.abs(s) == float("inf")))
    return tl.max(tl.max(nf.to(tl.int32), axis=2), axis=1)


@jit_kernel()
def _encode_state(s, real, commit, codes_ptr, absmax_ptr, mids_ptr, rows, byte_offs, byte_ok, k,
                  BITS: tl.constexpr):
    """Requantize one new state ([R, J, K]; padding counts as 0) into the rows ``commit``."""
    s = tl.where(real & commit[:, None, None], s, 0.0)
    absmax = tl.max(tl.max(tl.abs(s), axis=2), axis=1)
    inv = tl.where(absmax > 0, tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(absmax > 0, absmax, 1.0)), 0.0)
    q = _nearest_code(s * inv[:, None, None], mids_ptr, BITS)
    tl.store(codes_ptr + byte_offs, pack_codes(q, k, BITS).to(tl.uint8), mask=byte_ok & commit[:, None])
    tl.store(absmax_ptr + rows, absmax, mask=commit)


@jit_kernel(do_not_specialize=["n"])
def _step_kernel(
    p_ptr, g_ptr, c0_ptr, c1_ptr, a0_ptr, a1_ptr, v0_ptr, v1_ptr, m0_ptr, m1_ptr, redo_ptr, n, nb,
    h0, h1, h2, h3, h4, h5, h6, h7, h8,
    ALGO: tl.constexpr, BITS: tl.constexpr, PB: tl.constexpr, BLOCK: tl.constexpr,
    SGD_WD: tl.constexpr, SGD_NESTEROV: tl.constexpr, SGD_FIRST: tl.constexpr,
    ROWS: tl.constexpr, BYTES_P2: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < nb
    todo = row_ok & (tl.load(redo_ptr + rows, mask=row_ok, other=1) == 0)
    offs, in_block = block_tile(rows, BLOCK, PB, BYTES_P2)
    real = in_block & todo[:, None, None] & (offs < n)
    j = tl.arange(0, BYTES_P2)
    k = tl.arange(0, PB)
    byte_ok = todo[:, None] & (j[None, :] < BLOCK // PB)
    byte_offs = rows.to(tl.int64)[:, None] * (BLOCK // PB) + j[None, :]
    P = tl.load(p_ptr + offs, mask=real, other=0.0)
    G = tl.load(g_ptr + offs, mask=real, other=0.0)
    if ALGO == 0:  # AdamW: decay, b1, 1-b1, b2, 1-b2, 1/sqrt(bc2), eps, lr/bc1, grad sign
        s0 = _decode_state(c0_ptr, a0_ptr, v0_ptr, rows, todo, byte_offs, byte_ok, k, BITS)
        s1 = _decode_state(c1_ptr, a1_ptr, v1_ptr, rows, todo, byte_offs, byte_ok, k, BITS)
        gi = G * h8
        pi = P * h0
        m = s0 * h1 + gi * h2
        v = s1 * h3 + (gi * gi) * h4
        den = tl.sqrt_rn(v) * h5 + h6
        new_p = pi - tl.div_rn(m, den) * h7
        bad = _bad_rows(m, real) | _bad_rows(v, real)
    elif ALGO == 1:  # SGD: lr, momentum, 1-dampening, weight decay, grad sign
        gi = G * h4
        if SGD_WD:
            gi = gi + P * h3
        if SGD_FIRST:
            m = gi
        else:
            s0 = _decode_state(c0_ptr, a0_ptr, v0_ptr, rows, todo, byte_offs, byte_ok, k, BITS)
            m = s0 * h1 + gi * h2
        if SGD_NESTEROV:
            d = gi + m * h1
        else:
            d = m
        new_p = P - d * h0
        bad = _bad_rows(m, real)
    else:  # Lion: decay, lr, b1, 1-b1, b2, 1-b2, grad sign
        s0 = _decode_state(c0_ptr, a0_ptr, v0_ptr, rows, todo, byte_offs, byte_ok, k, BITS)
        gi = G * h6
        pi = P * h0
        c = s0 * h2 + gi * h3
        sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
        new_p = pi - sign * h1
        m = s0 * h4 + gi * h5
        bad = _bad_rows(m, real)
    commit = todo & (bad == 0)
    tl.store(redo_ptr + rows, tl.full(rows.shape, 1, tl.uint8), mask=todo & (bad != 0))
    tl.store(p_ptr + offs, new_p, mask=real & commit[:, None, None])
    _encode_state(m, real, commit, c0_ptr, a0_ptr, m0_ptr, rows, byte_offs, byte_ok, k, BITS)
    if ALGO == 0:
        _encode_state(v, real, commit, c1_ptr, a1_ptr, m1_ptr, rows, byte_offs, byte_ok, k, BITS)


# --------------------------------------------------------------------------- host API

# Device copies of the (small, immutable) code books and midpoints, one per source tensor.
_device_copies: dict[tuple[int, str], torch.Tensor] = {}


def _on_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    if t.device == dev:
        return t.contiguous()
    key = (id(t), str(dev))
    hit = _device_copies.get(key)
    if hit is None:
        hit = _device_copies[key] = t.to(device=dev).contiguous()
        weakref.finalize(t, _device_copies.pop, key, None)
    return hit


def _check_args(algo, p, g, codes, absmax, values, table, mids, tparams, bits, block, redo, hp) -> int:
    """Validate as the C++ step does; returns the number of blocks."""
    if algo not in _N_STATES:
        raise ValueError(f"algo must be {ALGO_ADAMW} (AdamW), {ALGO_SGD} (SGD) or {ALGO_LION} (Lion), got {algo!r}")
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if not 0 < block <= MAX_BLOCK or block % 2:
        raise ValueError(f"block must be an even number in [2, {MAX_BLOCK}], got {block!r}")
    if p.dtype != torch.float32 or g.dtype != torch.float32:
        raise TypeError(f"p and g must be float32, got {p.dtype} and {g.dtype}")
    if not (p.is_contiguous() and g.is_contiguous()):
        raise ValueError("p and g must be contiguous")
    if g.numel() != p.numel() or g.device != p.device:
        raise ValueError(f"g ({g.numel()} elements on {g.device}) must match p ({p.numel()} on {p.device})")
    ns = _N_STATES[algo]
    lists = {"codes": codes, "absmax": absmax, "values": values, "table": table, "mids": mids}
    if any(len(v) != ns for v in lists.values()) or len(tparams) != 4 * ns:
        sizes = {k: len(v) for k, v in lists.items()} | {"tparams": len(tparams)}
        raise ValueError(f"algorithm {algo} has {ns} state(s) (tparams 4 per state); got list sizes {sizes}")
    if len(hp) != _N_HPARAMS[algo]:
        raise ValueError(f"algorithm {algo} takes {_N_HPARAMS[algo]} hyperparameters, got {len(hp)}")
    nb = -(-p.numel() // block)
    for i in range(ns):
        c, a, v, m = codes[i], absmax[i], values[i], mids[i]
        if c.dtype != torch.uint8 or not c.is_contiguous() or c.numel() != nb * block * bits // 8 or c.device != p.device:
            raise ValueError(f"codes[{i}] must be contiguous uint8 [{nb * block * bits // 8}] on {p.device}")
        if a.dtype != torch.float32 or not a.is_contiguous() or a.numel() != nb or a.device != p.device:
            raise ValueError(f"absmax[{i}] must be contiguous float32 [{nb}] on {p.device}")
        if v.dtype != torch.float32 or v.numel() != 1 << bits:
            raise ValueError(f"values[{i}] must be float32 [{1 << bits}] (the map of a {bits}-bit state)")
        if m.dtype != torch.float32 or m.numel() != (1 << bits) - 1:
            raise ValueError(f"mids[{i}] must be float32 [{(1 << bits) - 1}]")
    if redo.dtype != torch.uint8 or redo.numel() != nb:
        raise ValueError(f"redo must be uint8 [{nb}] (one flag per block)")
    return nb


def step(
    algo: int,
    p: torch.Tensor,
    g: torch.Tensor,
    codes: list[torch.Tensor],
    absmax: list[torch.Tensor],
    values: list[torch.Tensor],
    table: list[torch.Tensor],
    mids: list[torch.Tensor],
    tparams: list[int],
    bits: int,
    block: int,
    redo: torch.Tensor,
    hp: list[float],
) -> None:
    """One quantized optimizer step in place on ``p``, ``codes``, ``absmax`` and ``redo``
    (arguments as the C++ step's; ``table`` and ``tparams`` are checked but unused: the
    kernel searches ``mids``). ``values``, ``mids`` and ``redo`` may be CPU tensors."""
    nb = _check_args(algo, p, g, codes, absmax, values, table, mids, tparams, bits, block, redo, hp)
    check_device(p, "optim step")
    if nb == 0:
        return
    dev = p.device
    vals = [_on_device(v, dev) for v in values]
    mds = [_on_device(m, dev) for m in mids]
    redo_dev = redo if redo.device == dev and redo.is_contiguous() else redo.to(dev).contiguous()
    two = len(codes) == 2
    per_byte = 8 // bits
    rows, bytes_p2 = tiling(block, per_byte, nb)
    h = [float(x) for x in hp] + [0.0] * (9 - len(hp))
    sgd = algo == ALGO_SGD
    _step_kernel[(triton.cdiv(nb, rows),)](
        p, g, codes[0], codes[1 if two else 0], absmax[0], absmax[1 if two else 0],
        vals[0], vals[1 if two else 0], mds[0], mds[1 if two else 0], redo_dev, p.numel(), nb, *h,
        ALGO=int(algo), BITS=int(bits), PB=per_byte, BLOCK=int(block),
        SGD_WD=sgd and float(hp[3]) != 0.0, SGD_NESTEROV=sgd and float(hp[5]) != 0.0,
        SGD_FIRST=sgd and float(hp[6]) != 0.0, ROWS=rows, BYTES_P2=bytes_p2, **launch_options(),
    )
    if redo_dev is not redo:
        redo.copy_(redo_dev)
