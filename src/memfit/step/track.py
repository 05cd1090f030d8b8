"""Peak memory of training steps, from ``MemTracker``: one tracker for memfit.

This module owns :func:`tracker_class` (``MemTracker`` that accepts frozen parameters,
used to trace units), :func:`peak_tracker_class` (the same keeping only the global
peak, used by the integrations' ``PeakMeter``), :func:`phase_tracker_class` (the same,
also remembering the phase of the peak and each category's largest value) and
:func:`tracked_steps`, which runs steps under it for the estimator (fake tensors) and
the measurer (real ones).
"""

from __future__ import annotations

import functools
import gc
import warnings
from collections import Counter
from typing import Any, Callable

import torch

from .config import StepConfig
from .loss import Loss
from .optimizer import optimizer_state_bytes
from .run import apply, main_device, run_step

__all__ = ["PHASES", "main_device", "peak_tracker_class", "phase_tracker_class", "tensors_in", "tracked_steps",
           "tracker_class"]

PHASES = ("forward", "backward", "optimizer")


class _NoHook:
    """Stands in for a hook handle MemTracker never needs (see :func:`tracker_class`)."""

    def remove(self) -> None:
        pass


@functools.lru_cache(maxsize=None)
def tracker_class() -> type:
    """``MemTracker`` that works on models with frozen parameters (peft adapters on a
    frozen base, Whisper's fixed positions, ...). ``MemTracker`` hooks every parameter
    it meets in a forward to see its gradient, and torch refuses a hook on a tensor
    that does not require grad; a frozen parameter never gets a gradient, so it is
    counted as a parameter and left unhooked. Every tracker in memfit derives from it.
    The class is built on first use (importing ``MemTracker`` is not free)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenAwareTracker(MemTracker):
        """MemTracker that does not hook the gradients of frozen parameters."""

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            if install_grad_hooks:
                handles = self._param_to_grad_hook_handles
                for p in module.parameters():
                    if not p.requires_grad and handles.get(p, None) is None:
                        # MemTracker hooks only parameters without handles; removing
                        # them (on exit) must do nothing
                        handles[p] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    return FrozenAwareTracker


@functools.lru_cache(maxsize=None)
def peak_tracker_class() -> type:
    """:func:`tracker_class` keeping only the global peak: its per-module peaks (a loop
    over every module at each op) are not used by memfit and dominate its overhead."""

    class GlobalPeakTracker(tracker_class()):
        """MemTracker updating only the global peak (``_peak_mem``, ``_peak_mem_snap``)."""

        _fast: bool | None = None

        def _update_peak_stats(self, peak_state) -> None:
            if self._fast is None:
                self._fast = all(hasattr(self, a) for a in ("_curr_mem_snap", "_peak_mem", "_peak_mem_snap"))
            if not self._fast:  # pragma: no cover - MemTracker's internals changed
                return super()._update_peak_stats(peak_state)
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)

    return GlobalPeakTracker


@functools.lru_cache(maxsize=None)
def phase_tracker_class() -> type:
    """:func:`peak_tracker_class`'s tracker that also remembers the phase of its peak,
    each phase's peak and the largest value each category reached."""

    class PhaseTracker(peak_tracker_class()):
        """Global-peak MemTracker that also remembers the phase of its peak and the
        largest value each category reached."""

        def __init__(self, device: torch.device):
            super().__init__()
            self.device = device
            self.phase = "forward"
            self.peak_phase = "forward"
            self.phase_peaks: dict[str, int] = {}
            self.max_by_kind: Counter = Counter()
            self.marks: dict[str, int] = {}
            self.observer: Callable[[Any], None] | None = None  # given each op's output

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if self.observer is not None:
                self.observer(out)
            return out

        def _update_peak_stats(self, peak_state) -> None:
            before = self._peak_mem.get(self.device, 0)
            super()._update_peak_stats(peak_state)
            snap = self._curr_mem_snap.get(self.device)
            if snap is None:
                return
            self._sample(snap)
            if self._peak_mem.get(self.device, 0) > before:
                self.peak_phase = self.phase
            total = snap.get("Total", 0)
            if total > self.phase_peaks.get(self.phase, 0):
                self.phase_peaks[self.phase] = total

        def _sample(self, snap) -> None:
            for k, v in snap.items():
                key = str(getattr(k, "name", k))
                if v > self.max_by_kind[key]:
                    self.max_by_kind[key] = v

        def current(self) -> dict[str, int]:
            snap = self._curr_mem_snap.get(self.device, {})
            return {str(getattr(k, "name", k)): int(v) for k, v in snap.items()}

        def peak(self) -> dict[str, int]:
            snap = self._peak_mem_snap.get(self.device, {})
            return {str(getattr(k, "name", k)): int(v) for k, v in snap.items()}

        def start_window(self) -> None:
            self.phase = "forward"
            self.peak_phase = "forward"
            self.phase_peaks = {}
            self.max_by_kind = Counter()
            self.marks = {}

        def on_phase(self, name: str) -> None:
            snap = self._curr_mem_snap.get(self.device)
            if snap is not None:
                self._sample(snap)
            total = self.current().get("Total", 0)
            self.marks.setdefault(f"start:{name}", total)
            if name == "backward":
                self.marks.setdefault("after_forward_saved", total)
            if name in PHASES:
                self.phase = name
                self.phase_peaks.setdefault(name, total)

    return PhaseTracker


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors in a nested structure (a batch, a module's arguments or output)."""
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def tracked_steps(
    model: torch.nn.Module,
    batch: Any,
    config: StepConfig,
    loss_fn: Loss,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int = 2,
    device: torch.device | str = "cpu",
    timer: Callable[[], float] | None = None,
    observe: Callable[[Any], None] | None = None,
) -> dict:
    """Run ``steps`` training steps under a MemTracker and describe the last one.

    Works the same on real tensors and under ``FakeTensorMode`` (enter the fake mode
    first). The batch's tensors are tracked as inputs. Python's garbage collector is
    paused during each step (and run between steps) so both see the same lifetimes.
    Returns a dict with ``peak``, ``peak_phase``, ``peak_breakdown`` (MemTracker's
    categories at the peak), ``phase_peaks``, ``max_by_kind``, ``start`` (live bytes by
    category when the last step starts), ``activation_bytes`` (live bytes added by the
    last step's first forward), ``saved_by_module``, ``host_bytes`` (offloaded to host
    memory by the last forward), ``optimizer_bytes``, ``seconds``. ``observe``, if
    given, is called with every op's output during the steps (what
    :class:`memfit.plan.reserved.AllocationTrace` replays).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    tracker = phase_tracker_class()(device)
    tracker.observer = observe
    tracker.track_external(model, optimizer, *tensors_in(batch))
    seconds = []
    saved: dict[str, int] = {}
    host = 0
    start: dict[str, int] = {}
    was_enabled = gc.isenabled()
    with apply(model, config, optimizer, count_saved=True) as ctx, warnings.catch_warnings():
        if ctx.counter is not None:
            ctx.counter.exclude = tensors_in(batch)
        # MemTracker's notes about hooks on modules/grads that are gone (checkpointed
        # modules, gradients freed by optimizer-in-backward): expected here
        warnings.filterwarnings("ignore", message="Module is None")
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        try:
            for i in range(steps):
                last = i == steps - 1
                # objects made since the last collection are young (collection is off
                # during steps): a young-generation pass frees the previous step's cycles
                gc.collect(1)
                gc.disable()
                if last:
                    tracker.reset_mod_stats()
                    tracker.start_window()
                t0 = timer() if timer is not None else 0.0

                def on_phase(name: str, last: bool = last) -> None:
                    if name == "forward":
                        # MemTracker refuses a root module's second forward in one window
                        # (it takes it for the next iteration); gradient accumulation runs
                        # several. Its per-module stats are not used here.
                        tracker.reset_mod_stats()
                    if last:
                        tracker.on_phase(name)

                with tracker:
                    if last:
                        start = tracker.current()
                    run_step(model, batch, config, loss_fn, optimizer, context=ctx, on_phase=on_phase)
                if timer is not None:
                    seconds.append(timer() - t0)
                if last:
                    saved = ctx.saved_bytes()
                    host = ctx.host_bytes()
                if was_enabled:
                    gc.enable()
        finally:
            if was_enabled:
                gc.enable()
    peak = tracker.peak()
    after_fwd = tracker.marks.get("after_forward_saved", 0)
    before_fwd = tracker.marks.get("start:forward", 0)
    return {
        "peak": int(peak.get("Total", 0)),
        "peak_phase": tracker.peak_phase,
        "peak_breakdown": peak,
        "phase_peaks": dict(tracker.phase_peaks),
        "max_by_kind": dict(tracker.max_by_kind),
        "start": start,
        "activation_bytes": max(0, after_fwd - before_fwd),
        "saved_by_module": saved,
        "host_bytes": host,
        "optimizer_bytes": optimizer_state_bytes(optimizer),
        "largest_param_bytes": max((p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
                                   default=0),
        "seconds": seconds,
    }
