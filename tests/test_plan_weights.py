"""memfit.plan's frozen-weight lever (memfit.plan.frozen): per-module int8 / NF4 formats
for frozen weights, chosen under the budget, recorded in the Plan, applied once."""

import gc
import json
import warnings

import pytest
import torch

import memfit
from memfit.plan import Plan, estimate, measure_peak
from memfit.plan import frozen as F
from memfit.weights import compress_weights

transformers = pytest.importorskip("transformers")


def _frozen_llama(seed=0):
    """A tiny Llama with everything frozen but the attention's q/v projections (a
    LoRA-like fine-tune: most parameters frozen by hand)."""
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   use_cache=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(("q_proj.weight", "v_proj.weight")))
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(seed))
    return model, {"input_ids": ids, "labels": ids.clone()}


def test_frozen_groups_and_coded_bytes_match_memfit_weights():
    model, _ = _frozen_llama()
    groups = F.frozen_groups(model)
    names = {p for g in groups for p in g.params}
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert not any(n.endswith(("q_proj.weight", "v_proj.weight", "norm.weight")) for n in names)
    assert [g.nbytes for g in groups] == sorted((g.nbytes for g in groups), reverse=True)
    # the analytic bytes equal what memfit.weights really holds, per format
    for label, bits in F.WEIGHT_FORMATS.items():
        m2, _ = _frozen_llama()
        h = compress_weights(m2, bits)
        assert h.bytes_after == sum(coded for g in groups for coded in [F.coded_bytes(g.numel, label)]), label


def test_levels_are_ordered_and_formats_checked():
    model, _ = _frozen_llama()
    groups = F.frozen_groups(model)
    lv = F.levels(groups, ("int8", "nf4"), {"int8": 1e-9, "nf4": 1e-9}, step_seconds=1.0)
    assert lv[0].formats == {} and lv[-1].formats == {g.module: "nf4" for g in groups}
    saved = [x.saved_bytes for x in lv]
    assert saved == sorted(saved) and saved[0] == 0
    fid = [x.fidelity for x in lv]
    assert fid == sorted(fid) and fid[-1] == pytest.approx(F.FROZEN_FIDELITY["nf4"])
    assert F.levels([], ("int8",), {}, 1.0)[0].formats == {}
    assert len(F.levels(groups, (), {}, 1.0)) == 1
    assert F.resolve_weight_formats([8, "NF4"]) == ("int8", "nf4")
    with pytest.raises(ValueError, match="weight_formats.*'int8'"):
        F.resolve_weight_formats(["fp8"])


def test_shadow_model_estimates_as_the_compressed_model():
    model, batch = _frozen_llama()
    formats = {g.module: "nf4" for g in F.frozen_groups(model)}
    shadow = F.shadow_model(model, formats)
    assert all(t.is_meta for t in list(shadow.parameters()) + list(shadow.buffers()))
    est_shadow = estimate(shadow, batch)
    compress_weights(model, "nf4")
    est_real = estimate(model, batch)
    assert est_shadow.peak_breakdown["params"] == est_real.peak_breakdown["params"]
    assert est_shadow.peak_breakdown["buffers"] == est_real.peak_breakdown["buffers"]
    assert abs(est_shadow.peak_bytes - est_real.peak_bytes) <= 0.01 * est_real.peak_bytes


@pytest.fixture(scope="module")
def planned():
    """One plan of the frozen Llama at a budget that the activation levers alone cannot
    meet (shared by the tests below: planning takes a while on 2 cores)."""
    model, batch = _frozen_llama()
    cache = {}
    plain = estimate(model, batch)
    params = plain.peak_breakdown["params"]
    # below the parameters' own bytes: out of reach while the frozen weights are kept
    budget = int(0.95 * params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = memfit.plan(model, batch, budget, cache=cache, step_seconds=0.05, max_rounds=3)
        try:
            no_lever = memfit.plan(model, batch, budget, cache=cache, step_seconds=0.05, max_rounds=3,
                                   weight_formats=())
        except memfit.BudgetTooSmall as exc:
            no_lever = exc
    return model, batch, budget, p, no_lever


def test_plan_compresses_frozen_weights_when_the_budget_needs_it(planned):
    model, batch, budget, p, no_lever = planned
    assert isinstance(no_lever, memfit.BudgetTooSmall)  # without the lever nothing fits
    assert p.weights and set(p.weights.values()) <= {"int8", "nf4"}
    assert p.weight_bytes_saved > 0 and p.predicted_peak_bytes <= budget
    assert "frozen weights" in str(p) and "weights" in repr(p)
    assert not p.weights_compressed
    opt = p.optimizer(lr=1e-3)
    with p:
        loss = model(**batch).loss
    assert p.weights_compressed
    handles = p.compress_weights()
    assert handles == p.compress_weights()  # once
    compressed = {n for h in handles for n in h.names}
    fresh, _ = _frozen_llama()
    assert compressed == {n for g in F.frozen_groups(fresh) if g.module in p.weights for n in g.params}
    loss.backward()
    opt.step()
    del opt, loss  # measure_peak runs its own optimizer
    gc.collect()
    measured = measure_peak(model, batch, config=p.config)
    assert measured.peak_bytes <= budget, (measured.peak_bytes, budget)


def test_plan_weights_round_trip_json_and_old_json_loads(planned):
    model, batch, budget, p, _ = planned
    d = json.loads(p.to_json())
    assert d["weights"] == p.weights and d["weight_bytes_saved"] == p.weight_bytes_saved
    q = Plan.from_json(p.to_json())
    assert q.weights == p.weights and q.weight_bytes_saved == p.weight_bytes_saved
    del d["weights"], d["weight_bytes_saved"]  # a plan written before the lever
    d["notes"] = [n for n in d["notes"] if "frozen weights" not in n]
    old = Plan.from_dict(d)
    assert old.weights == {} and old.weight_bytes_saved == 0 and "frozen weights" not in str(old)
    d["weights"] = {"lm_head": "fp8"}
    with pytest.raises(ValueError, match="unknown frozen-weight format 'fp8'"):
        Plan.from_dict(d)


def test_restore_weights_puts_plain_parameters_back():
    model, batch = _frozen_llama()
    formats = {g.module: "int8" for g in F.frozen_groups(model)[:2]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    p = Plan(units=[], optimizer_name="adamw", state_bits=32, optimizer_in_backward=False, budget_bytes=1,
             predicted_peak_bytes=1, predicted_peak_phase="forward", predicted_breakdown={},
             predicted_overhead=0.0, fidelity_cost=0.0, plain_peak_bytes=1, plain_breakdown={}, weights=formats)
    p.bind(model)
    handles = p.compress_weights()
    assert len(handles) == 1 and len(handles[0].names) == 2
    assert set(dict(model.named_parameters())) == set(before) - set(handles[0].names)
    p.restore_weights()
    assert not p.weights_compressed
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for n in handles[0].names:  # int8: close, not equal
        assert torch.allclose(after[n], before[n], atol=0.02 * before[n].abs().max().item())
