"""Memory budgets (memfit.plan.budget.parse_budget): one spelling per unit, nothing
ambiguous accepted. Decimal units are powers of 1000 (as memfit prints bytes); binary
ones need the ``i`` (GiB); bare K/M/G/T, fractional bytes and absurd sizes are refused
with a message saying what to write instead."""

from __future__ import annotations

import pytest

from memfit.plan.budget import MAX_BYTES, parse_budget


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("6GB", 6 * 10**9),
        ("6gb", 6 * 10**9),
        ("6GiB", 6 * 2**30),
        ("6 gib", 6 * 2**30),
        ("2kB", 2000),
        ("2KiB", 2048),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("0.5kB", 500),
        ("1000", 1000),
        ("1e3", 1000),
        ("1.5e3", 1500),
        (MAX_BYTES, MAX_BYTES),
        (4096.0, 4096),
    ],
)
def test_budget_units(spec, expected):
    assert parse_budget(spec) == expected


@pytest.mark.parametrize("letter, power", [("K", 1), ("M", 2), ("G", 3), ("T", 4), ("g", 3), ("m", 2)])
def test_bare_letters_are_ambiguous_and_the_message_offers_both(letter, power):
    with pytest.raises(ValueError) as info:
        parse_budget(f"6{letter}")
    msg = str(info.value)
    big = letter.upper()
    assert f"'6{letter}'" in msg and "ambiguous" in msg
    assert f"'6{'k' if big == 'K' else big}B'" in msg and f"'6{big}iB'" in msg
    assert f"1000**{power}" in msg and f"1024**{power}" in msg


@pytest.mark.parametrize("spec", ["1.5", "1.5B", "0.5", " 2.25 b"])
def test_fractional_bytes_are_refused(spec):
    with pytest.raises(ValueError, match="fractional|ambiguous"):
        parse_budget(spec)


@pytest.mark.parametrize("spec", [MAX_BYTES + 1, 2**64, float(2**63), "5e18", "4.7e18B", "4EiB"])
def test_budgets_above_2_62_are_refused(spec):
    with pytest.raises(ValueError, match="2\\*\\*62|unknown unit"):
        parse_budget(spec)
