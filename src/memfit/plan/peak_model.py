"""The planner's peak model: the predicted peak of a configuration, calibrated on the
traced plain step and corrected by each verified estimate.

:mod:`memfit.plan.solver` gives the analytic shape of a step's memory (per unit, in
forward and in backward, and at the optimizer step). :class:`PeakModel` owns the
numbers that tie it to one model and batch:

* per-unit offsets, so that the plain configuration reproduces the traced step unit
  by unit (the live-bytes peak inside each unit's forward and backward);
* per optimizer-in-backward setting, an offset for the forward and the backward
  branch, and per optimizer option an offset for the optimizer step, set from the
  latest :func:`~memfit.plan.estimate` of a configuration using it;
* what each unit really held under a choice (``overrides``), as estimates report it.

It also prices optimizer state (:func:`state_bytes`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

import torch

from . import solver as S
from .estimate import Estimate
from .units import Trace, unit_of

__all__ = ["PeakModel", "state_bytes"]


class PeakModel:
    """Predicted peak of a step under per-unit ``choices`` and an optimizer option.

    Build it with :meth:`calibrated`; call it as ``model(choices, option)`` for
    ``(peak bytes, phase)`` (the form :func:`memfit.plan.solver.search` takes); tell it
    what a verified configuration really did with :meth:`correct` (offsets and held
    bytes) or :meth:`learn_held` (held bytes only).

    Args:
        units: the search's units.
        param_bytes: what is alive before the forward (parameters, buffers, batch).
        grad_bytes, span_grad_bytes: all parameter gradients, and those of parameters
            shared across units (alive for the whole backward).
        fwd_offsets, bwd_offsets: per-unit corrections of the forward and backward
            branches (:meth:`calibrated` computes them from a trace).
        optimizer_offsets: per :attr:`OptimizerOption.key`, the correction of the
            optimizer-step branch.
    """

    def __init__(self, units: Sequence[S.Unit], *, param_bytes: int, grad_bytes: int, span_grad_bytes: int,
                 fwd_offsets: Mapping[str, float], bwd_offsets: Mapping[str, float],
                 optimizer_offsets: Mapping[Any, float]):
        self.units = list(units)
        self.param_bytes = param_bytes
        self.grad_bytes = grad_bytes
        self.span_grad_bytes = span_grad_bytes
        self.fwd_offsets = dict(fwd_offsets)
        self.bwd_offsets = dict(bwd_offsets)
        self.branch_offsets = {ib: {"fwd": 0.0, "bwd": 0.0} for ib in (False, True)}
        self.optimizer_offsets = dict(optimizer_offsets)
        # (unit, choice) -> bytes held, as estimates reported them
        self.overrides: dict[tuple[str, Any], float] = {}

    @classmethod
    def calibrated(cls, units: Sequence[S.Unit], trace: Trace, options: Sequence[S.OptimizerOption], *,
                   param_bytes: int, grad_bytes: int, span_grad_bytes: int,
                   optimizer_temp_bytes: float) -> "PeakModel":
        """A model whose plain configuration (every unit kept, fp32 state stepped after
        backward) reproduces ``trace`` unit by unit. ``optimizer_temp_bytes``: what the
        plain optimizer step holds beyond parameters, gradients and state (the initial
        offset of every fp32 option's optimizer branch)."""
        plain_choices = {u.name: S.KEEP for u in units}
        f0, b0 = S.unit_profiles(units, plain_choices, S.OptimizerOption(32, False, 0, 0, 0.0, 0.0),
                                 grad_bytes=grad_bytes, span_grad_bytes=span_grad_bytes)
        start = trace.start_bytes
        df: dict[str, float] = {}
        db: dict[str, float] = {}
        top_fw = max((v for n, v in trace.fw_peak.items() if n), default=0)
        top_bw = max((v for n, v in trace.bw_peak.items() if n), default=0)
        for n, v in f0.items():
            real = trace.fw_peak.get(n) if n else (trace.fwd_peak if trace.fwd_peak > top_fw else None)
            df[n] = float(real - start - v) if real is not None else 0.0
        for n, v in b0.items():
            if n == "<end>":
                db[n] = 0.0
                continue
            real = trace.bw_peak.get(n) if n else (trace.bwd_peak if trace.bwd_peak > top_bw else None)
            db[n] = float(real - start - v) if real is not None else 0.0
        return cls(units, param_bytes=param_bytes, grad_bytes=grad_bytes, span_grad_bytes=span_grad_bytes,
                   fwd_offsets=df, bwd_offsets=db,
                   optimizer_offsets={o.key: (optimizer_temp_bytes if o.state_bits == 32 else 0.0) for o in options})

    def branches(self, choices: Mapping[str, Any], option: S.OptimizerOption) -> tuple[float, float, float]:
        """The forward, backward and optimizer-step peaks before the branch offsets."""
        f, b = S.unit_profiles(self.units, choices, option, grad_bytes=self.grad_bytes,
                               span_grad_bytes=self.span_grad_bytes, overrides=self.overrides)
        F = max(v + self.fwd_offsets.get(n, 0.0) for n, v in f.items())
        B = max(v + self.bwd_offsets.get(n, 0.0) for n, v in b.items())
        base = self.param_bytes + option.state_bytes + (option.temp_bytes if option.in_backward else 0)
        return base + F, base + B, self.param_bytes + self.grad_bytes + option.state_bytes

    def __call__(self, choices: Mapping[str, Any], option: S.OptimizerOption) -> tuple[float, str]:
        """``(predicted peak bytes, phase)``, the phase being ``"forward"``,
        ``"backward"`` or ``"optimizer"``."""
        F, B, O = self.branches(choices, option)
        c = self.branch_offsets[option.in_backward]
        F, B = F + c["fwd"], B + c["bwd"]
        fb, phase = (F, "forward") if F >= B else (B, "backward")
        if option.in_backward:
            return fb, phase
        O += self.optimizer_offsets[option.key]
        return (O, "optimizer") if O > fb else (fb, phase)

    def learn_held(self, choices: Mapping[str, Any], est: Estimate) -> None:
        """Remember what each unit actually held under its choice in ``est`` (memfit's
        stored bytes, attributed to units). Recomputed units are invisible to
        saved-tensor hooks (checkpoint's own); their held bytes stay modelled."""
        names = [u.name for u in self.units]
        held: Counter = Counter()
        for mod, b in est.activations_by_module.items():
            held[unit_of(mod, names)] += b
        for u in self.units:
            c = choices[u.name]
            if c == S.RECOMPUTE:
                continue
            if (c == S.KEEP or c == S.OFFLOAD or isinstance(c, int)) and u.name in held:
                self.overrides[(u.name, c)] = float(held[u.name])

    def correct(self, choices: Mapping[str, Any], option: S.OptimizerOption, est: Estimate) -> None:
        """Learn from the estimate of ``choices`` with ``option``: the held bytes, then the
        branch offsets that make this configuration's phase peaks match ``est``'s."""
        self.learn_held(choices, est)
        F, B, O = self.branches(choices, option)
        ph = est.phase_peaks
        c = self.branch_offsets[option.in_backward]
        if "forward" in ph:
            c["fwd"] = ph["forward"] - F
        if "backward" in ph:
            c["bwd"] = ph["backward"] - B
        if not option.in_backward and "optimizer" in ph:
            self.optimizer_offsets[option.key] = ph["optimizer"] - O


def state_bytes(model: torch.nn.Module, optimizer: str, bits: int) -> int:
    """Optimizer state of ``make_optimizer``'s optimizer at ``bits`` (the layouts of
    torch's optimizers and of memfit.optim's block-wise states)."""
    n_states = 2 if optimizer == "adamw" else 1
    seen = set()
    total = 0
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        step = 4 if optimizer != "sgd" else 0
        if bits == 32 or n < 4096 or p.is_complex() or getattr(p, "_memfit_keep_fp32", False):
            total += n_states * n * 4 + step
            continue
        block = 256 if bits == 8 else 128
        nb = -(-n // block)
        total += n_states * (nb * block * bits // 8 + nb * 4) + step
    return total

