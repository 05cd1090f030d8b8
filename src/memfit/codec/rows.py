"""Row slices of an encoding: the encoding of ``x[rows]`` for a 2-D ``x`` whose rows
are whole blocks, taken from the codes of ``x`` without decoding the other rows.

An embedding lookup needs a few rows of a large table; ``decode(select_rows(enc,
rows))`` gives exactly ``decode(enc)[rows]`` at the cost of the rows asked for.
"""

from __future__ import annotations

import dataclasses

import torch

from .blockwise import Encoded
from .formats import IntFormat
from .nf4 import NF4Encoded, block_absmax


def can_select_rows(enc: Encoded | NF4Encoded) -> bool:
    """Whether :func:`select_rows` applies: a 2-D integer-coded or NF4 encoding whose
    row length is a whole number of blocks, with no non-finite values stored apart."""
    fmt = enc.format
    if len(enc.shape) != 2 or enc.nonfinite_index is not None or not isinstance(enc, (Encoded, NF4Encoded)):
        return False
    if isinstance(enc, Encoded) and not isinstance(fmt, IntFormat):
        return False
    return enc.shape[1] > 0 and enc.shape[1] % fmt.block_size == 0


def select_rows(enc: Encoded | NF4Encoded, rows: torch.Tensor) -> Encoded | NF4Encoded:
    """The encoding of ``x[rows]`` (``rows``: 1-D int64 indices) where ``enc`` encodes
    ``x``; raises ``ValueError`` when :func:`can_select_rows` is false. NF4 scales come
    back as plain fp32 absmaxes (the double quantization is undone once, for the
    selected blocks only)."""
    if not can_select_rows(enc):
        raise ValueError(f"cannot take rows of a {type(enc.format).__name__} encoding of shape {tuple(enc.shape)}")
    n_rows, width = enc.shape
    per_row = width // enc.format.block_size

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.view(n_rows, -1).index_select(0, rows).reshape(-1)

    shape = torch.Size([rows.numel(), width])
    if isinstance(enc, NF4Encoded):
        absmax = block_absmax(enc).view(n_rows, per_row).index_select(0, rows).reshape(-1)
        fmt = dataclasses.replace(enc.format, double_quant=False)
        return NF4Encoded(fmt, shape, enc.dtype, codes=take(enc.codes), absmax=absmax)
    return Encoded(enc.format, shape, enc.dtype, codes=take(enc.codes), scale=take(enc.scale),
                   lo=None if enc.lo is None else take(enc.lo))
