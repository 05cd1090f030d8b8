"""The storage formats the codec can produce, as small frozen value objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from .._validate import check_bits

Rounding = Literal["stochastic", "nearest"]


def _check_block_size(block_size: int) -> None:
    # Blocks must fill whole bytes at every bit width (2-bit packs four codes a byte)
    # and whole bytes in the 1-bit mask layout, hence the multiple of 8.
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise ValueError(f"block_size must be an int, got {block_size!r}")
    if block_size < 8 or block_size % 8:
        raise ValueError(f"block_size must be a positive multiple of 8, got {block_size}")


@dataclass(frozen=True)
class IntFormat:
    """Block-wise integer quantization to ``bits`` bits per element.

    Each block of ``block_size`` consecutive elements (in the flattened tensor) stores
    one fp32 ``scale`` and, unless ``symmetric``, one fp32 offset (the block minimum):

    * affine (default): ``x ~= lo + q * scale`` with ``q`` in ``[0, 2**bits - 1]``,
      ``lo = min(block)``, ``scale = (max - min) / (2**bits - 1)``. Every code is used
      whatever the sign of the data, which matters most at 2 bits and for the
      non-negative outputs of ReLU/GELU/softmax.
    * symmetric: ``x ~= (q - mid) * scale`` with ``scale = absmax / mid``,
      ``mid = 2**(bits-1) - 1``; one code fewer, no offset stored.

    ``rounding="stochastic"`` (unbiased: ``E[decode(encode(x))] == x``) is the default
    for activations; ``"nearest"`` halves the worst-case error but is biased.
    """

    bits: int = 8
    block_size: int = 256
    rounding: Rounding = "stochastic"
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits, (8, 4, 2), name="IntFormat bits")
        _check_block_size(self.block_size)
        if self.rounding not in ("stochastic", "nearest"):
            raise ValueError(f"IntFormat rounding must be 'stochastic' or 'nearest', got {self.rounding!r}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"IntFormat symmetric must be a bool, got {self.symmetric!r}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1 if not self.symmetric else 2 * ((1 << (self.bits - 1)) - 1)

    def error_bound(self, block_range: float) -> float:
        """Largest possible |x - decode(encode(x))| in a block whose finite values span
        ``block_range`` (max - min for affine, 2 * absmax for symmetric)."""
        step = block_range / self.levels if self.levels else 0.0
        return step if self.rounding == "stochastic" else step / 2


@dataclass(frozen=True)
class FP8Format:
    """FP8 e4m3 codes with one fp32 scale per block (``scale = absmax / 448``), as COAT.

    Rounding is to nearest (the hardware cast); the relative error per element is at
    most 2**-4 for values within the block's normal range.
    """

    block_size: int = 256

    def __post_init__(self) -> None:
        _check_block_size(self.block_size)

    bits = 8
    rounding = "nearest"


@dataclass(frozen=True)
class BitMaskFormat:
    """Lossless 1-bit packing of bool tensors, or of integer/float tensors whose values
    are all 0 or 1 (checked; anything else raises ``ValueError``)."""

    bits = 1


@dataclass(frozen=True)
class RawFormat:
    """The tensor is stored as it is (integer tensors, tiny tensors, unsupported kinds)."""

    bits = None


Format = Union[IntFormat, FP8Format, BitMaskFormat, RawFormat]


from .._validate import check_int  # noqa: E402  (kept beside NF4Format, its only user here)


@dataclass(frozen=True)
class NF4Format:
    """4-bit NormalFloat codes (QLoRA, Dettmers et al. 2023) for weights.

    Each block of ``block_size`` consecutive elements (in the flattened tensor) is
    scaled by its absmax and every element rounded to the nearest of the 16 NF4 values
    (:data:`memfit.codec.nf4.NF4_VALUES`, quantiles of a standard normal with an exact
    zero), two codes a byte. With ``double_quant`` (the default) the per-block fp32
    absmaxes are themselves quantized, as QLoRA does: in blocks of ``absmax_block``
    they are centred on their mean and stored as 8-bit codes on the signed dynamic map
    with one fp32 scale and one fp32 mean per block, about 4.13 bits per parameter at
    the default sizes (4.5 without double quantization). Rounding is to nearest.
    See :mod:`memfit.codec.nf4` for the kernels.
    """

    block_size: int = 64
    double_quant: bool = True
    absmax_block: int = 256

    def __post_init__(self) -> None:
        _check_block_size(self.block_size)
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {self.double_quant!r}")
        check_int(self.absmax_block, name="absmax_block", minimum=1)

    bits = 4
    rounding = "nearest"
