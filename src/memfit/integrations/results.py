"""What a memfit callback reports: :class:`CallbackResults` (plan, stats, measured
peak, supplied optimizer) and :func:`summary`, its few lines of text."""

from __future__ import annotations

import torch

from .._units import format_bytes
from .applier import StepApplier
from .distributed import RankPlanning
from .meter import PeakMeter
from .optimizers import DeferredOptimizer
from .settings import MemfitSettings

__all__ = ["CallbackResults", "summary"]


def summary(settings: MemfitSettings, applier: StepApplier, meter: PeakMeter | None,
            budget_bytes: int | None, ranks: RankPlanning | None = None) -> str:
    """A few lines: the plan (or settings), saved-tensor stats, measured peak; with
    several ranks, each rank's budget, predicted and measured peak."""
    lines = []
    if ranks is not None:
        lines.extend(ranks.lines())
    if applier.plan is not None:
        p = applier.plan
        planned = p.predicted_peak_bytes if ranks is None else ranks.predicted_peaks[ranks.rank]
        lines.append(f"memfit: planned peak {format_bytes(planned)} for a budget of "
                     f"{format_bytes(budget_bytes or p.budget_bytes)} ({p.optimizer_name}, {p.state_bits}-bit state"
                     + (", steps inside backward" if p.optimizer_in_backward else "") + ")")
    else:
        lines.append(f"memfit: {settings.describe()}")
    st = applier.stats
    if st is not None:
        lines.append(f"memfit: last step saved {format_bytes(st.original_bytes)} for backward, held "
                     f"{format_bytes(st.stored_bytes)} ({st.ratio:.1f}x less)")
    if meter is not None and meter.step_peaks:
        line = f"memfit: measured peak {format_bytes(meter.peak_bytes)} over {len(meter.step_peaks)} step(s)"
        if budget_bytes:
            verdict = "within" if meter.peak_bytes <= budget_bytes else "OVER"
            line += f", {verdict} the budget of {format_bytes(budget_bytes)} ({100 * meter.peak_bytes / budget_bytes:.0f}%)"
        lines.append(line)
    return "\n".join(lines)


class CallbackResults:
    """The read-only results both trainer callbacks expose. The callback sets
    ``settings``, ``meter``, ``_applier`` and ``_deferred``, and ``_supplied`` when it
    hands the trainer an optimizer built without a plan."""

    settings: MemfitSettings
    meter: PeakMeter | None
    _applier: StepApplier
    _deferred: DeferredOptimizer | None
    _supplied: torch.optim.Optimizer | None = None
    _ranks: RankPlanning | None = None

    @property
    def ranks(self) -> RankPlanning | None:
        """With a budget and several processes: each rank's budget, predicted and
        measured peak, and which rank's plan they adopted."""
        return self._ranks

    @property
    def plan(self):
        """The :class:`memfit.Plan` made on the first training batch (budget only)."""
        return self._applier.plan

    @property
    def stats(self):
        """:class:`memfit.ActivationStats` of the latest training step."""
        return self._applier.stats

    @property
    def compressed_steps(self) -> int:
        """Training micro-steps in which memfit compressed some activation."""
        return self._applier.compressed_steps

    @property
    def steps(self) -> int:
        """Training micro-steps run under memfit."""
        return self._applier.steps

    @property
    def measured_peak_bytes(self) -> int | None:
        """The highest real peak of the measured steps (``measure=True``)."""
        if self.meter is None or not self.meter.step_peaks:
            return None
        return self.meter.peak_bytes

    @property
    def budget_bytes(self) -> int | None:
        """This rank's budget (with several processes: the budget per rank, DDP's
        gradient buckets included)."""
        if self._ranks is not None:
            return self._ranks.budget_bytes
        if self.plan is not None:
            return self.plan.budget_bytes
        if self.settings.budget is None or str(self.settings.budget).strip().endswith("%"):
            return None
        return self.settings.budget_bytes()

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer memfit supplied (the planned one once the plan exists)."""
        if self._deferred is not None:
            return self._deferred.inner
        return self._supplied

    def summary(self) -> str:
        return summary(self.settings, self._applier, self.meter, self.budget_bytes, self._ranks)

