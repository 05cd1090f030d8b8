"""The planner's search: an analytic peak model and a cost-driven search over choices.

Nothing here runs a model. :mod:`memfit.plan.planner` measures what the model needs
(one plain :func:`~memfit.plan.estimate`, a fake forward counting what each unit saves,
a :func:`~memfit.plan.profile`, a codec and optimizer throughput probe), builds
:class:`Unit` s and one :class:`OptimizerOption` per optimizer setting, and asks
:func:`search` for the cheapest assignment whose *modelled* peak fits. It then checks
the pick with a real ``estimate(...)`` (:mod:`memfit.plan.verifier`), corrects the
model (:class:`memfit.plan.peak_model.PeakModel`: calibration offsets per optimizer
option and branch, per-unit held bytes) and searches again.

This module is where a new per-unit lever goes: a new entry in :data:`CHOICES`, what
a unit holds under it (:meth:`Unit.stored`), what it costs (:meth:`CostModel.unit_cost`),
which units may use it (:func:`options_for`) and its live bytes in
:func:`unit_profiles`.

The memory model of one training step (steady state: the optimizer state exists),
:func:`unit_profiles`:

* forward, at the end of unit ``u`` (forward order):
  ``P + S + sum(stored[v] for v < u) + forward_working[u]``;
* backward, while unit ``u`` runs (units are visited in reverse and free what they
  held once done): ``P + S + sum(stored[v] for v < u) + working[u] + grads_alive(u)``,
  where ``working[u]`` is what it holds plus what its backward materializes (the
  decoded copy of compressed tensors, ``DECODE_LIVE`` of the plain bytes; the
  recomputed activations of a checkpointed unit; the gradient tensors flowing
  through it, ``GRAD_LIVE`` x its output bytes), and ``grads_alive(u)`` the parameter
  gradients produced so far (units ``>= u``), or with the optimizer stepping inside
  backward only ``u``'s own plus parameters shared across units;
* the optimizer step (not inside backward): ``P + G + S`` (+ temporaries).

The caller adds a calibrated offset to each branch; the predicted peak is the largest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

__all__ = [
    "CHOICES",
    "break_ties",
    "CostModel",
    "OptimizerOption",
    "Solution",
    "Unit",
    "unit_profiles",
    "options_for",
    "search",
]

# One unit's options. ints: compressed at that many bits by the activation engine;
# OFFLOAD: kept exact in pinned host memory (memfit.activations.offload), offered only
# when the cost model has a measured host<->device bandwidth (a CUDA model).
KEEP, RECOMPUTE, OFFLOAD = "keep", "recompute", "offload"
CHOICES: tuple = (KEEP, 8, 4, 2, RECOMPUTE, OFFLOAD)
OFFLOAD_FIXED = 0.002  # per offloaded unit: stream synchronisation, pinned allocations

DECODE_LIVE = 0.5  # share of a compressed unit's plain bytes decoded at once in backward
GRAD_LIVE = 2.0  # activation-gradient tensors alive in a unit's backward, x its output bytes
ENCODE_LIVE = 0.5  # share of a compressed unit's plain bytes alive before encoding (forward)


@dataclass
class Unit:
    """One group of modules the plan decides for as a whole."""

    name: str  # qualified module name; "" is the root (the loss, and any loose code)
    role: str  # "block", "embedding", "norm", "head", "root" or "other"
    order: int  # forward order
    act_bytes: int  # bytes it saves for backward, plain (counting each storage once)
    float_bytes: int  # of which float tensors big enough to be compressed
    mask_bytes: int  # of which bool tensors (packed to 1 bit whenever the engine runs)
    out_bytes: int  # bytes of its output (what flows between units)
    in_bytes: int  # bytes of its input (what a checkpoint keeps)
    grad_bytes: int  # gradients of the parameters it owns
    recompute_seconds: float  # what recomputing it in backward costs (memfit.plan: its forward time)
    can_recompute: bool = False
    is_end: bool = False  # first/last layers and the loss head: kept precise by default

    def stored(self, choice) -> float:
        """Bytes held for backward under ``choice`` (the engine's block-wise codes:
        ``bits/8`` bytes per element plus two fp32 per 256-element block)."""
        if choice == KEEP:
            return float(self.act_bytes)
        if choice == RECOMPUTE:
            return float(self.in_bytes)
        other = self.act_bytes - self.float_bytes - self.mask_bytes
        if choice == OFFLOAD:  # floats and masks go to the host; the rest stays
            return float(max(0, other))
        ratio = choice / 32 + 8 / (4 * 256)  # fp32 in, bits out, per-block (min, scale)
        return self.float_bytes * ratio + self.mask_bytes / 8 + max(0, other)

    def host(self, choice) -> float:
        """Bytes held in host memory under ``choice`` (offload's floats, and masks at
        one bit per element)."""
        return float(self.float_bytes + self.mask_bytes / 8) if choice == OFFLOAD else 0.0

    def working(self, choice) -> float:
        """Bytes alive for this unit while its backward runs."""
        grads = GRAD_LIVE * self.out_bytes
        if choice == KEEP or choice == OFFLOAD:  # offloaded: fetched back in full
            return self.act_bytes + grads
        if choice == RECOMPUTE:
            return self.in_bytes + self.act_bytes + grads
        return self.stored(choice) + DECODE_LIVE * self.float_bytes + grads

    def forward_working(self, choice) -> float:
        """Bytes alive for this unit at the end of its forward."""
        if choice == KEEP or choice == OFFLOAD:  # copies out may still be running
            return self.act_bytes + self.out_bytes
        if choice == RECOMPUTE:
            return self.in_bytes + 2 * self.out_bytes
        return self.stored(choice) + ENCODE_LIVE * self.float_bytes + self.out_bytes


@dataclass
class OptimizerOption:
    """One setting of the optimizer (state bits, whether it steps inside backward),
    with the memory it implies and its costs (``seconds``: extra time per step over
    fp32 state stepped after backward)."""

    state_bits: int
    in_backward: bool
    state_bytes: int  # optimizer state
    temp_bytes: int  # temporaries of the optimizer step
    seconds: float  # extra step time vs fp32 state stepped after backward
    fidelity: float  # fidelity cost of compressed state

    @property
    def key(self) -> tuple[int, bool]:
        return (self.state_bits, self.in_backward)


@dataclass
class CostModel:
    """Prices of the choices, in fractions of a plain step (time) or fidelity points."""

    step_seconds: float  # plain step: forward + backward + optimizer step
    encode_decode_seconds_per_byte: dict  # bits -> seconds per uncompressed byte, both ways
    fidelity_per_bits: dict = field(default_factory=lambda: {8: 0.002, 4: 0.01, 2: 0.04})
    end_weight: float = 8.0  # first/last layers and the loss head: this much dearer
    recompute_fixed: float = 0.002  # per checkpointed unit (bookkeeping, re-entry)
    in_backward_cost: float = 0.003  # a tie-break: it forbids accumulation and clipping
    fidelity_weight: float = 1.0
    # Seconds per byte moved one way between host and device (a measured bandwidth,
    # probes.offload_seconds_per_byte); None: offload is not offered.
    offload_seconds_per_byte: float | None = None
    # Costs within this of the cheapest are ties, broken toward the larger modelled
    # peak: the plan that keeps more. Time costs come from one profiled step each, so
    # differences below about 1% of a step are noise; without this, near ties swapped
    # between runs and the leaner pick left part of the budget unused (the case is in
    # docs/benchmarks.md, "Notes on the plan figures").
    tie: float = 0.01

    def unit_cost(self, unit: Unit, choice) -> tuple[float, float]:
        """(time overhead fraction, fidelity cost) of ``choice`` for ``unit``."""
        if choice == KEEP:
            return 0.0, 0.0
        if choice == RECOMPUTE:
            return unit.recompute_seconds / self.step_seconds + self.recompute_fixed, 0.0
        if choice == OFFLOAD:
            # The copy out overlaps the unit's forward, the copy back its backward
            # (about twice the forward): only what outlasts them costs time.
            one_way = unit.host(OFFLOAD) * (self.offload_seconds_per_byte or 0.0)
            fwd = unit.recompute_seconds
            exposed = max(0.0, one_way - fwd) + max(0.0, one_way - 2 * fwd)
            return exposed / self.step_seconds + OFFLOAD_FIXED, 0.0
        per_byte = self.encode_decode_seconds_per_byte.get(choice, 0.0)
        t = unit.float_bytes * per_byte / self.step_seconds
        weight = self.end_weight if unit.is_end else 1.0
        share = 1.0 if unit.float_bytes > 0 else 0.0
        return t, self.fidelity_weight * self.fidelity_per_bits[choice] * weight * share

    def total(self, unit: Unit, choice) -> float:
        t, f = self.unit_cost(unit, choice)
        return t + f


@dataclass
class Solution:
    """A choice per unit and an optimizer option, with its modelled peak and costs."""

    choices: dict  # unit name -> choice
    option: OptimizerOption
    peak: float
    peak_phase: str  # "forward", "backward" or "optimizer"
    overhead: float  # predicted time overhead (fraction of a plain step)
    fidelity: float
    activation_bytes: float  # stored for backward at the end of forward

    @property
    def cost(self) -> float:
        return self.overhead + self.fidelity




def options_for(unit: Unit, allowed_bits: Iterable[int], allow_recompute: bool,
                allow_offload: bool = False) -> list:
    """The choices open to ``unit``: keep; each allowed width if it saves compressible
    floats; recompute if it may be checkpointed; offload if allowed (a measured
    bandwidth) and it saves floats."""
    opts: list = [KEEP]
    if unit.float_bytes > 0:
        opts += [b for b in (8, 4, 2) if b in tuple(allowed_bits)]
    if allow_recompute and unit.can_recompute:
        opts.append(RECOMPUTE)
    if allow_offload and unit.float_bytes > 0:
        opts.append(OFFLOAD)
    return opts


def search(units, options, cost, target, bits, recompute, model_peak, overrides):
    """Greedy descent + refinement over each optimizer option, using ``model_peak``.

    Returns ``(best, leanest)``: of the options' solutions, the one with the largest
    modelled peak among those within ``cost.tie`` of the cheapest (None when no option
    fits), and the solution with the smallest modelled peak."""
    menus = {u.name: options_for(u, bits, recompute, cost.offload_seconds_per_byte is not None) for u in units}

    def stored(u, c):
        return overrides.get((u.name, c), u.stored(c))

    def weight(u, c):
        return stored(u, c) + u.working(c) - u.stored(c)

    found = []
    leanest = None
    for o in options:
        lean = {u.name: min(menus[u.name], key=lambda c, u=u: (weight(u, c), cost.total(u, c))) for u in units}
        lp, lph = model_peak(lean, o)
        lsol = as_solution(units, lean, o, lp, lph, cost, stored)
        if leanest is None or lsol.peak < leanest.peak:
            leanest = lsol
        if lp > target:
            continue
        choices = {u.name: KEEP for u in units}
        peak, phase = model_peak(choices, o)
        guard = 0
        while peak > target and guard < 8 * len(units) * 5:
            guard += 1
            best_move, best_score = None, -math.inf
            act0 = sum(stored(u, choices[u.name]) for u in units)
            for u in units:
                c0 = choices[u.name]
                k0 = cost.total(u, c0)
                for c in menus[u.name]:
                    if c == c0 or weight(u, c) >= weight(u, c0):
                        continue
                    trial = dict(choices)
                    trial[u.name] = c
                    p, _ = model_peak(trial, o)
                    dpeak = peak - p
                    dact = act0 - (act0 - stored(u, c0) + stored(u, c))
                    gain = dpeak if dpeak > 1 else 1e-6 * max(dact, 0.0)
                    if gain <= 0:
                        continue
                    score = gain / max(cost.total(u, c) - k0, 1e-9)
                    if score > best_score:
                        best_move, best_score = (u.name, c), score
            if best_move is None:
                break
            choices[best_move[0]] = best_move[1]
            peak, phase = model_peak(choices, o)
        if peak > target:
            continue
        choices = refine(units, choices, o, cost, target, menus, model_peak)
        peak, phase = model_peak(choices, o)
        found.append(as_solution(units, choices, o, peak, phase, cost, stored))
    if not found:
        return None, leanest
    return break_ties(found, cost.tie, cost_of=lambda s: s.cost, peak_of=lambda s: s.peak), leanest


def break_ties(candidates, tie: float, *, cost_of, peak_of):
    """The candidate with the largest peak among those whose cost is within ``tie`` of
    the cheapest (the lower cost among equal peaks): :attr:`CostModel.tie`'s rule."""
    cheapest = min(cost_of(c) for c in candidates)
    return max((c for c in candidates if cost_of(c) <= cheapest + tie), key=lambda c: (peak_of(c), -cost_of(c)))


def refine(units, choices, o, cost, target, menus, model_peak, max_evals: int = 20000):
    """Move single units to cheaper choices while the peak stays under target; then
    try pairs (one unit leaner, another cheaper)."""
    choices = dict(choices)
    evals = 0
    improved = True
    while improved and evals < max_evals:
        improved = False
        for u in sorted(units, key=lambda u: -cost.total(u, choices[u.name])):
            c0 = choices[u.name]
            k0 = cost.total(u, c0)
            for c in sorted(menus[u.name], key=lambda c: cost.total(u, c)):
                if cost.total(u, c) >= k0 - 1e-12:
                    break
                trial = dict(choices)
                trial[u.name] = c
                evals += 1
                if model_peak(trial, o)[0] <= target:
                    choices = trial
                    improved = True
                    break
        if improved:
            continue
        for u in units:
            for v in units:
                if u is v or improved:
                    continue
                cu, cv = choices[u.name], choices[v.name]
                for nu in menus[u.name]:
                    if nu == cu or improved:
                        continue
                    for nv in menus[v.name]:
                        if nv == cv:
                            continue
                        delta = cost.total(u, nu) - cost.total(u, cu) + cost.total(v, nv) - cost.total(v, cv)
                        if delta >= -1e-9:
                            continue
                        trial = dict(choices)
                        trial[u.name], trial[v.name] = nu, nv
                        evals += 1
                        if model_peak(trial, o)[0] <= target:
                            choices = trial
                            improved = True
                            break
            if improved or evals >= max_evals:
                break
    return choices


def as_solution(units, choices, o, peak, phase, cost, stored) -> Solution:
    overhead = o.seconds / cost.step_seconds
    fidelity = o.fidelity + (cost.in_backward_cost if o.in_backward else 0.0)
    for u in units:
        t, f = cost.unit_cost(u, choices[u.name])
        overhead += t
        fidelity += f
    return Solution(choices=dict(choices), option=o, peak=peak, peak_phase=phase, overhead=overhead,
                      fidelity=fidelity, activation_bytes=sum(stored(u, choices[u.name]) for u in units))


def unit_profiles(units, choices, o, *, grad_bytes, span_grad_bytes=0, overrides=None):
    """Modelled live bytes (beyond parameters and optimizer state) while each unit's
    forward and backward run: ``({unit: forward}, {unit: backward})``. The backward
    dict also holds ``"<end>"``: all gradients at the end of backward (not with the
    optimizer inside backward)."""
    overrides = overrides or {}
    ordered = sorted(units, key=lambda u: u.order)

    def stored(u):
        c = choices[u.name]
        return overrides.get((u.name, c), u.stored(c))

    fwd: dict = {}
    bwd: dict = {}
    prefix = 0.0
    prefixes = []
    for u in ordered:
        c = choices[u.name]
        s = stored(u)
        fwd[u.name] = prefix + u.forward_working(c) - u.stored(c) + s
        prefixes.append(prefix)
        prefix += s
    grads_after = 0.0
    for i in range(len(ordered) - 1, -1, -1):
        u = ordered[i]
        c = choices[u.name]
        if o.in_backward:
            grads = u.grad_bytes + span_grad_bytes
        else:
            grads_after += u.grad_bytes
            grads = grads_after
        bwd[u.name] = prefixes[i] + u.working(c) - u.stored(c) + stored(u) + grads
    bwd["<end>"] = 0.0 if o.in_backward else float(grad_bytes)
    return fwd, bwd
