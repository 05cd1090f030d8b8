"""memfit.optim on bf16 (and fp16) parameters: ``bf16="nearest" | "stochastic" | "master"``.

Covers: stochastic rounding (unbiased, always a neighbour, seeded, never the global
RNG), updates smaller than a bf16 ulp (lost by nearest, kept by master and stochastic),
the three modes giving the same results across AdamW, SGD and Lion for equal inputs,
exact checkpoint round trips (a resumed run is bit-identical), master bytes, mode
switches, torch-format export/import, and bad input.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from _dist import Pool, needs_fsdp2, needs_gloo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memfit.optim as mo
from memfit.optim import bf16 as B

pytestmark = pytest.mark.filterwarnings("ignore:memfit.optim. fused CPU step unavailable:RuntimeWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


OPTIMIZERS = [
    (mo.AdamW, dict(lr=1e-3, weight_decay=0.1)),
    (mo.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.01)),
    (mo.Lion, dict(lr=1e-3, weight_decay=0.1)),
]
IDS = ["adamw", "sgd", "lion"]
N = 4096  # quantized at state_bits=8 (min_quantized_numel)


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above ``x`` in magnitude (equal when exact)."""
    bits = x.view(torch.int32)
    low = (bits & -(1 << 16)).view(torch.float32)
    exact = (bits & 0xFFFF) == 0
    high = torch.where(exact, bits & -(1 << 16), (bits & -(1 << 16)) + (1 << 16)).view(torch.float32)
    return low, high


# --------------------------------------------------------------------------- the rounding


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(48) * 10.0 ** torch.randint(-6, 6, (48,)), torch.tensor([1.0 + 2**-10, -3.0 - 2**-12])])
    low, high = neighbours(x)
    reps = 20000
    r = mo.stochastic_round_bf16(x.repeat(reps), seed=7).float().view(reps, -1)
    assert bool(((r == low) | (r == high)).all())
    gap = (high - low).abs()
    p = (x - low).abs() / torch.where(gap > 0, gap, torch.ones_like(gap))
    # mean of reps Bernoulli(p) steps of size gap: 6 standard deviations
    tol = 6 * gap * torch.sqrt(p * (1 - p) / reps) + 1e-30
    assert bool(((r.double().mean(0) - x.double()).abs() <= tol.double()).all())
    # and both neighbours occur in proportion: the rounding is not just nearest
    up = (r == high).double().mean(0)
    inexact = gap > 0
    assert bool(((up - p.double())[inexact].abs() < 0.02).all())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=64),
       st.integers(0, 2**64 - 1))
def test_stochastic_rounding_gives_a_neighbour(values, seed):
    x = torch.tensor(values, dtype=torch.float32)
    low, high = neighbours(x)
    r = mo.stochastic_round_bf16(x, seed=seed).float()
    big = x.abs() > torch.finfo(torch.bfloat16).max
    ok = (r == low) | (r == high) | (big & r.isinf() & (r.sign() == x.sign()))
    assert bool(ok.all()), (x[~ok], r[~ok])


def test_stochastic_rounding_special_values_seed_and_global_rng():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), -float("inf"), float("nan"), 1e-40])
    x = torch.cat([x, torch.tensor([0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)])  # NaN payloads
    state = torch.get_rng_state()
    r = mo.stochastic_round_bf16(x, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert r.dtype == torch.bfloat16
    assert torch.equal(r[:6].float(), x[:6])  # exact values and infinities unchanged
    assert bool(r[6].isnan()) and bool(r[-2:].isnan().all())
    y = torch.randn(1000)
    assert torch.equal(mo.stochastic_round_bf16(y, 5), mo.stochastic_round_bf16(y, 5))
    assert not torch.equal(mo.stochastic_round_bf16(y, 5), mo.stochastic_round_bf16(y, 6))
    out = torch.empty(1000, dtype=torch.bfloat16)
    assert mo.stochastic_round_bf16(y, 5, out=out) is out and torch.equal(out, mo.stochastic_round_bf16(y, 5))
    with pytest.raises(TypeError, match="fp32"):
        mo.stochastic_round_bf16(y.double(), 0)
    with pytest.raises(ValueError, match="bfloat16"):
        mo.stochastic_round_bf16(y, 0, out=torch.empty(1000))


# --------------------------------------------------------------------------- in the optimizers


def make_grads(numel, steps, dtype, scale=1.0, mean=0.0, seed=0):
    """Fixed random gradients, multiples of 1/16 (exact in bf16, fp16 and fp32, so every
    dtype sees the same values)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.round((torch.randn(numel, generator=g) * scale + mean) * 16) / 16).to(dtype) for _ in range(steps)]


def run(cls, kw, mode, bits, steps, *, dtype=torch.bfloat16, numel=N, grad_scale=1.0, grad_mean=0.0, seed=0):
    """``steps`` steps on one parameter of ones with :func:`make_grads` gradients."""
    grads = make_grads(numel, steps, dtype, grad_scale, grad_mean, seed)
    p = torch.nn.Parameter(torch.ones(numel, dtype=dtype))
    opt = cls([p], state_bits=bits, bf16=mode, **kw)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    return p, opt


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_updates_below_an_ulp_survive_master_and_stochastic(cls, kw, bits):
    # every step moves each element by less than half a bf16 ulp at 1.0 (2**-9), the
    # gradients are mostly positive, so 30 steps add up to more than an ulp (2**-8)
    lr = {mo.AdamW: 3e-4, mo.SGD: 2e-5, mo.Lion: 1e-3}[cls]
    kw = {**kw, "lr": lr, "weight_decay": 0.0}
    steps, data = 30, dict(grad_mean=2.0)
    near, _ = run(cls, kw, "nearest", bits, steps, **data)
    assert bool((near == 1).all())  # nearest loses every update, as torch's optimizers on bf16
    ref, _ = run(cls, kw, "nearest", bits, steps, dtype=torch.float32, **data)
    moved = (ref.detach() - 1).abs().mean()
    assert moved > 2**-8
    master, opt = run(cls, kw, "master", bits, steps, **data)
    m = opt.state[master]["bf16_master"]
    assert torch.equal(m, ref.detach())  # the master is the fp32 run, bit for bit
    assert torch.equal(master.detach(), ref.detach().to(torch.bfloat16))
    assert (master.detach().float() - 1).abs().mean() > 2**-9
    sr, _ = run(cls, kw, "stochastic", bits, steps, **data)
    # on average the stochastic run moved as far as the fp32 one
    drift = (sr.detach().double() - ref.detach().double()).mean().abs()
    assert drift < 0.1 * moved


@pytest.mark.parametrize("numel", [N, 64], ids=["quantized", "small-fp32-state"])
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_equal_inputs_equal_results_across_optimizers(cls, kw, bits, numel):
    """Each mode writes the fp32 result of the same update the same way in every optimizer."""
    ref, _ = run(cls, kw, "nearest", bits, 1, dtype=torch.float32, numel=numel, grad_scale=3.0)
    r32 = ref.detach()
    quantized = bits == 8 and numel >= N
    nearest, _ = run(cls, kw, "nearest", bits, 1, numel=numel, grad_scale=3.0)
    if quantized:  # fp32 arithmetic, then one rounding; at 32 bits torch's code runs in bf16 (tested below)
        assert torch.equal(nearest.detach(), r32.to(torch.bfloat16))
    master, opt = run(cls, kw, "master", bits, 1, numel=numel, grad_scale=3.0)
    assert torch.equal(opt.state[master]["bf16_master"], r32)
    assert torch.equal(master.detach(), r32.to(torch.bfloat16))
    sr, opt = run(cls, kw, "stochastic", bits, 1, numel=numel, grad_scale=3.0)
    seed = B.rounding_seed(0, index=0, step=1)
    assert opt.param_groups[0]["bf16_step"] == 1
    assert torch.equal(sr.detach(), mo.stochastic_round_bf16(r32, seed))
    assert B.MASTER_KEY not in opt.state[sr]


@pytest.mark.parametrize("cls,torch_cls,kw", [(mo.AdamW, torch.optim.AdamW, OPTIMIZERS[0][1]),
                                              (mo.SGD, torch.optim.SGD, OPTIMIZERS[1][1])], ids=["adamw", "sgd"])
def test_nearest_at_32_bits_is_torch_on_bf16(cls, torch_cls, kw):
    p, opt = run(cls, kw, "nearest", 32, 3)
    grads = make_grads(N, 3, torch.bfloat16)
    q = torch.nn.Parameter(torch.ones(N, dtype=torch.bfloat16))
    topt = torch_cls([q], **kw)
    for grad in grads:
        q.grad = grad
        topt.step()
    assert torch.equal(p.detach(), q.detach())
    name = "exp_avg" if cls is mo.AdamW else "momentum_buffer"
    assert opt.state[p][name].dtype == torch.bfloat16


def test_parameters_are_seeded_apart_and_fp32_ones_untouched():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.nn.Parameter(torch.ones(N, dtype=torch.bfloat16)) for _ in range(2))
    c = torch.nn.Parameter(torch.ones(N))
    opt = mo.AdamW([a, b, c], lr=1e-4, bf16="stochastic", bf16_seed=11)
    grad = torch.randn(N, generator=g).to(torch.bfloat16)
    a.grad, b.grad, c.grad = grad.clone(), grad.clone(), grad.float()
    before = torch.get_rng_state()
    opt.step()
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(a, b)  # same values and gradients, different random bits
    assert torch.equal(b.detach(), mo.stochastic_round_bf16(c.detach(), B.rounding_seed(11, index=1, step=1)))


@pytest.mark.parametrize("mode", ["master", "stochastic"])
@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=IDS)
def test_resume_is_bit_identical(cls, kw, bits, mode):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 4))
        return model.to(torch.bfloat16)

    def steps(model, opt, seeds):
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            x = torch.randn(8, 64, generator=g).to(torch.bfloat16)
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    model = make()
    opt = cls(model.parameters(), state_bits=bits, bf16=mode, min_quantized_numel=1024, **kw)
    steps(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    steps(model, opt, range(3, 6))

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = make()
    model2.load_state_dict(saved["model"])
    opt2 = cls(model2.parameters(), state_bits=bits, bf16=mode, min_quantized_numel=1024, **kw)
    opt2.load_state_dict(saved["opt"])
    steps(model2, opt2, range(3, 6))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        if mode == "master":
            assert torch.equal(opt.state[p]["bf16_master"], opt2.state[q]["bf16_master"])
    assert opt.state_dict()["param_groups"][0]["bf16_step"] == opt2.state_dict()["param_groups"][0]["bf16_step"]


@pytest.mark.parametrize("bits", [32, 8])
def test_master_bytes_and_mode_switches(bits):
    p, opt = run(mo.AdamW, dict(lr=1e-3), "nearest", bits, 2)
    nearest_bytes = opt.state_nbytes()
    p, opt = run(mo.AdamW, dict(lr=1e-3), "master", bits, 2)
    extra = 4 * N + (4 * 2 * N - 2 * 2 * N if bits == 32 else 0)  # the master; at 32 bits fp32 moments too
    assert opt.state_nbytes() == nearest_bytes + extra
    assert opt.state[p]["bf16_master"].dtype == torch.float32
    master = opt.state[p]["bf16_master"].clone()
    # master -> nearest: the master is dropped, fp32-format state follows the parameter's dtype
    opt.param_groups[0]["bf16"] = "nearest"
    p.grad = torch.ones_like(p)
    opt.step()
    assert "bf16_master" not in opt.state[p]
    assert opt.state_nbytes() == nearest_bytes
    # nearest -> master: a new master from the parameter, fp32 moments (exact upcast of bf16 ones)
    opt.param_groups[0]["bf16"] = "master"
    p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.state_nbytes() == nearest_bytes + extra
    assert not torch.equal(opt.state[p]["bf16_master"], master)


def test_parameter_changed_outside_the_optimizer_remakes_its_master():
    p, opt = run(mo.AdamW, dict(lr=1e-5), "master", 8, 3)
    assert not bool((opt.state[p]["bf16_master"] == 1).all())
    with torch.no_grad():
        p.fill_(2.0)
    p.grad = torch.zeros_like(p)
    with pytest.warns(RuntimeWarning, match="changed outside the optimizer"):
        opt.step()
    m = opt.state[p]["bf16_master"]
    assert bool(((m - 2.0).abs() < 1e-3).all()) and bool((p == 2.0).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.grad = torch.zeros_like(p)
        opt.step()  # no change from outside now: no warning


def test_fp16_master_and_refusals():
    kw = dict(lr=1e-5, weight_decay=0.0)
    near, _ = run(mo.AdamW, kw, "nearest", 8, 20, dtype=torch.float16)
    master, opt = run(mo.AdamW, kw, "master", 8, 20, dtype=torch.float16)
    ref, _ = run(mo.AdamW, kw, "nearest", 8, 20, dtype=torch.float32)
    # fp16 keeps 11 bits: 20 updates of 1e-5 are below half an ulp at 1.0 for nearest
    assert bool((near == 1).all())
    assert torch.equal(opt.state[master]["bf16_master"], ref.detach())
    assert torch.equal(master.detach(), ref.detach().to(torch.float16))
    with pytest.raises(ValueError, match="float16.*'master'"):
        mo.AdamW([torch.nn.Parameter(torch.ones(4, dtype=torch.float16))], bf16="stochastic")
    opt = mo.SGD([torch.nn.Parameter(torch.ones(4))], lr=0.1)
    with pytest.raises(ValueError, match="float16"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(4, dtype=torch.float16))], "bf16": "stochastic"})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [mo.AdamW, mo.SGD, mo.Lion])
def test_bad_mode_and_seed(cls):
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="'nearest', 'stochastic', 'master'"):
        cls([p], bf16="round")
    with pytest.raises(TypeError, match="bf16 must be one of 'nearest', 'stochastic', 'master'"):
        cls([p], bf16=True)
    with pytest.raises(TypeError, match="bf16_seed must be an int"):
        cls([p], bf16="stochastic", bf16_seed="7")
    with pytest.raises(ValueError, match="bf16_seed must be an int of at least 0"):
        cls([p], bf16="stochastic", bf16_seed=-1)
    opt = cls([p], bf16="master")
    sd = opt.state_dict()
    sd["param_groups"][0]["bf16"] = "fp32"
    with pytest.raises(ValueError, match="loaded state dict, parameter group 0: bf16 must be one of"):
        opt.load_state_dict(sd)


def test_torch_format_export_and_import():
    p, opt = run(mo.AdamW, dict(lr=1e-3), "master", 32, 2, numel=64)
    tsd = opt.to_torch_state_dict()
    assert "bf16_master" not in tsd["state"][0] and "bf16" not in tsd["param_groups"][0]
    assert tsd["state"][0]["exp_avg"].dtype == torch.bfloat16  # torch's format on a bf16 parameter
    q = torch.nn.Parameter(p.detach().clone())
    topt = torch.optim.AdamW([q], lr=1e-3)
    topt.load_state_dict(tsd)
    # and back: torch's bf16 moments become this optimizer's fp32 ones, exactly
    opt2 = mo.AdamW([q], lr=1e-3, state_bits=32, bf16="master")
    opt2.load_state_dict(topt.state_dict())
    st2 = opt2.state[q]
    assert st2["exp_avg"].dtype == torch.float32 and torch.equal(st2["exp_avg"], tsd["state"][0]["exp_avg"].float())
    q.grad = torch.ones_like(q)
    opt2.step()
    assert st2["bf16_master"].dtype == torch.float32


def test_bad_saved_master_is_refused():
    p, opt = run(mo.AdamW, dict(lr=1e-3), "master", 8, 1)
    sd = opt.state_dict()
    sd["state"][0]["bf16_master"] = torch.zeros(N - 1)
    with pytest.raises(ValueError, match="bf16_master.*same model"):
        opt.load_state_dict(sd)
    sd["state"][0]["bf16_master"] = [1.0]
    with pytest.raises(ValueError, match="must be a tensor"):
        opt.load_state_dict(sd)


def test_sgd_without_momentum_keeps_only_the_master():
    p, opt = run(mo.SGD, dict(lr=1e-6), "master", 8, 10)
    assert set(opt.state[p]) == {"bf16_master"}
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2 = mo.SGD([torch.nn.Parameter(p.detach().clone())], lr=1e-6, bf16="master")
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(next(iter(opt2.state.values()))["bf16_master"], opt.state[p]["bf16_master"])


def test_non_contiguous_parameter():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(80, 64).to(torch.bfloat16).t())
    assert not w.is_contiguous()
    ref = torch.nn.Parameter(w.detach().float())
    grad = torch.randn(64, 80).to(torch.bfloat16)
    for mode in ("stochastic", "master"):
        q = torch.nn.Parameter(w.detach().clone().t().contiguous().t())
        opt = mo.AdamW([q], lr=1e-3, bf16=mode)
        q.grad = grad.clone()
        opt.step()
        r = torch.nn.Parameter(ref.detach().clone())
        ropt = mo.AdamW([r], lr=1e-3)
        r.grad = grad.float()
        ropt.step()
        low, high = neighbours(r.detach().contiguous())
        qf = q.detach().float()
        assert bool(((qf == low) | (qf == high)).all())


# --------------------------------------------------------------------------- FSDP2 (2 gloo processes)


@pytest.fixture(scope="module")
def pool():
    mo.backend_name()  # build (or load) the fused kernel once, before the workers race for it
    with Pool() as p:
        yield p


def _fsdp_bf16_resume(rank: int, root: str) -> None:
    import os

    import torch.distributed.checkpoint as dcp
    from _dist import fully_shard, mesh
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def make(mode):
        torch.manual_seed(0)  # weight 0: 6000 elements, quantized state; weight 1 and biases: fp32 state
        model = torch.nn.Sequential(torch.nn.Linear(30, 200), torch.nn.Tanh(), torch.nn.Linear(200, 4))
        model = model.to(torch.bfloat16)
        fully_shard()(model, mesh=mesh())
        return model, mo.AdamW(model.parameters(), lr=1e-3, state_bits=8, bf16=mode)

    def step(model, opt, x):
        model(x[4 * rank: 4 * rank + 4]).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    def checkpoint(model, opt):
        return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}

    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 30, generator=g).to(torch.bfloat16) for _ in range(6)]
    for mode in ("master", "stochastic"):
        what = f"bf16={mode} rank {rank}"
        model, opt = make(mode)
        for x in xs[:3]:
            step(model, opt, x)
        for p in model.parameters():
            m = opt.state[p].get(B.MASTER_KEY)
            if mode == "master":
                assert m.placements == p.placements and m.to_local().dtype == torch.float32, what
                assert torch.equal(m.to_local().to(torch.bfloat16), p.to_local()), what
            else:
                assert m is None, what
        path = os.path.join(root, mode)
        dcp.save(checkpoint(model, opt), checkpoint_id=path)
        for x in xs[3:]:
            step(model, opt, x)

        model2, opt2 = make(mode)  # a fresh run, resumed from the checkpoint
        sd = checkpoint(model2, opt2)
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model2, sd["model"])
        set_optimizer_state_dict(model2, opt2, sd["optim"])
        for x in xs[3:]:
            step(model2, opt2, x)
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p.to_local(), q.to_local()), what
            if mode == "master":
                assert torch.equal(opt.state[p][B.MASTER_KEY].to_local(), opt2.state[q][B.MASTER_KEY].to_local()), what


@needs_gloo
@needs_fsdp2
def test_fsdp2_bf16_master_and_stochastic_resume_bit_identically(pool, tmp_path):
    """Under FSDP2 each rank keeps the master of its shard (a DTensor placed like the
    parameter) and rounds its shard with its own seed; dcp.save / dcp.load resumes both
    modes bit-identically."""
    pool.run(_fsdp_bf16_resume, str(tmp_path))
