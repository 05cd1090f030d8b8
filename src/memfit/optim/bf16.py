"""How memfit's optimizers write an fp32 update into a bf16 (or fp16) parameter.

The update of a low-precision parameter is computed in fp32; this module owns what
happens next, chosen per param group with ``bf16=``:

* ``"nearest"`` (default, what ``torch.optim`` does): round to nearest. An update
  smaller than half a bf16 ulp (bf16 keeps 8 significant bits: 2**-8 relative) is lost,
  which is why long pure-bf16 runs stall once the learning rate is small.
* ``"stochastic"`` (torchao's ``bf16_stochastic_round=True``): round to one of the two
  neighbouring bf16 values with probabilities that make the rounding unbiased
  (:func:`stochastic_round_bf16`), so small updates survive on average. No extra
  memory. The random bits come from a generator seeded from ``bf16_seed``, the
  parameter's position in the optimizer, a per-group step counter and the shard index
  (:func:`rounding_seed`): runs are reproducible, a resumed run rounds as the
  uninterrupted one would, and the global RNG is never used. bf16 only: fp16 has a
  different exponent range and subnormals, and is refused.
* ``"master"``: an fp32 master copy of the parameter lives in the optimizer state
  (``state[p]["bf16_master"]``: 4 more bytes per parameter, counted by
  ``state_nbytes()``, saved and loaded exactly by ``state_dict()``); the update is
  applied to it and the parameter is set to its nearest rounding. bf16 and fp16.

fp32 and fp64 parameters ignore the option (they hold their own update exactly).
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch

BF16_MODES = ("nearest", "stochastic", "master")
LOW_PRECISION = (torch.bfloat16, torch.float16)
MASTER_KEY = "bf16_master"
# param-group keys: the mode, the user's seed, and the count of stochastic roundings
# done by the group (saved with the groups, so a resumed run continues the stream)
GROUP_KEYS = ("bf16", "bf16_seed", "bf16_step")

_MASK64 = (1 << 64) - 1
_LOW_BITS = 1 << 16  # fp32 bits below bf16's last mantissa bit
_HIGH_MASK = -(1 << 16)  # int32 0xFFFF0000: keeps sign, exponent and bf16's 7 mantissa bits


def check_mode(mode: object, what: str = "bf16") -> str:
    """``mode`` if it is one of :data:`BF16_MODES`; else TypeError (not a string) or
    ValueError (another string), both naming the modes."""
    accepted = ", ".join(repr(m) for m in BF16_MODES)
    if not isinstance(mode, str):
        raise TypeError(f"{what} must be one of {accepted}; got {mode!r} ({type(mode).__name__})")
    if mode not in BF16_MODES:
        raise ValueError(f"{what} must be one of {accepted}; got {mode!r}")
    return mode


def check_params(mode: str, params: Iterable[torch.Tensor]) -> None:
    """Refuse fp16 parameters under ``"stochastic"`` (ValueError)."""
    if mode != "stochastic":
        return
    for p in params:
        if isinstance(p, torch.Tensor) and p.dtype == torch.float16:
            raise ValueError(
                "bf16='stochastic' rounds to bfloat16 only; a float16 parameter "
                f"(shape {tuple(p.shape)}) needs bf16='master' or 'nearest'"
            )


def is_low_precision(p: torch.Tensor) -> bool:
    return p.dtype in LOW_PRECISION


def uses_fp32_update(mode: str, p: torch.Tensor) -> bool:
    """Whether ``p``'s update is computed in fp32 and written back by this module
    (then its fp32-path state is kept in fp32 too, like the tensor it updates)."""
    return mode != "nearest" and is_low_precision(p)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def rounding_seed(seed: int, index: int, step: int, shard: int = 0) -> int:
    """A 64-bit seed for one stochastic rounding: a hash of the user's ``seed``, the
    parameter's ``index`` in the optimizer, the group's ``step`` counter and the
    ``shard`` (an FSDP2 rank's shard index; replicas of a shard share it, so they round
    alike)."""
    h = _splitmix64(seed & _MASK64)
    for v in (index, step, shard):
        h = _splitmix64(h ^ (v & _MASK64))
    return h


def stochastic_round_bf16(x: torch.Tensor, seed: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (fp32) rounded to bf16 stochastically: to the neighbour above (in
    magnitude) with probability equal to the distance from the one below, in units of
    their gap, so the expected result is ``x`` exactly. Computed on the bit pattern:
    16 uniform random bits are added below bf16's last mantissa bit and the sum is
    truncated. Exact bf16 values, infinities and NaNs are returned unchanged; a value
    above the largest finite bf16 may round to infinity, as in nearest rounding.

    ``seed`` seeds a private ``torch.Generator`` on ``x``'s device (the global RNG is
    untouched); equal seeds give equal results. ``out`` (bf16, ``x``'s shape) receives
    the result when given."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 expects an fp32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    if out is not None and (out.dtype != torch.bfloat16 or out.shape != x.shape):
        raise ValueError(f"out must be a bfloat16 tensor of shape {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed & _MASK64)
    bits = torch.randint(0, _LOW_BITS, x.shape, generator=gen, dtype=torch.int32, device=x.device)
    # on the sign-magnitude pattern a carry out of the low 16 bits moves the magnitude
    # to the next bf16 value, also across binades; only NaN payloads can overflow
    bits.add_(x.view(torch.int32)).bitwise_and_(_HIGH_MASK)
    rounded = bits.view(torch.float32)
    nan = torch.isnan(x)
    if bool(nan.any()):
        rounded = torch.where(nan, x, rounded)
    if out is None:
        return rounded.to(torch.bfloat16)
    return out.copy_(rounded)


def new_master(p_local: torch.Tensor) -> torch.Tensor:
    """The fp32 master of a local parameter tensor: its exact value in fp32."""
    return p_local.detach().to(torch.float32, copy=True).contiguous()


class MasterSync:
    """Notices a parameter changed outside the optimizer (``model.load_state_dict``,
    manual edits) between steps, through the tensor's version counter: its master is
    then re-made from it (with one warning per optimizer) instead of overwriting the
    change. Not saved: after ``load_state_dict`` the loaded masters are trusted."""

    def __init__(self) -> None:
        self._versions: dict[int, int] = {}
        self._warned = False

    def clear(self) -> None:
        self._versions.clear()

    def stale(self, p_local: torch.Tensor, key: torch.Tensor) -> bool:
        seen = self._versions.get(id(key))
        if seen is None or seen == p_local._version:
            return False
        if not self._warned:
            self._warned = True
            warnings.warn(
                "memfit.optim: a bf16 parameter was changed outside the optimizer since its last step; its fp32 "
                "master (bf16='master') was re-made from the parameter's new value",
                RuntimeWarning,
                stacklevel=4,
            )
        return True

    def record(self, p_local: torch.Tensor, key: torch.Tensor) -> None:
        self._versions[id(key)] = p_local._version


def write_back(p_local: torch.Tensor, result: torch.Tensor, mode: str, seed: int) -> None:
    """Store the fp32 ``result`` (shaped or viewable like ``p_local``) into the
    low-precision parameter: stochastically rounded under ``"stochastic"``, rounded to
    nearest otherwise (under ``"master"`` ``result`` is the master itself)."""
    result = result.view(p_local.shape)
    if mode == "stochastic" and p_local.dtype == torch.bfloat16:
        if p_local.is_contiguous():
            stochastic_round_bf16(result, seed, out=p_local)
        else:
            p_local.copy_(stochastic_round_bf16(result, seed))
    else:
        p_local.copy_(result)


def validate_master(master_local: object, p_local: torch.Tensor, what: str) -> torch.Tensor:
    """A loaded master (its local part) as an fp32 copy on ``p_local``'s device, or
    ValueError when it is not a floating-point tensor of the parameter's shape."""
    if not isinstance(master_local, torch.Tensor):
        raise ValueError(f"{what}: {MASTER_KEY!r} must be a tensor, got {type(master_local).__name__}")
    if tuple(master_local.shape) != tuple(p_local.shape) or not master_local.is_floating_point():
        raise ValueError(
            f"{what}: saved {MASTER_KEY!r} is {master_local.dtype} of shape {tuple(master_local.shape)}, the "
            f"parameter has shape {tuple(p_local.shape)}; is this the same model?"
        )
    return master_local.detach().to(device=p_local.device, dtype=torch.float32, copy=True).contiguous()
