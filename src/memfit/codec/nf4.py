"""NF4 (4-bit NormalFloat, QLoRA) block-wise codes with double-quantized absmaxes.

``encode_nf4(x, NF4Format())`` / ``decode_nf4(enc)``: the flattened tensor is cut into
blocks of ``block_size`` elements (the last one padded); each block is divided by its
absmax (over its finite elements) and every element rounded to the nearest of the 16
values of :data:`NF4_VALUES`, two codes a byte (element ``2i`` in the low nibble).

Double quantization (QLoRA section 3): the fp32 absmaxes, one per block, are cut into
blocks of ``absmax_block``; each of those is centred on its mean (the absmaxes are all
positive, so centring puts them around 0 for a signed map) and quantized to 8-bit
codes on the signed dynamic map (:func:`memfit.codec.dynamic.dynamic_map`, what
bitsandbytes uses for it), keeping one fp32 scale and one fp32 mean per block.

Decoding is a table lookup: a 256-entry table maps each byte to its two code values,
so one gather gives every element, then one multiply by the block's absmax.
Non-finite elements are stored apart (index and value) and come back exactly. Nothing
here knows about modules or autograd.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import dynamic
from .blockwise import is_fake, tensor_nbytes
from .formats import NF4Format

__all__ = ["NF4Encoded", "NF4_VALUES", "decode_nf4", "encode_nf4", "nf4_map"]

# The NF4 code book of QLoRA / bitsandbytes: 8 positive and 7 negative quantiles of a
# standard normal (so that 0 is exactly representable), divided by the largest. Kept
# literal so codes never depend on a platform's inverse-normal function; the tests
# rebuild it from the quantiles.
NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230850220032, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_ABSMAX_MAP = "dynamic8_signed"
_pair_tables: dict[torch.device, torch.Tensor] = {}
_CHUNK = 1 << 18  # elements decoded per step: the fp32 scratch (1 MiB) stays in cache


@functools.lru_cache(maxsize=None)
def nf4_map() -> dynamic.QuantMap:
    """The NF4 code book as a :class:`~memfit.codec.dynamic.QuantMap` (cached)."""
    return dynamic.QuantMap.build("nf4", torch.tensor(NF4_VALUES, dtype=torch.float32))


def _pair_table(device: torch.device) -> torch.Tensor:
    """``[256, 2]`` fp32: the values of a byte's low and high nibble."""
    table = _pair_tables.get(device)
    if table is None:
        values = torch.tensor(NF4_VALUES, dtype=torch.float32)
        byte = torch.arange(256)
        table = torch.stack([values[byte & 15], values[byte >> 4]], dim=1).to(device)
        _pair_tables[device] = table
    return table


@dataclass
class NF4Encoded:
    """A tensor in NF4 form. Without double quantization ``absmax`` holds the fp32
    per-block absmaxes; with it, ``absmax_codes`` / ``absmax_scale`` / ``absmax_offset``
    hold them quantized (8-bit codes, fp32 scale and mean per ``absmax_block``)."""

    format: NF4Format
    shape: torch.Size
    dtype: torch.dtype
    codes: torch.Tensor
    absmax: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    nonfinite_index: torch.Tensor | None = None
    nonfinite_value: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually held by this object's tensors."""
        held = (self.codes, self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset,
                self.nonfinite_index, self.nonfinite_value)
        return sum(tensor_nbytes(t) for t in held if t is not None)


def _blocks(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``flat`` (fp32) padded with zeros to whole blocks, as ``[nb, block]``, and the
    mask of real elements (None when nothing was padded)."""
    n = flat.numel()
    nb = -(-n // block)
    pad = nb * block - n
    if not pad:
        return flat.view(nb, block), None
    valid = torch.ones(nb * block, dtype=torch.bool, device=flat.device)
    valid[n:] = False
    return torch.nn.functional.pad(flat, (0, pad)).view(nb, block), valid.view(nb, block)


def quantize_absmax(absmax: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: ``(codes uint8 [n], scale fp32 [nb], offset fp32 [nb])``
    for the positive fp32 ``absmax`` (``nb = ceil(n / block)``); each block is centred
    on the mean of its real elements, then quantized on the signed dynamic map."""
    ab, valid = _blocks(absmax.to(torch.float32), block)
    if valid is None:
        offset = ab.mean(dim=1)
    else:
        offset = ab.sum(dim=1) / valid.sum(dim=1).to(torch.float32)
    centred = ab - offset[:, None]
    if valid is not None:
        centred = centred.masked_fill(~valid, 0.0)
    q, scale = dynamic.quantize_blocks(centred, dynamic.get_map(_ABSMAX_MAP), valid)
    codes = q.reshape(-1)
    if codes.numel() != absmax.numel():  # a copy, so the padding's storage is not kept
        codes = codes[: absmax.numel()].clone()
    return codes, scale, offset


def dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, block: int) -> torch.Tensor:
    """The fp32 absmaxes that :func:`quantize_absmax` stands for (never negative: a
    magnitude rounded below 0 is clamped to it)."""
    n = codes.numel()
    nb = scale.numel()
    q = torch.nn.functional.pad(codes, (0, nb * block - n)) if nb * block != n else codes
    values = dynamic.get_map(_ABSMAX_MAP).values.to(codes.device)
    decoded = values[q.view(nb, block).to(torch.int64)] * scale[:, None] + offset[:, None]
    return decoded.reshape(-1)[:n].clamp_(min=0.0)


def encode_nf4(x: torch.Tensor, fmt: NF4Format | None = None) -> NF4Encoded:
    """Compress a floating-point tensor ``x`` to NF4 (any shape; the codes are about
    the flattened values). Raises ``TypeError`` for other dtypes."""
    fmt = NF4Format() if fmt is None else fmt
    if not isinstance(fmt, NF4Format):
        raise TypeError(f"fmt must be an NF4Format, got {fmt!r}")
    if not x.is_floating_point():
        raise TypeError(f"NF4 needs a floating-point tensor, got dtype {x.dtype}")
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    if n == 0:
        empty = flat.new_empty(0)
        enc = NF4Encoded(fmt, x.shape, x.dtype, codes=flat.new_empty(0, dtype=torch.uint8))
        if fmt.double_quant:
            enc.absmax_codes, enc.absmax_scale, enc.absmax_offset = empty.to(torch.uint8), empty, empty
        else:
            enc.absmax = empty
        return enc
    xb, valid = _blocks(flat, fmt.block_size)
    q, absmax = dynamic.quantize_blocks(xb, nf4_map(), valid)
    enc = NF4Encoded(fmt, x.shape, x.dtype, codes=dynamic.pack_nibbles(q.reshape(-1)))
    if fmt.double_quant:
        enc.absmax_codes, enc.absmax_scale, enc.absmax_offset = quantize_absmax(absmax, fmt.absmax_block)
    else:
        enc.absmax = absmax
    if is_fake(flat):  # no values to look at (memory estimates), as blockwise.encode
        return enc
    nonfinite = dynamic.nonfinite_index(flat)
    if nonfinite.numel():
        enc.nonfinite_index = nonfinite
        enc.nonfinite_value = x.detach().reshape(-1)[nonfinite].clone()
    return enc


def block_absmax(enc: NF4Encoded) -> torch.Tensor:
    """The fp32 per-block absmaxes decoding uses (dequantized when double-quantized)."""
    if enc.absmax is not None:
        return enc.absmax
    return dequantize_absmax(enc.absmax_codes, enc.absmax_scale, enc.absmax_offset, enc.format.absmax_block)


def decode_nf4(enc: NF4Encoded) -> torch.Tensor:
    """The tensor ``enc`` stands for, contiguous, with its original shape and dtype."""
    n = enc.numel
    if n == 0:
        return torch.empty(enc.shape, dtype=enc.dtype, device=enc.codes.device)
    absmax = block_absmax(enc)
    block = enc.format.block_size
    nb = absmax.numel()
    out = torch.empty(nb * block, dtype=enc.dtype, device=enc.codes.device)
    if is_fake(out):  # sizes only (memory estimates): the chunk loop would be thousands of fake ops
        return out[:n].view(enc.shape)
    # The pair table viewed as int64: one 8-byte gather per code byte gives both of its
    # values. Work goes chunk by chunk through small scratch buffers that stay in cache:
    # whole-tensor temporaries would each be fresh memory, and on CPU the page faults
    # of fresh memory cost more than the arithmetic.
    table = _pair_table(enc.codes.device).view(torch.int64).view(-1)
    per_chunk = max(1, _CHUNK // block)
    direct = enc.dtype == torch.float32
    index = torch.empty(min(nb, per_chunk) * block // 2, dtype=torch.int32, device=enc.codes.device)
    pairs = None if direct else torch.empty_like(index, dtype=torch.int64)
    for b0 in range(0, nb, per_chunk):
        b1 = min(nb, b0 + per_chunk)
        half = (b1 - b0) * block // 2
        idx = index[:half]
        idx.copy_(enc.codes[b0 * block // 2: b1 * block // 2])
        dst = out[b0 * block: b1 * block].view(torch.int64) if direct else pairs[:half]
        torch.index_select(table, 0, idx, out=dst)
        values = dst.view(torch.float32).view(b1 - b0, block).mul_(absmax[b0:b1, None])
        if not direct:
            out[b0 * block: b1 * block].copy_(values.view(-1))
    flat = out[:n]
    if enc.nonfinite_index is not None:
        flat[enc.nonfinite_index] = enc.nonfinite_value
    return flat.view(enc.shape)
