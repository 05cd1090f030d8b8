"""memfit.codec: block-wise compression of tensors, and nothing about autograd.

Formats: :class:`IntFormat` (8/4/2-bit codes with a per-block scale and offset,
stochastic or nearest rounding), :class:`FP8Format` (e4m3 with a per-block scale),
:class:`BitMaskFormat` (lossless 1 bit per element for masks) and :class:`RawFormat`
(kept as is). :func:`encode` and :func:`decode` convert; :class:`Encoded` holds the
result and knows its size; :func:`predicted_error` says how much rounding error an
integer encoding carries, from its block scales, and :func:`gaussian_error` what a
Gaussian tensor's would be (:mod:`.noise`). Kernels: fused C++ on CPU (built on first use), eager
PyTorch everywhere else (CUDA included) and as the always-correct fallback; a Triton
backend for CUDA is loaded when its module is installed. :func:`backend_name` says
which runs for a device; :mod:`memfit._backends` chooses (``MEMFIT_KERNELS``).
"""

from .blockwise import Encoded, can_encode, channel_absmax, decode, encode, is_plain_dense, tensor_nbytes
from .formats import BitMaskFormat, FP8Format, Format, IntFormat, RawFormat
from .kernels import backend_name
from .noise import gaussian_error, predicted_error

__all__ = [
    "BitMaskFormat",
    "Encoded",
    "FP8Format",
    "Format",
    "IntFormat",
    "RawFormat",
    "backend_name",
    "can_encode",
    "channel_absmax",
    "decode",
    "encode",
    "gaussian_error",
    "is_plain_dense",
    "predicted_error",
    "tensor_nbytes",
]
