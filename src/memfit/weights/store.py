"""One frozen parameter held compressed: its codes live as buffers of the module that
owned it, and :class:`CodedWeight` encodes, decodes and re-encodes them.

The codes are non-persistent buffers so that ``model.to(device)`` moves them and memory
tools that walk a model's buffers count them; they never appear in ``state_dict()``
(see :mod:`memfit.weights.state`, which puts the decoded values there instead).
Floating-point pieces (scales, offsets) are stored bit-cast to integers of the same
width, so that ``model.to(dtype)`` or ``model.half()`` cannot round them.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch
from torch import nn

from .. import codec
from ..codec import Encoded, IntFormat
from ..codec.formats import NF4Format
from ..codec.nf4 import NF4Encoded, decode_nf4, encode_nf4
from ..codec.rows import can_select_rows, select_rows

WeightFormat = Union[IntFormat, NF4Format]
_Coded = Union[Encoded, NF4Encoded]

# Format names as users pass them (``bits=``), and the formats they stand for. Weights
# are encoded once and read at every step, so rounding is to nearest (stochastic
# rounding only pays off for values re-encoded many times, like activations).
FORMATS: dict[object, WeightFormat] = {
    8: IntFormat(bits=8, block_size=256, rounding="nearest"),
    4: IntFormat(bits=4, block_size=64, rounding="nearest"),
    "nf4": NF4Format(),
}

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def resolve_format(bits: object) -> WeightFormat:
    """The format ``bits`` names: ``8``, ``4``, ``"nf4"``, or an :class:`IntFormat` /
    :class:`NF4Format` instance. Another int or string raises ``ValueError``, another
    type ``TypeError``; both list the known formats."""
    if isinstance(bits, (IntFormat, NF4Format)):
        return bits
    known = (", ".join(repr(k) for k in FORMATS)
             + ", or a memfit.codec.IntFormat / memfit.codec.formats.NF4Format instance")
    if isinstance(bits, bool) or not isinstance(bits, (int, str)):
        raise TypeError(f"bits must be a weight format; got {bits!r} ({type(bits).__name__}); known: {known}")
    key = bits.lower() if isinstance(bits, str) else bits
    if key not in FORMATS:
        raise ValueError(f"unknown weight format bits={bits!r}; known: {known}")
    return FORMATS[key]


def format_name(fmt: WeightFormat) -> str:
    """A short label: ``nf4``, ``int8``, ``int4`` (with the block size when it is not
    the default one)."""
    for key, known in FORMATS.items():
        if fmt == known:
            return key if isinstance(key, str) else f"int{key}"
    if isinstance(fmt, NF4Format):
        return f"nf4/{fmt.block_size}" + ("" if fmt.double_quant else " (no double quant)")
    return f"int{fmt.bits}/{fmt.block_size}"


def encode_weight(value: torch.Tensor, fmt: WeightFormat) -> _Coded:
    """Encode a floating-point tensor in ``fmt`` (the codec's encoders)."""
    with torch.no_grad():
        if isinstance(fmt, NF4Format):
            return encode_nf4(value, fmt)
        return codec.encode(value, fmt)


def decode_weight(enc: _Coded) -> torch.Tensor:
    if isinstance(enc, NF4Encoded):
        return decode_nf4(enc)
    return codec.decode(enc)


class CodedWeight:
    """Parameter ``name`` of ``owner``, stored in ``fmt``.

    ``decode()`` returns a fresh tensor with the parameter's shape and dtype (it does
    not require grad). ``load_(value)`` re-encodes new values and bumps ``version``, so
    a backward recorded before the change can tell (see :mod:`memfit.weights.bind`).
    """

    def __init__(self, owner: nn.Module, name: str, value: torch.Tensor, fmt: WeightFormat):
        self.owner = owner
        self.name = name
        self.format = fmt
        self.shape = value.shape
        self.dtype = value.dtype
        self.bytes_before = value.numel() * value.element_size()
        self.version = 0
        self._kind: type = NF4Encoded if isinstance(fmt, NF4Format) else Encoded
        self._fields: dict[str, torch.dtype] = {}
        self._store(encode_weight(value, fmt))

    # -- buffers ----------------------------------------------------------------

    def _buffer_name(self, field: str) -> str:
        return f"{self.name}_{field}"

    def _store(self, enc: _Coded) -> None:
        self.drop()
        for f in dataclasses.fields(enc):
            t = getattr(enc, f.name)
            if not isinstance(t, torch.Tensor) or f.name == "raw":
                continue
            buffer = self._buffer_name(f.name)
            if hasattr(self.owner, buffer):
                raise ValueError(f"cannot store the codes of {self.name!r}: {type(self.owner).__name__} "
                                 f"already has an attribute {buffer!r}")
            stored = t.view(_INT_OF_WIDTH[t.element_size()]) if t.is_floating_point() else t
            self.owner.register_buffer(buffer, stored, persistent=False)
            self._fields[f.name] = t.dtype

    def drop(self) -> None:
        """Remove the code buffers from the owner module."""
        for field in self._fields:
            self.owner._buffers.pop(self._buffer_name(field), None)
        self._fields = {}

    def encoded(self) -> _Coded:
        """The codes as a codec object (views of the owner's buffers)."""
        parts = {f: self.owner._buffers[self._buffer_name(f)].view(dt) for f, dt in self._fields.items()}
        return self._kind(format=self.format, shape=self.shape, dtype=self.dtype, **parts)

    # -- values -----------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held for this parameter (codes, scales, offsets)."""
        return self.encoded().nbytes

    @property
    def device(self) -> torch.device:
        return self.owner._buffers[self._buffer_name("codes")].device

    def decode(self) -> torch.Tensor:
        with torch.no_grad():
            return decode_weight(self.encoded())

    def decode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``decode()[rows]`` for a 2-D parameter, decoding only those rows when each
        row is whole blocks (see :mod:`memfit.codec.rows`)."""
        with torch.no_grad():
            enc = self.encoded()
            if can_select_rows(enc):
                return decode_weight(select_rows(enc, rows))
            return decode_weight(enc).index_select(0, rows)

    def load_(self, value: torch.Tensor) -> None:
        """Re-encode ``value`` (same shape; cast to the stored dtype and device)."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{self.name}: expected a tensor, got {type(value).__name__}")
        if value.shape != self.shape:
            raise ValueError(f"size mismatch for {self.name}: copying a param with shape {tuple(value.shape)}, "
                             f"the shape in current model is {tuple(self.shape)}")
        if value.is_complex():
            raise TypeError(f"{self.name}: cannot load a {value.dtype} tensor into a {self.dtype} weight")
        value = value.detach().to(device=self.device, dtype=self.dtype)
        self._store(encode_weight(value, self.format))
        self.version += 1
