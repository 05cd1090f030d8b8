"""Memory budgets: ``6GiB``, ``"600MB"``, ``"1.5 GiB"``, ``"40%"`` or plain bytes.

* ``int``: bytes (positive; ``bool`` is refused).
* ``str``: a number, optional spaces, a unit. Decimal units ``B kB MB GB TB`` are powers
  of 1000; binary units ``KiB MiB GiB TiB`` and the bare letters ``K M G T`` (as in
  ``docker --memory 6g``) are powers of 1024. Units are case-insensitive except that
  ``b`` alone is refused (bits or bytes?). ``"40%"`` is a fraction of the *plain
  estimated peak*: the peak :func:`memfit.estimate` predicts for the model with every
  activation kept, fp32 optimizer state and the optimizer stepping after backward.

Anything else raises :class:`ValueError` naming the string.
"""

from __future__ import annotations

import math
import re

from .._units import format_bytes

__all__ = ["format_bytes", "is_fraction", "parse_budget"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "T": 1024**4,
}

_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([A-Za-z%]*)\s*$")


def is_fraction(spec: object) -> bool:
    """Whether ``spec`` is a percentage string (relative to the plain estimated peak)."""
    return isinstance(spec, str) and spec.strip().endswith("%")


def parse_budget(spec: object, *, plain_peak_bytes: int | None = None) -> int:
    """``spec`` in bytes. A percentage needs ``plain_peak_bytes`` (what 100% is)."""
    if isinstance(spec, bool):
        raise ValueError(f"invalid memory budget {spec!r}: expected bytes (int) or a string such as '6GiB'")
    if isinstance(spec, int):
        if spec <= 0:
            raise ValueError(f"invalid memory budget {spec!r}: must be positive")
        return spec
    if isinstance(spec, float):
        if not math.isfinite(spec) or spec <= 0 or spec != int(spec):
            raise ValueError(f"invalid memory budget {spec!r}: expected a positive whole number of bytes")
        return int(spec)
    if not isinstance(spec, str):
        raise ValueError(
            f"invalid memory budget {spec!r}: expected bytes (int) or a string such as '6GiB', '600MB', '40%'"
        )
    m = _PATTERN.match(spec)
    if m is None:
        raise ValueError(
            f"invalid memory budget {spec!r}: expected a number and a unit, e.g. '6GiB', '600MB', "
            "'1.5 GiB', or a percentage of the plain estimated peak such as '40%'"
        )
    number, exponent, unit = m.groups()
    try:
        value = float(number) * (10.0 ** int(exponent) if exponent else 1.0)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"invalid memory budget {spec!r}: too large")
    if unit == "%":
        if not 0 < value <= 1000:
            raise ValueError(f"invalid memory budget {spec!r}: a percentage must be in (0, 1000]")
        if plain_peak_bytes is None:
            raise ValueError(
                f"memory budget {spec!r} is a percentage of the plain estimated peak, which is not known here"
            )
        return max(1, int(plain_peak_bytes * value / 100))
    if unit == "b":
        raise ValueError(f"invalid memory budget {spec!r}: 'b' is ambiguous, write 'B' for bytes")
    scale = _UNITS.get(unit.upper())
    if scale is None:
        raise ValueError(
            f"invalid memory budget {spec!r}: unknown unit {unit!r} "
            "(use B, kB, MB, GB, TB, KiB, MiB, GiB, TiB, K, M, G, T or %)"
        )
    if not math.isfinite(value * scale) or value * scale > 2**62:
        raise ValueError(f"invalid memory budget {spec!r}: too large")
    out = int(value * scale)
    if out <= 0:
        raise ValueError(f"invalid memory budget {spec!r}: must be at least one byte")
    return out
