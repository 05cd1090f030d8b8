"""Memory budgets: ``6GiB``, ``"600MB"``, ``"1.5 GiB"``, ``"40%"`` or plain bytes.

* ``int``: bytes, from 1 to ``2**62`` (``bool`` is refused).
* ``str``: a number, optional spaces, a unit. Decimal units ``B kB MB GB TB`` are powers
  of 1000 (as memfit prints bytes, :mod:`memfit._units`); binary units need the ``i``:
  ``KiB MiB GiB TiB``, powers of 1024. Units are case-insensitive. Refused as
  ambiguous: the bare letters ``K M G T`` (``6G``: ``6GB`` or ``6GiB``?), ``b`` alone
  (bits or bytes?), and a fractional number of bytes (``"1.5"``, ``"1.5B"``: bytes are
  whole; a larger unit was probably meant). With a larger unit a fractional amount is
  rounded down to whole bytes (``"1.5 GiB"``). ``"40%"`` is a fraction of the *plain
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
}
MAX_BYTES = 2**62
_BARE = {"K": ("k", 1), "M": ("M", 2), "G": ("G", 3), "T": ("T", 4)}  # refused: 1000- or 1024-based?

_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([A-Za-z%]*)\s*$")


def is_fraction(spec: object) -> bool:
    """Whether ``spec`` is a percentage string (relative to the plain estimated peak)."""
    return isinstance(spec, str) and spec.strip().endswith("%")


def parse_budget(spec: object, *, plain_peak_bytes: int | None = None) -> int:
    """``spec`` in bytes. A percentage needs ``plain_peak_bytes`` (what 100% is)."""
    if isinstance(spec, bool):
        raise ValueError(f"invalid memory budget {spec!r}: expected bytes (int) or a string such as '6GiB'")
    if isinstance(spec, int):
        if not 0 < spec <= MAX_BYTES:
            raise ValueError(f"invalid memory budget {spec!r}: expected a number of bytes from 1 to 2**62")
        return spec
    if isinstance(spec, float):
        if not math.isfinite(spec) or not 0 < spec <= MAX_BYTES or spec != int(spec):
            raise ValueError(f"invalid memory budget {spec!r}: expected a whole number of bytes from 1 to 2**62")
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
    if unit.upper() in _BARE:
        letter, power = _BARE[unit.upper()]
        raise ValueError(
            f"invalid memory budget {spec!r}: {unit!r} is ambiguous; write '{number}{letter}B' "
            f"(decimal, 1000**{power} bytes) or '{number}{unit.upper()}iB' (binary, 1024**{power} bytes)"
        )
    scale = _UNITS.get(unit.upper())
    if scale is None:
        raise ValueError(
            f"invalid memory budget {spec!r}: unknown unit {unit!r} "
            "(use B, kB, MB, GB, TB, KiB, MiB, GiB, TiB or %)"
        )
    if scale == 1 and value != int(value):
        raise ValueError(
            f"invalid memory budget {spec!r}: a fractional number of bytes; bytes are whole "
            "(add a unit: '1.5GB' is 1.5 * 1000**3 bytes, '1.5GiB' 1.5 * 1024**3)"
        )
    if not math.isfinite(value * scale) or value * scale > MAX_BYTES:
        raise ValueError(f"invalid memory budget {spec!r}: too large (more than 2**62 bytes)")
    out = int(value * scale)
    if out <= 0:
        raise ValueError(f"invalid memory budget {spec!r}: must be at least one byte")
    return out
