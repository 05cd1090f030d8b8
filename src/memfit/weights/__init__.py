"""memfit.weights: frozen parameters stored block-wise compressed, decoded on the fly.

``memfit.weights(model, bits="nf4" | 4 | 8)`` (this package is callable) stores the
model's frozen floating-point parameters as NF4 with double-quantized scales (QLoRA) or
integer codes and decodes each one when its module runs; backward through an
``nn.Linear`` decodes the weight again instead of keeping it. Trainable parameters
(LoRA adapters, a head) are untouched. The modules that make it up:

* :mod:`.store`: one compressed parameter (:class:`CodedWeight`), its codes held as
  buffers of its module; the format names.
* :mod:`.bind`: how a module decodes its parameters (:class:`CodedLinear` for
  ``nn.Linear``, :class:`CodedConv` for convolutions, row lookups for embeddings,
  forward hooks for other modules).
* :mod:`.state`: ``state_dict`` holds decoded values, ``load_state_dict`` re-encodes.
* :mod:`.compress`: :func:`compress_weights` and its handle :class:`CompressedWeights`.

The NF4 code book and kernels are in :mod:`memfit.codec.nf4`.
"""

from .bind import CodedConv, CodedLinear
from .compress import CompressedWeights, ModuleWeights, compress_weights
from .store import FORMATS, CodedWeight, resolve_format

__all__ = [
    "FORMATS",
    "CodedConv",
    "CodedLinear",
    "CodedWeight",
    "CompressedWeights",
    "ModuleWeights",
    "compress_weights",
    "resolve_format",
]


from .._callable import make_callable  # noqa: E402

make_callable(__name__, "compress_weights")
