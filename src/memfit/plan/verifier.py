"""The planner's verifier: checks a candidate configuration with a real
:func:`~memfit.plan.estimate` (fake tensors) against the target peak.

:class:`Verifier` owns the rounds of a search: each configuration is estimated once
(cached by its JSON form, across calls when given a shared ``estimates`` dict), each
check is recorded (``rounds``, which a :class:`~memfit.plan.Plan` keeps in
``plan.search``), the verified configurations that fit are kept, and so is the one
with the smallest estimated peak (for :class:`~memfit.plan.BudgetTooSmall`).
"""

from __future__ import annotations

import json
from typing import Callable, MutableMapping

from .._units import format_bytes
from ..step import StepConfig
from . import solver as S
from .estimate import Estimate

__all__ = ["Verifier", "config_key"]


def config_key(cfg: StepConfig) -> str:
    """A configuration's identity: its JSON form, keys sorted."""
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


class Verifier:
    """Estimates candidate solutions and says which fit.

    Args:
        estimate_of: ``cfg -> Estimate`` (the planner passes ``estimate(model, batch,
            config=cfg, loss_fn=loss_fn)``).
        config_of: the :class:`~memfit.step.StepConfig` of a :class:`~memfit.plan.solver.Solution`.
        target: the largest estimated peak that fits, in bytes.
        estimates: a cache of estimates by :func:`config_key` (kept by the caller to
            plan the same model and batch again without estimating again).
        log: called with one line per check.
    """

    def __init__(self, estimate_of: Callable[[StepConfig], Estimate],
                 config_of: Callable[[S.Solution], StepConfig], target: float, *,
                 estimates: MutableMapping[str, Estimate] | None = None,
                 log: Callable[[str], None] | None = None):
        self.estimate_of = estimate_of
        self.config_of = config_of
        self.target = target
        self.estimates = {} if estimates is None else estimates
        self.log = log or (lambda line: None)
        self.checked: set[str] = set()
        self.rounds: list[dict] = []
        self.fitting: list[tuple[S.Solution, Estimate]] = []
        self.leanest: tuple[S.Solution, Estimate] | None = None

    def key_of(self, sol: S.Solution) -> str:
        return config_key(self.config_of(sol))

    def is_checked(self, sol: S.Solution) -> bool:
        """Whether ``sol``'s configuration was verified already."""
        return self.key_of(sol) in self.checked

    def verify(self, sol: S.Solution, label: str, **tags) -> tuple[Estimate, bool]:
        """One round: the estimate of ``sol``'s configuration, and whether its peak is
        at most the target. ``tags`` (``leanest=``, ``polish=``) go into the round's
        record."""
        cfg = self.config_of(sol)
        key = config_key(cfg)
        self.checked.add(key)
        est = self.estimates.get(key)
        if est is None:
            est = self.estimates[key] = self.estimate_of(cfg)
        fits = est.peak_bytes <= self.target
        self.rounds.append({"round": len(self.rounds), "modelled_peak": int(sol.peak),
                            "estimated_peak": est.peak_bytes, "phase": est.peak_phase, "fits": fits,
                            "config": cfg.describe(), **tags})
        flag = " [leanest]" if tags.get("leanest") else " [over]" if tags.get("polish") and not fits else ""
        self.log(f"{label}: {cfg.describe()}: modelled {format_bytes(sol.peak)}, estimated "
                 f"{format_bytes(est.peak_bytes)} ({est.peak_phase}){flag}")
        if fits:
            self.fitting.append((sol, est))
        if self.leanest is None or est.peak_bytes < self.leanest[1].peak_bytes:
            self.leanest = (sol, est)
        return est, fits

    def best(self, tie: float) -> tuple[S.Solution, Estimate] | None:
        """Among the verified solutions that fit, the search's tie rule
        (:func:`~memfit.plan.solver.break_ties`): the largest estimated peak among
        those within ``tie`` of the cheapest. None when none fits."""
        if not self.fitting:
            return None
        return S.break_ties(self.fitting, tie, cost_of=lambda f: f[0].cost, peak_of=lambda f: f[1].peak_bytes)
