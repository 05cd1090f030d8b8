"""Bytes as people read them: one formatter for every table, plot, error and JSON.

memfit reports decimal units everywhere (``MB`` = 10**6 bytes, ``GB`` = 10**9), the
units its benchmark figures use. :data:`MB` is the divisor for a column headed "MB";
:func:`format_bytes` picks the unit itself.
"""

from __future__ import annotations

KB = 1000
MB = 1000**2
GB = 1000**3

__all__ = ["GB", "KB", "MB", "format_bytes"]


def format_bytes(n: float | int | None) -> str:
    """Human-readable bytes in decimal units (``378 MB``, ``2.7 MB``, ``1.23 GB``);
    ``"-"`` for None."""
    if n is None:
        return "-"
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= 10 * GB:
        return f"{sign}{n / GB:.1f} GB"
    if n >= GB:
        return f"{sign}{n / GB:.2f} GB"
    if n >= 10 * MB:
        return f"{sign}{n / MB:,.0f} MB"
    if n >= MB:
        return f"{sign}{n / MB:.1f} MB"
    if n >= KB:
        return f"{sign}{n / KB:.0f} kB"
    return f"{sign}{n:.0f} B"
