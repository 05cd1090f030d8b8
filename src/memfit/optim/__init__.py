"""memfit.optim: optimizers whose state is stored block-wise quantized (8 or 4 bits).

This package owns :class:`AdamW`, :class:`SGD` (momentum) and :class:`Lion`, drop-in
``torch.optim.Optimizer`` subclasses (param groups, LR schedulers, ``zero_grad``,
gradient clipping and accumulation behave as with torch's own), and
:func:`keep_fp32`, which marks parameters whose state must stay fp32.

* ``state_bits=8 | 4 | 32`` per param group. States are quantized in blocks (256
  elements at 8 bits, 128 at 4) with one fp32 absmax per block and round-to-nearest
  onto code books from :mod:`memfit.codec.dynamic`: the signed dynamic map for first
  moments/momentum; for AdamW's second moment the unsigned dynamic map at 8 bits and
  the linear map *without a zero code* at 4 bits (no zero-point problem).
* fp32 state for parameters under ``min_quantized_numel`` (4096) elements, counted
  over the whole tensor (an FSDP2 DTensor's global size, never its shard), for complex
  parameters, and for those marked with :func:`keep_fp32`.
* On CPU one fused C++/OpenMP pass per block dequantizes, updates and requantizes
  (``csrc/step.cpp``, built once per environment); ``MEMFIT_KERNELS=eager`` (or a
  failed build, with a warning) selects the pure-PyTorch path, which gives identical
  results. :func:`backend_name` says which runs for a device; :mod:`memfit._backends`
  chooses, as for the codec.
* Non-finite gradients give the offending elements torch's outcome; their state is
  kept exactly in a per-parameter side table, so the rest of the block is untouched.
* ``state_dict()``/``load_state_dict()`` round-trip exactly and only hold tensors,
  numbers, strings, lists and dicts (``torch.load(weights_only=True)`` works); a torch
  ``AdamW``/``SGD`` state dict can be loaded (it is quantized), and
  ``to_torch_state_dict()`` exports plain fp32 state torch's optimizer accepts.
  A state dict for a different model (group sizes, shapes) is refused.
* DDP and FSDP2 (``fully_shard``; each rank quantizes its own shard) work as with
  torch's optimizers. For DTensor parameters ``state_dict()`` holds quantized state as
  DTensors (and per-shard side tables), so ``torch.distributed.checkpoint`` saves and
  loads it, at the same sharding; see ``docs/distributed.md``.
* bf16 parameters: ``bf16="nearest" | "stochastic" | "master"`` per param group says how
  the fp32 update is written into them (round to nearest as torch, unbiased stochastic
  rounding, or an fp32 master copy in the state); see :mod:`memfit.optim.bf16` and
  :func:`stochastic_round_bf16`.
"""

from ._base import QuantizedOptimizer, keep_fp32
from ._kernels import backend_name
from .adamw import AdamW
from .bf16 import stochastic_round_bf16
from .in_backward import InBackwardOptimizer
from .lion import Lion
from .sgd import SGD

__all__ = [
    "SGD",
    "AdamW",
    "InBackwardOptimizer",
    "Lion",
    "QuantizedOptimizer",
    "backend_name",
    "keep_fp32",
    "stochastic_round_bf16",
]
