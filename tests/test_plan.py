"""memfit.plan: budgets, the planner on a tiny GPT-2 (measured against the budget),
JSON round trips, BudgetTooSmall, optimizer-in-backward refusals, max_batch_size."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import memfit
from memfit.plan import BudgetTooSmall, Plan, StepConfig, estimate, max_batch_size, measure_peak, parse_budget
from memfit.plan.budget import format_bytes
from memfit.plan.units import discover_units, trace_units

transformers = pytest.importorskip("transformers")


def tiny_gpt(n_layer: int = 3, batch: int = 4, seq: int = 64):
    cfg = transformers.GPT2Config(
        n_layer=n_layer, n_embd=64, n_head=2, n_positions=seq, vocab_size=512,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        bos_token_id=None, eos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="module")
def gpt():
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    return tiny_gpt()


@pytest.fixture
def pinned_probes(monkeypatch):
    """The planner's codec and optimizer throughput probes pinned to figures measured
    on the 2-core CI machine, so that searches near a tie do not follow timing noise."""
    from memfit.plan import probes

    cache = probes._PROBE_CACHE
    threads = torch.get_num_threads()
    monkeypatch.setitem(cache, ("codec", threads, 32 * 2**20), {8: 1.4e-9, 4: 1.2e-9, 2: 0.55e-9})
    monkeypatch.setitem(cache, ("optim", "adamw", threads), {32: 3.4e-9, 8: 1.6e-9, 4: 1.5e-9})


@pytest.fixture(scope="module")
def plain_peak(gpt):
    model, batch = gpt
    return estimate(model, batch).peak_bytes


@pytest.fixture(scope="module")
def plans(gpt, plain_peak):
    model, batch = gpt
    out = {}
    for frac in (0.45, 0.75):
        out[frac] = memfit.plan(model, batch, int(plain_peak * frac), step_seconds=0.05)
    return out


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    "spec, expected",
    [
        (123456, 123456),
        ("6GiB", 6 * 2**30),
        ("600MB", 600 * 10**6),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("  2 gb ", 2 * 10**9),
        ("512KiB", 512 * 1024),
        ("6gib", 6 * 2**30),
        ("1000", 1000),
        ("40%", 400),
    ],
)
def test_parse_budget(spec, expected):
    assert parse_budget(spec, plain_peak_bytes=1000) == expected


@pytest.mark.parametrize("spec", ["", "abc", "6 GiBs", "-5GB", "GB", "1.2.3MB", "6b", "0", "0%", "5 %%", "1e400GB"])
def test_malformed_budget_names_the_string(spec):
    with pytest.raises(ValueError) as info:
        parse_budget(spec, plain_peak_bytes=1000)
    assert repr(spec) in str(info.value)


def test_budget_types():
    with pytest.raises(ValueError):
        parse_budget(True)
    with pytest.raises(ValueError):
        parse_budget(-3)
    with pytest.raises(ValueError, match="percentage"):
        parse_budget("40%")  # no plain peak to take it of
    assert format_bytes(378 * 10**6) == "378 MB"


def test_malformed_budget_in_plan(gpt):
    model, batch = gpt
    with pytest.raises(ValueError, match="'lots'"):
        memfit.plan(model, batch, "lots")


# --------------------------------------------------------------------------- units


def test_units_and_trace(gpt):
    model, batch = gpt
    units = discover_units(model)
    names = [u.name for u in units]
    assert "" in names and "lm_head" in names and "transformer.wte" in names
    assert [u.name for u in units if u.role == "block"] == [f"transformer.h.{i}" for i in range(3)]
    tr = trace_units(model, batch, None, names)
    assert tr.order["transformer.wte"] < tr.order["transformer.h.0"] < tr.order["lm_head"] < tr.order[""]
    assert tr.saved["transformer.h.0"]["float"] > 0
    # backward frees as it goes: the first block's backward peak is below the last's
    assert tr.bw_peak["transformer.h.0"] < tr.bw_peak["transformer.h.2"]


# --------------------------------------------------------------------------- the planner


def test_plan_meets_budgets_measured(gpt, plans):
    model, batch = gpt
    for frac, p in plans.items():
        assert p.predicted_peak_bytes <= p.budget_bytes
        measured = measure_peak(model, batch, p.config).peak_bytes
        assert measured <= p.budget_bytes, (frac, measured, p.budget_bytes)
        assert abs(p.predicted_peak_bytes - measured) <= 0.10 * measured
        assert p.predicted_peak_bytes >= 0.80 * p.budget_bytes
    tight = plans[0.45]
    assert any(u.choice != "keep" for u in tight.units) or tight.state_bits != 32 or tight.optimizer_in_backward


def test_plan_attributes_table_and_str(plans):
    p = plans[0.75]
    assert isinstance(p, Plan)
    assert p.optimizer_name == "adamw" and p.state_bits in (32, 8, 4)
    assert 0 <= p.predicted_overhead < 1
    assert set(p.choices) == {u.name for u in p.units}
    assert all(c in ("keep", "8-bit", "4-bit", "2-bit", "recompute") for c in p.choices.values())
    text = str(p)
    assert "budget" in text and "predicted peak" in text
    from rich.console import Console

    console = Console(width=160, record=True, file=open("/dev/null", "w"))
    console.print(p.table())
    rendered = console.export_text()
    assert "transformer.h.0" in rendered and "predicted peak" in rendered


def test_json_round_trip_and_apply(gpt, plans):
    model, batch = gpt
    p = plans[0.45]
    s = p.to_json()
    json.loads(s)
    q = Plan.from_json(s)
    assert q.to_dict()["units"] == p.to_dict()["units"]
    assert q.config.to_dict() == p.config.to_dict()
    with pytest.raises(RuntimeError, match="bind"):
        with q:
            pass
    q.bind(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = q.optimizer(lr=1e-3)
    with q:
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if hasattr(opt, "detach"):
        opt.detach()
    assert torch.isfinite(loss)
    # the step changed the weights; put them back for the other tests
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(before[k])
        for prm in model.parameters():
            prm.grad = None


def test_from_json_rejects_other_model(plans):
    s = plans[0.75].to_json()
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="does not have"):
        Plan.from_json(s, other)
    with pytest.raises(ValueError, match="not a memfit plan"):
        Plan.from_json("{}")


def test_budget_too_small(gpt):
    model, batch = gpt
    with pytest.raises(BudgetTooSmall) as info:
        memfit.plan(model, batch, "100kB", step_seconds=0.05)
    exc = info.value
    assert isinstance(exc, ValueError)
    assert exc.min_peak_bytes > exc.budget_bytes == 100_000
    assert exc.dominant and any(w in exc.dominant for w in ("parameters", "activations", "temporaries", "optimizer"))
    msg = str(exc)
    assert format_bytes(exc.min_peak_bytes) in msg and "100 kB" in msg and exc.dominant in msg


def test_budget_too_small_points_at_chunked_loss_when_logits_dominate():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=8192, use_cache=False,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 8192, (4, 64), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    with pytest.raises(BudgetTooSmall) as plain:
        memfit.plan(model, batch, "10kB", step_seconds=0.05)
    assert "memfit.causal_lm_loss()" in str(plain.value)
    with pytest.raises(BudgetTooSmall) as chunked:
        memfit.plan(model, batch, "10kB", step_seconds=0.05, loss_fn=memfit.causal_lm_loss(chunk_bytes=2**20))
    assert "causal_lm_loss" not in str(chunked.value)
    # the chunked loss holds one 1 MiB chunk of logits instead of two or three 8 MiB tensors
    assert chunked.value.min_peak_bytes < plain.value.min_peak_bytes - 8 * 2**20


def test_plan_leaves_model_unchanged(gpt, plain_peak):
    model, batch = gpt
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    model.eval()
    memfit.plan(model, batch, int(plain_peak * 0.6), step_seconds=0.05)
    assert not model.training
    model.train()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    assert all("forward" not in m.__dict__ for m in model.modules())


# --------------------------------------------------------------------------- optimizer in backward


def test_in_backward_refused_with_accumulation_or_clipping(gpt):
    model, batch = gpt
    with pytest.raises(ValueError, match="grad_accumulation=4"):
        memfit.plan(model, batch, "1GB", optimizer_in_backward=True, grad_accumulation=4)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        memfit.plan(model, batch, "1GB", optimizer_in_backward=True, clip_grad_norm=1.0)


def test_in_backward_plan_refuses_clipping_and_accumulation(gpt, plain_peak):
    model, batch = gpt
    p = memfit.plan(model, batch, int(plain_peak * 0.8), optimizer_in_backward=True, step_seconds=0.05)
    assert p.optimizer_in_backward
    assert any("inside backward" in n for n in p.notes)
    with pytest.raises(ValueError, match="clip"):
        p.clip_grad_norm_(1.0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    opt = p.optimizer(lr=1e-3)
    # an LR scheduler wraps optimizer.step (torch needs it to be a method) and reaches every parameter's optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 ** i)
    try:
        with p:
            loss = model(**batch).loss
        loss.backward()
        opt.step()  # fine: one backward per step
        sched.step()
        assert all(q.grad is None for q in model.parameters())
        assert {g["lr"] for inner in opt.inner_optimizers() for g in inner.param_groups} == {5e-4}
        with p:
            loss = model(**batch).loss
        loss.backward()
        with p:
            loss = model(**batch).loss
        with pytest.raises(RuntimeError, match="accumulat"):
            loss.backward()  # a second backward without step(): accumulation
    finally:
        opt.detach()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(sd[k])
        for q in model.parameters():
            q.grad = None


def test_no_in_backward_when_clipping(gpt, plain_peak):
    model, batch = gpt
    p = memfit.plan(model, batch, int(plain_peak * 0.5), clip_grad_norm=1.0, step_seconds=0.05)
    assert not p.optimizer_in_backward
    assert p.config.max_grad_norm == 1.0
    p.clip_grad_norm_(1.0)  # allowed


def test_plan_with_gradient_accumulation_counts_the_later_micro_batches(gpt, plain_peak):
    # The second micro-batch's forward runs with the first one's gradients alive: the
    # plan is made (and verified) for the whole step, and the measured step fits.
    model, batch = gpt
    budget = int(plain_peak * 0.6)
    p = memfit.plan(model, batch, budget, grad_accumulation=2, step_seconds=0.05)
    assert p.grad_accumulation == 2 and not p.optimizer_in_backward
    assert p.config.accumulation_steps == 2
    assert "gradient accumulation" in str(p)
    measured = measure_peak(model, batch, p.config)
    assert measured.peak_bytes <= budget
    assert abs(p.predicted_peak_bytes - measured.peak_bytes) <= 0.1 * measured.peak_bytes
    single = measure_peak(model, batch, StepConfig.from_dict({**p.config.to_dict(), "accumulation_steps": 1}))
    assert measured.peak_bytes > single.peak_bytes  # the accumulated gradients are counted


def test_four_bit_state_only_when_the_budget_needs_it(pinned_probes):
    # A short batch, so optimizer state weighs as much as the activations. At 53% of
    # plain both "4-bit state, middle block compressed" and "8-bit state, middle block
    # recomputed" fit; 4-bit state cost +11% final loss on GPT-2 in bench/plan.py
    # --parts statebits, recomputing costs only time, so the plan must recompute.
    # At 50% nothing with 8-bit state fits, and 4 bits are what the budget needs.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    model, batch = tiny_gpt(batch=2, seq=32)
    plain = estimate(model, batch).peak_bytes
    roomy = int(plain * 0.53)
    chosen = memfit.plan(model, batch, roomy, step_seconds=0.05)
    forced4 = memfit.plan(model, batch, roomy, state_bits=4, step_seconds=0.05)
    assert forced4.predicted_overhead < chosen.predicted_overhead  # 4 bits were the faster option
    assert chosen.state_bits == 8
    assert any(u.choice == "recompute" for u in chosen.units)
    tight = memfit.plan(model, batch, int(plain * 0.50), step_seconds=0.05)
    assert tight.state_bits == 4
    with pytest.raises(BudgetTooSmall):
        memfit.plan(model, batch, int(plain * 0.50), state_bits=(32, 8), step_seconds=0.05)


def test_polish_checks_near_misses_with_real_estimates(pinned_probes):
    # At 60% of plain's peak on this short batch the search's pick is verified, but
    # a cheaper neighbour its peak model puts just over the target fits when
    # estimated: the polish rounds find it and the plan is cheaper, still verified.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    model, batch = tiny_gpt(batch=2, seq=32)
    budget = int(estimate(model, batch).peak_bytes * 0.60)
    polished = memfit.plan(model, batch, budget, step_seconds=0.05)
    rounds = polished.search["rounds"]
    searched = [r for r in rounds if not r.get("polish")]
    accepted = [r for r in rounds if r.get("polish") and r["fits"]]
    assert accepted, rounds

    def tokens(describe: str) -> set[str]:
        return set(describe.replace("{", " ").replace("}", " ").replace(",", " ").split())

    assert tokens(accepted[-1]["config"]) == tokens(polished.config.describe())
    assert polished.predicted_peak_bytes <= budget * 0.98
    unpolished = memfit.plan(model, batch, budget, step_seconds=0.05, max_rounds=len(searched))
    assert not any(r.get("polish") for r in unpolished.search["rounds"])
    assert (polished.predicted_overhead + polished.fidelity_cost
            < unpolished.predicted_overhead + unpolished.fidelity_cost)
    assert measure_peak(model, batch, polished.config).peak_bytes <= budget


# --------------------------------------------------------------------------- max_batch_size


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(256, 256) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _mlp_loss(model, x):
    return model(x).pow(2).mean()


@pytest.mark.parametrize("budget", ["4.5MB", "6MB", "9MB"])
def test_max_batch_size(budget):
    model = _MLP()
    make = lambda n: torch.randn(n, 256)  # noqa: E731
    n = max_batch_size(model, make, budget, margin=0.05, loss_fn=_mlp_loss)
    limit = parse_budget(budget) * 0.95
    assert n >= 1
    assert estimate(model, make(n), loss_fn=_mlp_loss).peak_bytes <= limit
    assert estimate(model, make(n + 1), loss_fn=_mlp_loss).peak_bytes > limit


def test_max_batch_size_too_small():
    model = _MLP()
    with pytest.raises(BudgetTooSmall) as info:
        max_batch_size(model, lambda n: torch.randn(n, 256), "10kB", loss_fn=_mlp_loss)
    assert info.value.min_peak_bytes > 10_000


def test_max_batch_size_with_a_plan_config(gpt, plans):
    model, _ = gpt
    p = plans[0.75]

    def make(n):
        ids = torch.randint(0, 512, (n, 64))
        return {"input_ids": ids, "labels": ids}

    n = max_batch_size(model, make, p.budget_bytes, margin=0.02, plan=p)
    assert n >= 4  # the plan was made to fit batch 4 within this budget (5% margin aside)
    cfg = p.config
    assert estimate(model, make(n), config=cfg).peak_bytes <= p.budget_bytes * 0.98
    assert isinstance(cfg, StepConfig)


# --------------------------------------------------------------------------- the demo's planned run


def test_demo_planned_run():
    from memfit import demo

    cfg = demo.DemoConfig.quick(steps=4, bits=(), checkpointing=False, planned=True)
    result = demo.run_demo(cfg)
    names = [r.kind for r in result.runs]
    assert names == ["plain", "planned"]
    planned = result.runs[1]
    assert planned.budget_bytes and planned.plan_summary
    # a quarter of this tiny model's peak is out of reach: the demo says so and plans at the floor
    assert any("below the smallest peak" in n for n in result.notes) or planned.budget_bytes <= result.runs[0].peak_bytes // 4 + 1
    assert planned.peak_bytes <= planned.budget_bytes
    assert len(planned.losses) == 4 and all(math.isfinite(x) for x in planned.losses)
    assert result.meets_bar(planned) in (True, False)


def _tie_case(state8_fidelity: float, tie: float):
    """Six blocks of 100 compressible bytes; fp32 state (400 B) needs five blocks at 8
    bits to fit 640 B (cost 5 x (0.002 + 0.007) = 0.045); 8-bit state (0 B here) fits
    with every block kept, for its fidelity cost alone."""
    from memfit.plan import solver as S

    units = [S.Unit(name=f"h.{i}", role="block", order=i, act_bytes=100, float_bytes=100, mask_bytes=0,
                    out_bytes=0, in_bytes=0, grad_bytes=0, recompute_seconds=0.0) for i in range(6)]
    options = [S.OptimizerOption(32, False, 400, 0, 0.0, 0.0),
               S.OptimizerOption(8, False, 0, 0, 0.0, state8_fidelity)]
    cost = S.CostModel(step_seconds=1.0, encode_decode_seconds_per_byte={8: 7e-5, 4: 7e-5, 2: 7e-5}, tie=tie)

    def model_peak(choices, o):
        return o.state_bytes + sum(u.stored(choices[u.name]) for u in units), "backward"

    best, _ = S.search(units, options, cost, 640, (8, 4, 2), False, model_peak, {})
    return best


def test_search_breaks_cost_ties_toward_the_plan_that_keeps_more():
    # 8-bit state at 0.04 is cheaper than fp32 state with five 8-bit blocks (0.045),
    # but by less than the tie: the plan keeps fp32 state and uses more of the budget.
    near = _tie_case(0.04, tie=0.01)
    assert near.option.state_bits == 32 and near.peak > 600
    assert sorted(map(str, near.choices.values())) == ["8"] * 5 + ["keep"]
    assert _tie_case(0.04, tie=0.0).option.state_bits == 8  # no tie: the cheaper one
    assert _tie_case(0.03, tie=0.01).option.state_bits == 8  # 0.015 apart: not a tie


def test_with_plan_keeps_one_compressor_so_the_rounding_noise_runs_on(gpt, plain_peak):
    # A new compressor per step would start from its seed each time: every step would
    # draw the same stochastic-rounding noise, and its errors would not average out.
    model, batch = gpt
    p = memfit.plan(model, batch, int(plain_peak * 0.6), recompute=False, step_seconds=0.05)
    assert p.policy is not None
    grads = []
    for _ in range(2):
        with p:
            loss = model(**batch).loss
        loss.backward()
        grads.append([q.grad.clone() for q in model.parameters()])
        model.zero_grad(set_to_none=True)
    assert p.compressor is p.compressor
    assert any(not torch.equal(a, b) for a, b in zip(*grads))
