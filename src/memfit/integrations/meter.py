"""The real peak memory of training steps inside a framework: :class:`PeakMeter`.

It uses memfit's one peak tracker (:func:`memfit.step.peak_tracker_class`), the same
``MemTracker`` subclass behind :func:`memfit.plan.measure_peak` and the estimator.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ..step.track import main_device, peak_tracker_class, tensors_in
from .optimizers import optimizer_for_tracking

__all__ = ["PeakMeter"]


class PeakMeter:
    """The real peak memory of training steps, measured with ``MemTracker``
    (``torch.distributed._tools.mem_tracker``: every tensor storage made through the
    dispatcher, on CPU as on GPU) from the start of each optimizer step to its end
    (forward, backward, clipping, optimizer step, zero_grad). Parameters, buffers,
    optimizer state and the batch are tracked as external tensors.

    ``peak_bytes`` is the highest over the measured steps, ``step_peaks`` one value
    per step and ``breakdown`` MemTracker's categories at the highest peak.
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.step_peaks: list[int] = []
        self.breakdown: dict[str, int] = {}
        self._tracker = None
        self._device: torch.device | None = None
        self._tracked_optimizer = None
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def start(self, model: torch.nn.Module, optimizer=None, batch=None) -> None:
        if self._active:
            return
        if self._tracker is None:
            self._tracker = peak_tracker_class()()
            self._tracker.track_external(model)
            self._device = main_device(model)
        opt = optimizer_for_tracking(optimizer)
        if opt is not None and opt is not self._tracked_optimizer:
            self._tracker.track_external(opt)
            self._tracked_optimizer = opt
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        # MemTracker's notes about modules gone from its weak maps (checkpointed blocks,
        # gradients freed by optimizer-in-backward): expected here
        warnings.filterwarnings("ignore", message="Module is None")
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        self._tracker.reset_mod_stats()  # MemTracker refuses a module seen in an earlier window otherwise
        self._tracker.__enter__()
        self._active = True
        if batch is not None:
            self.track(batch)

    def track(self, batch) -> None:
        """Count the batch's tensors (made outside the tracker, by the data loader).
        Called at the start of each micro-batch: it also clears MemTracker's module
        stats, since MemTracker takes a root module's second forward in one window
        (gradient accumulation) for a new iteration and refuses it."""
        if self._active:
            self._tracker.reset_mod_stats()
            ts = tensors_in(batch)
            if ts:
                self._tracker.track_external(*ts)

    def stop(self) -> None:
        if not self._active:
            return
        self._active = False
        try:
            snap = self._tracker.get_tracker_snapshot("peak").get(self._device, {})
        finally:
            self._tracker.__exit__(None, None, None)
            self._warnings.__exit__(None, None, None)
        total = int(snap.get("Total", 0))
        self.step_peaks.append(total)
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.breakdown = {str(getattr(k, "name", k)): int(v) for k, v in snap.items()}

    def abort(self) -> None:
        """Leave the tracker after an error, without recording the step."""
        if self._active:
            self._active = False
            with contextlib.suppress(Exception):
                self._tracker.__exit__(None, None, None)
            with contextlib.suppress(Exception):
                self._warnings.__exit__(None, None, None)

