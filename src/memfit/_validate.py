"""Input checks shared by memfit's public API: one function per concept.

Each raises ``TypeError`` for a value of the wrong type and ``ValueError`` for a value
out of range, with a message naming the argument, what it got and what is accepted,
so that equal inputs get equal answers everywhere (``state_bits=8.0`` is refused by
every optimizer in the same words). Memory budgets have their own parser,
:func:`memfit.plan.budget.parse_budget`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch

__all__ = ["check_betas", "check_bits", "check_lr", "check_nonnegative", "check_int"]


def _accepted(values: Sequence[Any]) -> str:
    words = [repr(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bits(value: Any, accepted: Sequence[int], *, name: str = "bits") -> int:
    """``value`` as an int if it is one of ``accepted`` (an ``int``: not a bool, not a
    float such as ``8.0``)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, one of {_accepted(accepted)}; got {value!r} ({type(value).__name__})")
    if int(value) not in accepted:
        raise ValueError(f"{name} must be one of {_accepted(accepted)}, got {value!r}")
    return int(value)


def check_int(value: Any, *, name: str, minimum: int = 1) -> int:
    """``value`` as an int if it is an int (not a bool) of at least ``minimum``."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int of at least {minimum}, got {value!r} ({type(value).__name__})")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an int of at least {minimum}, got {value!r}")
    return int(value)


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def check_nonnegative(value: Any, *, name: str) -> float:
    """A finite number ``>= 0`` (a 1-element tensor counts as its number)."""
    x = _as_float(value, name)
    if not (math.isfinite(x) and x >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return x


def check_lr(value: Any, *, name: str = "lr") -> float:
    """A learning rate: a finite number ``>= 0`` or a 1-element tensor holding one."""
    return check_nonnegative(value, name=name)


def check_betas(value: Any, *, name: str = "betas") -> tuple[float, float]:
    """Two finite numbers in ``[0, 1)`` (at 1 a moment would never change)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a pair of numbers in [0, 1), got {value!r}")
    out = []
    for i, b in enumerate(value):
        x = _as_float(b, f"{name}[{i}]")
        if not (0.0 <= x < 1.0):  # also refuses NaN
            raise ValueError(f"{name}[{i}] must be in [0, 1), got {b!r}")
        out.append(x)
    return out[0], out[1]
