"""The planner's parts on their own: the peak model, the verifier, the callable
package, and the one peak tracker the step mechanics and the integrations share.

Synthetic units and estimates: nothing here runs a model, except the tracker test
(one tiny real step)."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch

import memfit
from memfit.plan import solver as S
from memfit.plan.estimate import Estimate
from memfit.plan.peak_model import PeakModel
from memfit.plan.units import Trace
from memfit.plan.verifier import Verifier, config_key
from memfit.step import StepConfig


def two_blocks(grad_bytes: int = 50) -> list[S.Unit]:
    return [
        S.Unit(name=f"h.{i}", role="block", order=i, act_bytes=100, float_bytes=100, mask_bytes=0,
               out_bytes=10, in_bytes=10, grad_bytes=grad_bytes, recompute_seconds=0.1, can_recompute=True)
        for i in range(2)
    ]


KEEP_ALL = {"h.0": S.KEEP, "h.1": S.KEEP}
FP32 = S.OptimizerOption(state_bits=32, in_backward=False, state_bytes=200, temp_bytes=0, seconds=0.0, fidelity=0.0)
FP32_IN_BWD = S.OptimizerOption(state_bits=32, in_backward=True, state_bytes=200, temp_bytes=0, seconds=0.0,
                                fidelity=0.0)


def uncalibrated(units, grad_bytes: int = 100) -> PeakModel:
    return PeakModel(units, param_bytes=1000, grad_bytes=grad_bytes, span_grad_bytes=0, fwd_offsets={},
                     bwd_offsets={}, optimizer_offsets={FP32.key: 0.0, FP32_IN_BWD.key: 0.0})


# --------------------------------------------------------------------------- peak model


def test_peak_model_predicts_a_synthetic_step():
    """Two kept blocks of 100 saved bytes (outputs 10, gradients 50 each) over 1000
    bytes of parameters and 200 of state: forward ends at 1000 + 200 + 100 + (100 + 10);
    the second block's backward holds both blocks' activations, its working gradients
    (2 x 10) and its own parameter gradients; the optimizer step holds P + G + state."""
    model = uncalibrated(two_blocks())
    F, B, O = model.branches(KEEP_ALL, FP32)
    assert (F, B, O) == (1410.0, 1470.0, 1300.0)
    assert model(KEEP_ALL, FP32) == (1470.0, "backward")


def test_peak_model_in_backward_never_holds_all_gradients():
    """Gradients of 500 per block: after backward, the first block's backward holds
    both (1000) on top of its 120 working bytes; stepping inside backward it holds its
    own only, and there is no optimizer-step branch."""
    model = uncalibrated(two_blocks(grad_bytes=500), grad_bytes=1000)
    assert model.branches(KEEP_ALL, FP32) == (1410.0, 2320.0, 2200.0)
    assert model(KEEP_ALL, FP32) == (2320.0, "backward")
    model.optimizer_offsets[FP32_IN_BWD.key] = 10_000  # ignored: no step after backward
    assert model(KEEP_ALL, FP32_IN_BWD) == (1920.0, "backward")


def test_peak_model_fewer_bits_predict_a_smaller_peak():
    model = uncalibrated(two_blocks())
    peaks = [model({"h.0": c, "h.1": c}, FP32_IN_BWD)[0] for c in (S.KEEP, 8, 4, 2)]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[-1]


def test_peak_model_calibrated_reproduces_the_trace():
    units = two_blocks()
    trace = Trace(order={"h.0": 0, "h.1": 1}, in_bytes={}, out_bytes={}, saved={},
                  fw_peak={"h.0": 1150, "h.1": 1333}, bw_peak={"h.0": 1290, "h.1": 1404},
                  start_bytes=1000, fwd_peak=1333, bwd_peak=1404)
    model = PeakModel.calibrated(units, trace, [FP32], param_bytes=1000, grad_bytes=100, span_grad_bytes=0,
                                 optimizer_temp_bytes=40)
    no_state = S.OptimizerOption(32, False, 0, 0, 0.0, 0.0)
    F, B, O = model.branches(KEEP_ALL, no_state)
    assert F == 1333 and B == 1404
    assert model.optimizer_offsets[FP32.key] == 40  # the fp32 step's temporaries
    assert model(KEEP_ALL, FP32) == (1604.0, "backward")  # + 200 bytes of state


def test_peak_model_correct_matches_the_estimate_it_learns_from():
    model = uncalibrated(two_blocks())
    choices = {"h.0": 8, "h.1": S.KEEP}
    est = Estimate(peak_bytes=1500, peak_phase="optimizer",
                   phase_peaks={"forward": 1390, "backward": 1450, "optimizer": 1500},
                   activations_by_module={"h.0.attn": 20, "h.0.mlp": 15, "h.1.mlp": 90})
    model.correct(choices, FP32, est)
    assert model.overrides[("h.0", 8)] == 35 and model.overrides[("h.1", S.KEEP)] == 90
    F, B, O = model.branches(choices, FP32)
    assert F + model.branch_offsets[False]["fwd"] == 1390
    assert B + model.branch_offsets[False]["bwd"] == 1450
    assert model(choices, FP32) == (1500.0, "optimizer")
    assert model.branch_offsets[True] == {"fwd": 0.0, "bwd": 0.0}  # the other setting is untouched


def test_peak_model_learn_held_skips_recomputed_units():
    model = uncalibrated(two_blocks())
    est = Estimate(activations_by_module={"h.0.mlp": 7, "h.1": 9})
    model.learn_held({"h.0": S.RECOMPUTE, "h.1": 4}, est)
    assert model.overrides == {("h.1", 4): 9.0}


# --------------------------------------------------------------------------- verifier


def solution(state_bits: int, cost: float, peak: float = 0.0) -> S.Solution:
    option = S.OptimizerOption(state_bits, False, 0, 0, 0.0, 0.0)
    return S.Solution(choices=dict(KEEP_ALL), option=option, peak=peak, peak_phase="backward",
                      overhead=cost, fidelity=0.0, activation_bytes=0.0)


class CountingEstimates:
    """``cfg -> Estimate`` with a fixed peak per state width, counting calls."""

    def __init__(self, peaks: dict[int, int]):
        self.peaks = peaks
        self.calls = Counter()

    def __call__(self, cfg: StepConfig) -> Estimate:
        self.calls[cfg.state_bits] += 1
        return Estimate(peak_bytes=self.peaks[cfg.state_bits], peak_phase="backward")


def make_verifier(peaks, target=1000, **kw):
    estimates = CountingEstimates(peaks)
    lines = []
    v = Verifier(estimates, lambda sol: StepConfig(state_bits=sol.option.state_bits), target,
                 log=lines.append, **kw)
    return v, estimates, lines


def test_verifier_accepts_at_the_target_and_rejects_above():
    v, _, lines = make_verifier({32: 1001, 8: 1000})
    est, fits = v.verify(solution(32, 0.0, peak=990), "round 0")
    assert est.peak_bytes == 1001 and not fits
    est, fits = v.verify(solution(8, 0.05, peak=980), "round 1")
    assert fits
    assert [r["fits"] for r in v.rounds] == [False, True]
    assert [r["round"] for r in v.rounds] == [0, 1]
    assert v.rounds[0]["modelled_peak"] == 990 and v.rounds[0]["estimated_peak"] == 1001
    assert [s.option.state_bits for s, _ in v.fitting] == [8]
    assert len(lines) == 2 and lines[0].startswith("round 0: adamw-32")


def test_verifier_estimates_each_configuration_once():
    shared: dict = {}
    v, calls, _ = make_verifier({32: 900}, estimates=shared)
    sol = solution(32, 0.0)
    assert not v.is_checked(sol)
    v.verify(sol, "round 0")
    assert v.is_checked(sol) and v.key_of(sol) == config_key(StepConfig(state_bits=32))
    v.verify(sol, "again")
    assert calls.calls[32] == 1
    # a second search over the same model reuses the shared estimates
    v2, calls2, _ = make_verifier({32: 900}, estimates=shared)
    v2.verify(sol, "round 0")
    assert calls2.calls[32] == 0 and not v2.is_checked(solution(8, 0.0))


def test_verifier_best_breaks_ties_toward_the_larger_peak_and_keeps_the_leanest():
    v, _, _ = make_verifier({32: 950, 8: 700, 4: 600}, target=1000)
    cheap, close, dear = solution(32, 0.100), solution(8, 0.105), solution(4, 0.5)
    for s in (close, dear, cheap):
        v.verify(s, "r")
    best_sol, best_est = v.best(tie=0.01)
    assert best_sol is cheap and best_est.peak_bytes == 950  # within the tie: the larger peak
    assert v.best(tie=0.0)[0] is cheap
    assert v.leanest[0] is dear and v.leanest[1].peak_bytes == 600


def test_verifier_best_is_none_when_nothing_fits():
    v, _, _ = make_verifier({32: 2000}, target=1000)
    v.verify(solution(32, 0.0), "r", leanest=True)
    assert v.best(tie=0.01) is None and v.leanest[1].peak_bytes == 2000
    assert v.rounds[0]["leanest"] is True


# --------------------------------------------------------------------------- the package


def test_memfit_plan_is_a_callable_package(monkeypatch):
    import memfit.plan as package
    from memfit.plan import planner

    assert memfit.plan is package and callable(package)
    assert package.plan is planner.plan  # the function, not a submodule
    assert importlib.util.find_spec("memfit.plan.plan") is None
    for name in ("estimate", "measure_peak", "StepConfig", "InBackwardOptimizer", "SavedCounter", "Plan",
                 "BudgetTooSmall", "max_batch_size", "parse_budget", "profile"):
        assert hasattr(package, name), name
    seen = []
    monkeypatch.setattr(package, "plan", lambda *a, **k: seen.append((a, k)) or "planned")
    assert memfit.plan("model", "batch", "1GB", optimizer="sgd") == "planned"
    assert seen == [(("model", "batch", "1GB"), {"optimizer": "sgd"})]


def test_memfit_activations_is_a_callable_package():
    """``memfit.activations(...)`` compresses, and its modules stay importable under
    the verb's name (a plain function there made ``from memfit.activations import
    engine`` fail)."""
    from memfit.activations import engine, ops  # noqa: F401
    import memfit.activations.saved as saved_module

    assert callable(memfit.activations) and memfit.activations.activations is engine.activations
    assert memfit.activations.saved is saved_module
    model = torch.nn.Linear(8, 8)
    mf = memfit.activations(model, bits=4)
    assert isinstance(mf, memfit.ActivationCompressor)
    with mf:
        model(torch.randn(64, 8, requires_grad=True)).sum().backward()


def test_moved_names_keep_their_import_paths():
    from memfit import optim, step
    from memfit.plan import InBackwardOptimizer, SavedCounter, StepConfig as PlanStepConfig

    assert InBackwardOptimizer is optim.InBackwardOptimizer is step.InBackwardOptimizer
    assert PlanStepConfig is memfit.StepConfig is step.StepConfig
    assert SavedCounter is step.SavedCounter


# --------------------------------------------------------------------------- the one tracker


def test_integrations_meter_and_step_tracking_share_one_tracker():
    from memfit.integrations import PeakMeter
    from memfit.step import peak_tracker_class, phase_tracker_class

    assert issubclass(phase_tracker_class(), peak_tracker_class())
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 64)
    meter = PeakMeter()
    meter.start(model, opt, batch=x)
    assert type(meter._tracker) is peak_tracker_class()
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()
    meter.stop()
    params = sum(p.numel() * 4 for p in model.parameters())
    # parameters and their gradients were alive together, and the batch was counted
    assert meter.peak_bytes >= 2 * params + x.numel() * 4
    assert meter.breakdown["Total"] == meter.peak_bytes
