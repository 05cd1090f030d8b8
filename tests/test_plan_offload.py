"""The planner's offload lever and what a plan reports about host memory and the CUDA
allocator: synthetic units for the search, one small real plan on CPU (where offload
is not offered)."""

from __future__ import annotations

import pytest
import torch

import memfit
from memfit.plan import solver as S
from memfit.plan.peak_model import PeakModel
from memfit.plan.result import Plan, policy_for

FP32 = S.OptimizerOption(state_bits=32, in_backward=False, state_bytes=200, temp_bytes=0, seconds=0.0, fidelity=0.0)


def blocks(n=4, act=1000, floats=900, masks=80):
    return [S.Unit(name=f"h.{i}", role="block", order=i, act_bytes=act, float_bytes=floats, mask_bytes=masks,
                   out_bytes=10, in_bytes=10, grad_bytes=50, recompute_seconds=0.1, can_recompute=False)
            for i in range(n)]


def cost(per_byte):
    return S.CostModel(step_seconds=1.0, encode_decode_seconds_per_byte={8: 1e-5, 4: 1e-5, 2: 1e-5},
                       offload_seconds_per_byte=per_byte)


def test_offload_holds_floats_on_the_host_and_the_rest_on_the_device():
    u = blocks(1)[0]
    assert u.stored(S.OFFLOAD) == 1000 - 900 - 80
    assert u.host(S.OFFLOAD) == 900 + 80 / 8
    assert u.host(S.KEEP) == u.host(4) == 0
    # Backward fetches it back whole: its working bytes are those of keep.
    assert u.working(S.OFFLOAD) == u.working(S.KEEP)


def test_offload_is_offered_only_with_a_measured_bandwidth():
    u = blocks(1)[0]
    assert S.OFFLOAD not in S.options_for(u, (8, 4, 2), True)
    assert S.OFFLOAD in S.options_for(u, (8, 4, 2), True, allow_offload=True)
    nothing_to_move = S.Unit(name="x", role="block", order=0, act_bytes=10, float_bytes=0, mask_bytes=0,
                             out_bytes=1, in_bytes=1, grad_bytes=0, recompute_seconds=0.0)
    assert S.OFFLOAD not in S.options_for(nothing_to_move, (8, 4, 2), True, allow_offload=True)


def test_offload_costs_only_the_copy_time_compute_does_not_hide():
    u = blocks(1)[0]
    fast = cost(1e-12).unit_cost(u, S.OFFLOAD)
    assert fast == (S.OFFLOAD_FIXED, 0.0)  # hidden behind the unit's compute, lossless
    one_way = u.host(S.OFFLOAD) * 1e-3  # 0.9 s per direction against 0.1 s of forward
    slow = cost(1e-3).unit_cost(u, S.OFFLOAD)
    assert slow[0] == pytest.approx((one_way - 0.1) + (one_way - 0.2) + S.OFFLOAD_FIXED)
    assert slow[1] == 0.0


def test_search_picks_offload_when_it_is_the_cheapest_way_to_fit():
    units = blocks()
    model = PeakModel(units, param_bytes=1000, grad_bytes=200, span_grad_bytes=0, fwd_offsets={}, bwd_offsets={},
                      optimizer_offsets={FP32.key: 0.0})
    keep = {u.name: S.KEEP for u in units}
    plain_peak = model(keep, FP32)[0]
    target = plain_peak - 1500
    best, _ = S.search(units, [FP32], cost(1e-12), target, (8, 4, 2), False, model, {})
    assert best is not None and best.peak <= target
    assert S.OFFLOAD in best.choices.values()
    # Without the bandwidth the same target needs compression instead.
    best_without, _ = S.search(units, [FP32], cost(None), target, (8, 4, 2), False, model, {})
    assert S.OFFLOAD not in best_without.choices.values()
    assert best_without.fidelity > 0 and best.fidelity == 0


def test_policy_and_json_carry_offload():
    rules = policy_for({"": S.KEEP, "h.0": S.OFFLOAD, "h.1": 4})
    assert rules == {"": None, "h.0": "offload", "h.1": 4}
    assert policy_for({"": S.KEEP, "h.0": S.OFFLOAD}) == {"": None, "h.0": "offload"}
    p = Plan(units=[memfit.plan.UnitChoice(name="h.0", role="block", choice="offload", plain_bytes=10,
                                           planned_bytes=1, overhead=0.0, fidelity=0.0)],
             optimizer_name="adamw", state_bits=32, optimizer_in_backward=False, budget_bytes=100,
             predicted_peak_bytes=90, predicted_peak_phase="backward", predicted_breakdown={},
             predicted_overhead=0.0, fidelity_cost=0.0, plain_peak_bytes=120, plain_breakdown={},
             predicted_host_bytes=9, predicted_reserved_bytes=2 << 20)
    back = Plan.from_dict(p.to_dict())
    assert back.units[0].choice == "offload"
    assert back.predicted_host_bytes == 9 and back.predicted_reserved_bytes == 2 << 20
    assert back.config.policy == {"": None, "h.0": "offload"}
    assert "offloaded to host memory" in str(back)


def test_a_cpu_plan_does_not_offer_offload_and_reports_reserved_bytes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.GELU(),
                                                      torch.nn.Linear(512, 128)) for _ in range(3)])
    batch = torch.randn(256, 128)
    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    p = memfit.plan(model, batch, "70%", loss_fn=loss, step_seconds=0.05, max_rounds=3)
    assert any("offload not offered" in n and "cpu" in n for n in p.notes)
    assert all(u.choice != "offload" for u in p.units)
    assert p.predicted_host_bytes == 0
    assert p.predicted_reserved_bytes >= p.predicted_peak_bytes
    assert p.search["offload_seconds_per_byte"] is None
    with pytest.raises(TypeError, match="offload"):
        memfit.plan(model, batch, "70%", loss_fn=loss, offload="yes")


def test_the_note_of_a_plan_that_offloads_gives_host_bytes_and_bandwidth():
    import sys

    from memfit.activations.offload import available_host_bytes

    planner = sys.modules["memfit.plan.planner"]
    p = Plan(units=[memfit.plan.UnitChoice(name="h.0", role="block", choice="offload", plain_bytes=10,
                                           planned_bytes=1, overhead=0.0, fidelity=0.0)],
             optimizer_name="adamw", state_bits=32, optimizer_in_backward=False, budget_bytes=100,
             predicted_peak_bytes=90, predicted_peak_phase="backward", predicted_breakdown={},
             predicted_overhead=0.0, fidelity_cost=0.0, plain_peak_bytes=120, plain_breakdown={},
             predicted_host_bytes=5 * 10**6)
    note = planner._offload_note(p, cost(1 / 25e9), True, torch.device("cuda"))
    assert note.startswith("1 unit(s) offloaded") and "5.0 MB" in note and "25.0 GB/s" in note
    assert "HostMemoryError" not in note
    p.predicted_host_bytes = available_host_bytes() * 2
    assert "HostMemoryError" in planner._offload_note(p, cost(1 / 25e9), True, torch.device("cuda"))
    assert planner._offload_note(p, cost(None), False, torch.device("cuda")).endswith("(offload=False)")
