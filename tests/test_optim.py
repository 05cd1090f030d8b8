"""memfit.optim: AdamW / SGD / Lion with 8-bit and 4-bit block-wise states.

Covers: agreement with torch's optimizers (fp32 state bit for bit, quantized state
within tolerance), fused C++ vs eager bit-identity, exact checkpoint round trips,
conversion to and from torch's state format, LR schedulers, clipping, gradient
accumulation, non-finite gradients, bad input, bytes per parameter, and property tests
of the quantization maps and the step math.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memfit.optim as mo
from memfit.codec import dynamic as D
from memfit.optim import _qstate as Q

pytestmark = pytest.mark.filterwarnings("ignore:memfit.optim. fused CPU step unavailable:RuntimeWarning")



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: with 2 OpenMP threads on a shared 2-core machine every
    op waits at a barrier for a descheduled thread (100x slower). One thread is faster
    and deterministic; the bit-identity tests do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAPS = sorted(D._MAP_BUILDERS)


def fused_available() -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from memfit.optim._kernels import load

        try:
            load()
        except Exception:
            return False
        return True


needs_fused = pytest.mark.skipif(not fused_available(), reason="fused C++ step could not be built here")


def make_model(seed=0, widths=(96, 80, 7)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def batches(n, seed=1, d_in=96, d_out=7, bs=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, d_in, generator=g), torch.randn(bs, d_out, generator=g)) for _ in range(n)]


def train(model, opt, data, sched=None, clip=None):
    losses = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(float(loss))
    return losses


def params_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def set_grads(params, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.dtype)


# --------------------------------------------------------------------------- maps


def test_maps_shape_and_no_zero():
    assert D.get_map("dynamic8_signed").values.numel() == 256
    assert D.get_map("dynamic4_signed").values.numel() == 16
    v8 = D.get_map("dynamic8_signed").values
    assert float(v8.max()) == 1.0 and 0.0 in v8.tolist()
    nz = D.get_map("linear4_unsigned_nozero").values
    assert float(nz.min()) == pytest.approx(1 / 16) and float(nz.max()) == 1.0
    # the bitsandbytes construction: 8-bit signed map resolution doubles per decade
    pos = v8[v8 > 0]
    assert ((pos >= 0.1) & (pos < 1)).sum() == 64


FLOAT8_MAPS = [m for m in MAPS if m.startswith("float8_")]


def test_float_maps():
    for name in FLOAT8_MAPS:
        v = D.get_map(name).values
        assert v.numel() == 256 and float(v.max()) == 1.0 and bool((v[1:] >= v[:-1]).all())
        pos = v[v > 0]
        mant = int(name.split("_")[1][-1])
        # 2**mant equally spaced codes in every binade below 1
        top = pos[(pos >= 0.5) & (pos < 1)]
        assert top.numel() == 2**mant and torch.allclose(top[1:] - top[:-1], torch.full((2**mant - 1,), 0.5 / 2**mant))
        if "unsigned" in name:
            assert float(v.min()) > 0  # no zero code: a second moment never decodes to 0
        else:
            assert torch.equal(v[:127], -v[128:255].flip(0)) and float(v[127]) == 0.0
    assert float(D.get_map("float8_e5m3_unsigned").values.min()) < 2**-31  # 32 binades
    assert float(D.get_map("float8_e4m3_signed").values[128]) < 2**-15  # 16 binades


@needs_fused
@pytest.mark.parametrize("name", FLOAT8_MAPS)
def test_float_map_kernel_rounds_like_searchsorted(name):
    """The fused kernel's integer rounding of float maps equals searchsorted on the
    midpoints (ties to the lower code) on a sweep of every 4099th fp32 in [0, 1], every
    midpoint and its neighbours, both signs, and values past +-1."""
    from memfit.optim._kernels import load

    ext = load()
    qmap = D.get_map(name)
    u = torch.arange(0, 0x3F800001, 4099, dtype=torch.int64).to(torch.int32)
    sweep = u.view(torch.float32)
    m = qmap.midpoints
    near = torch.cat([m, torch.nextafter(m, torch.tensor(2.0)), torch.nextafter(m, torch.tensor(-2.0)),
                      torch.nextafter(torch.nextafter(m, torch.tensor(2.0)), torch.tensor(2.0))])
    x = torch.cat([sweep, near, torch.tensor([0.0, 1.0, 1.0000001, 1.5, 3e38, 1e-45, 2**-40])])
    x = torch.cat([x, -x]).contiguous()
    got = ext.float_map_codes(x, qmap.values)
    assert torch.equal(got.to(torch.int64), D.quantize_normalized(x, qmap))
    codes = torch.arange(256, dtype=torch.int32)
    assert torch.equal(ext.float_map_values(codes, qmap.values), qmap.values)
    # a map that is not a float map is refused (codes -1), not rounded wrongly
    assert bool((ext.float_map_codes(x[:16].contiguous(), D.get_map("dynamic8_signed").values) == -1).all())


@PROP
@given(
    name=st.sampled_from(MAPS),
    xs=st.lists(st.floats(-1.5, 1.5, allow_nan=False, width=32), min_size=1, max_size=64),
)
def test_table_lookup_equals_searchsorted(name, xs):
    qmap = D.get_map(name)
    x = torch.tensor(xs, dtype=torch.float32)
    # also probe exactly at and next to every midpoint
    m = qmap.midpoints
    x = torch.cat([x, m, -m, torch.nextafter(m, torch.tensor(2.0)), torch.nextafter(m, torch.tensor(-2.0))])
    assert torch.equal(D.quantize_normalized(x, qmap), D.table_lookup(x, qmap))


@PROP
@given(
    name=st.sampled_from(MAPS),
    n=st.integers(1, 700),
    block=st.sampled_from([8, 64, 128, 256]),
    scale=st.floats(1e-6, 1e4),
    seed=st.integers(0, 2**31 - 1),
)
def test_blockwise_roundtrip_is_nearest(name, n, block, scale, seed):
    qmap = D.get_map(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    if float(qmap.values.min()) >= 0:
        x = x.abs()
    codes, absmax = D.quantize_blockwise(x, qmap, block)
    y = D.dequantize_blockwise(codes, absmax, qmap, block, n)
    nb = -(-n // block)
    assert codes.numel() == nb * block * qmap.bits // 8 and absmax.numel() == nb
    # absmax is exact and the decoded value is the nearest code-book value
    xb = torch.nn.functional.pad(x, (0, nb * block - n)).view(nb, block)
    assert torch.equal(absmax, xb.abs().amax(1))
    am = absmax.repeat_interleave(block)[:n]
    vals = qmap.values.to(torch.float64)
    xn = (x.double() / am.double().clamp_min(1e-38)).clamp(-1, 1)
    best = (xn[:, None] - vals[None, :]).abs().min(1).values
    got = (y.double() / am.double().clamp_min(1e-38) - xn).abs()
    assert bool((got <= best + 1e-6).all())
    if name == "linear4_unsigned_nozero":  # no zero code: never decodes to 0 in a non-zero block
        assert bool((y[am > 0] > 0).all())


def test_nonfinite_blockwise_does_not_poison_block():
    qmap = D.get_map("dynamic8_signed")
    x = torch.randn(512)
    x[3], x[300] = float("nan"), float("inf")
    codes, absmax = D.quantize_blockwise(x, qmap, 256)
    assert bool(torch.isfinite(absmax).all())
    y = D.dequantize_blockwise(codes, absmax, qmap, 256, 512)
    ok = torch.ones(512, dtype=torch.bool)
    ok[[3, 300]] = False
    assert bool(torch.isfinite(y).all())
    assert float((y[ok] - x[ok]).abs().max()) < 0.02 * float(x[ok].abs().max())


# --------------------------------------------------------------------------- agreement with torch


def test_defaults_like_torch():
    p = [torch.nn.Parameter(torch.zeros(3))]
    g = mo.AdamW(p).param_groups[0]
    t = torch.optim.AdamW(p).param_groups[0]
    for k in ("lr", "betas", "eps", "weight_decay", "maximize"):
        assert g[k] == t[k]
    assert g["state_bits"] == 8 and g["min_quantized_numel"] == 4096


@pytest.mark.parametrize("kw", [{}, {"maximize": True, "weight_decay": 0.1}])
def test_state_bits_32_is_torch_adamw_bit_for_bit(kw):
    m1, data = make_model(), batches(6)
    m2 = copy.deepcopy(m1)
    train(m1, torch.optim.AdamW(m1.parameters(), lr=1e-2, **kw), data)
    train(m2, mo.AdamW(m2.parameters(), lr=1e-2, state_bits=32, **kw), data)
    assert params_equal(m1, m2)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_state_bits_32_is_torch_sgd(nesterov):
    m1, data = make_model(), batches(6)
    m2 = copy.deepcopy(m1)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    train(m1, torch.optim.SGD(m1.parameters(), **kw), data)
    train(m2, mo.SGD(m2.parameters(), state_bits=32, **kw), data)
    assert params_equal(m1, m2)


def big_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Tanh(), torch.nn.Linear(160, 96), torch.nn.Tanh(),
                               torch.nn.Linear(96, 7))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "make,ref",
    [
        (lambda ps, b: mo.AdamW(ps, lr=3e-3, state_bits=b), lambda ps: torch.optim.AdamW(ps, lr=3e-3)),
        (lambda ps, b: mo.SGD(ps, lr=0.05, momentum=0.9, state_bits=b), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
        (lambda ps, b: mo.Lion(ps, lr=3e-4, state_bits=b), lambda ps: mo.Lion(ps, lr=3e-4, state_bits=32)),
    ],
    ids=["adamw", "sgd", "lion"],
)
def test_quantized_training_tracks_fp32(bits, make, ref):
    m1, data = big_model(), batches(40)
    m2 = copy.deepcopy(m1)
    l_ref = train(m1, ref(m1.parameters()), data)
    opt = make(m2.parameters(), bits)
    l_q = train(m2, opt, data)
    assert sum(1 for p in m2.parameters() if "qbits" in opt.state[p]) == 2  # both large weights quantized
    tail_ref, tail_q = sum(l_ref[-10:]) / 10, sum(l_q[-10:]) / 10
    assert tail_q == pytest.approx(tail_ref, rel=0.05 if bits == 8 else 0.1)
    assert tail_q < l_q[0]


@PROP
@given(seed=st.integers(0, 2**31 - 1), step=st.integers(1, 50), bits=st.sampled_from([8, 4]),
       lr=st.floats(1e-5, 1e-1), wd=st.sampled_from([0.0, 0.01, 0.1]))
def test_adamw_step_math_vs_fp32_reference(seed, step, bits, lr, wd):
    """One quantized step equals the fp32 AdamW formula applied to the dequantized state,
    and the stored new state is the nearest code of the fp32 new state."""
    g = torch.Generator().manual_seed(seed)
    n = 4096 + 37
    p = torch.nn.Parameter(torch.randn(n, generator=g))
    opt = mo.AdamW([p], lr=lr, weight_decay=wd, state_bits=bits)
    layout = opt.layout_for(p, opt.param_groups[0])
    m0 = torch.randn(n, generator=g) * 1e-2
    v0 = torch.rand(n, generator=g) * 1e-4
    entry = Q.quantize([m0, v0], opt._STATE_NAMES, layout, p.shape, step - 1)
    opt.state[p] = entry
    m_deq, v_deq = Q.dequantize(entry, opt._STATE_NAMES)
    grad = torch.randn(n, generator=g) * 1e-2
    p.grad = grad.clone()
    p0 = p.detach().clone().double()
    opt.step()
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = b1 * m_deq.double() + (1 - b1) * grad.double()
    v = b2 * v_deq.double() + (1 - b2) * grad.double() ** 2
    denom = (v.sqrt() / math.sqrt(1 - b2**step)) + eps
    ref = p0 * (1 - lr * wd) - lr / (1 - b1**step) * m / denom
    assert torch.allclose(p.detach().double(), ref, rtol=1e-5, atol=1e-6 * max(lr, 1e-3))
    # the stored state is the nearest code of the new fp32 state (computed in fp32 as the step does)
    m32 = m_deq * b1 + grad * (1 - b1)
    v32 = v_deq * b2 + (grad * grad) * (1 - b2)
    re = Q.quantize([m32, v32], opt._STATE_NAMES, layout, p.shape, 0)
    for name in opt._STATE_NAMES:
        assert torch.equal(re[f"{name}_codes"], opt.state[p][f"{name}_codes"])
        assert torch.equal(re[f"{name}_absmax"], opt.state[p][f"{name}_absmax"])


# --------------------------------------------------------------------------- fused vs eager


def _run_all(monkeypatch, eager, cls, bits, kw):
    monkeypatch.setenv("MEMFIT_KERNELS", "eager" if eager else "auto")
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(300, 77)), torch.nn.Parameter(torch.randn(5000)),
          torch.nn.Parameter(torch.randn(4096).to(torch.bfloat16))]
    opt = cls(ps, state_bits=bits, **kw)
    for i in range(4):
        set_grads(ps, 100 + i)
        if i == 1:
            ps[0].grad[3, 5] = float("nan")
            ps[1].grad[7] = float("inf")
        opt.step()
    return ps, opt


@needs_fused
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "cls,kw",
    [(mo.AdamW, dict(lr=1e-2)), (mo.AdamW, dict(lr=1e-2, maximize=True)),
     (mo.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)), (mo.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
     (mo.Lion, dict(lr=1e-3, weight_decay=0.1))],
    ids=["adamw", "adamw-max", "sgd", "sgd-nesterov", "lion"],
)
def test_fused_equals_eager(monkeypatch, bits, cls, kw):
    pa, oa = _run_all(monkeypatch, False, cls, bits, kw)
    pb, ob = _run_all(monkeypatch, True, cls, bits, kw)
    for x, y in zip(pa, pb):
        assert torch.equal(x.isnan(), y.isnan())
        assert torch.equal(x.nan_to_num(), y.nan_to_num())
    for x, y in zip(pa, pb):
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k].nan_to_num(), sb[k].nan_to_num()), k
            else:
                assert sa[k] == sb[k]


@needs_fused
@pytest.mark.parametrize("maps", [("dynamic8_signed", "dynamic8_unsigned_nozero"), ("float8_e3m4_signed", "linear8_unsigned_nozero")])
def test_fused_step_on_other_8bit_maps_equals_eager(maps):
    """The fused AdamW step on 8-bit maps other than its own float maps (what a direct
    kernel caller may pass) takes the generic table-lookup path: bit-identical to eager."""
    from memfit.optim._kernels import load

    layout = Q.Layout(8, 256, maps)
    torch.manual_seed(0)
    n = 20 * 256 + 77
    p_fused = torch.randn(n)
    p_eager = p_fused.clone()
    e_fused = Q.new_entry(("exp_avg", "exp_avg_sq"), layout, n, (n,))
    e_eager = Q.new_entry(("exp_avg", "exp_avg_sq"), layout, n, (n,))
    ext = load()
    opt = mo.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    for step in range(1, 4):
        g = torch.randn(n) * 10.0 ** (-step)
        hp = opt._hparams(opt.param_groups[0], float(step))
        redo = torch.zeros(Q.n_blocks(n, 256), dtype=torch.uint8)
        ext.step(Q.ALGO_ADAMW, p_fused, g, *Q.fused_args(e_fused, ("exp_avg", "exp_avg_sq")), 8, 256, redo, hp)
        assert not bool(redo.any())
        Q.eager_step(Q.ALGO_ADAMW, p_eager, g, e_eager, ("exp_avg", "exp_avg_sq"), hp)
    assert torch.equal(p_fused, p_eager)
    for k in ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.equal(e_fused[k], e_eager[k]), k


def _run_scaled(monkeypatch, eager, cls, bits, kw, block, scale):
    monkeypatch.setenv("MEMFIT_KERNELS", "eager" if eager else "auto")
    torch.manual_seed(0)
    n = 20 * block + block // 2 + 1  # full blocks (the fast path) and a partial one
    p = torch.nn.Parameter(torch.randn(n) * 0.02)
    opt = cls([p], state_bits=bits, block_size=block, min_quantized_numel=0, **kw)
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        grad = torch.randn(n, generator=g) * scale
        grad[::3] = 0.0
        # blocks whose new absmax is denormal, so that 1/absmax overflows: exp_avg (and
        # SGD's and Lion's momentum) ~ 1e-40, or exp_avg_sq ~ 1e-40
        grad[: 2 * block] *= 1e-39 / scale
        grad[2 * block : 4 * block] *= 3e-19 / scale
        grad[5 * block + 7] = 1e4 * scale  # and a block with a wide range inside
        p.grad = grad
        opt.step()
    return p.detach().clone(), opt.state[p]


@needs_fused
@pytest.mark.parametrize("bits,block", [(8, 256), (8, 96), (8, 40), (4, 128), (4, 64), (4, 40)])
@pytest.mark.parametrize("scale", [1e-3, 1.0])
@pytest.mark.parametrize(
    "cls,kw", [(mo.AdamW, dict(lr=1e-2)), (mo.SGD, dict(lr=0.1, momentum=0.9)), (mo.Lion, dict(lr=1e-3))],
    ids=["adamw", "sgd", "lion"],
)
def test_fused_equals_eager_block_sizes_and_tiny_states(monkeypatch, cls, kw, bits, block, scale):
    """The fused step's block paths (AdamW's fast path needs block % 32 == 0) round exactly
    like the eager path, also for tiny and denormal states."""
    pa, sa = _run_scaled(monkeypatch, False, cls, bits, kw, block, scale)
    pb, sb = _run_scaled(monkeypatch, True, cls, bits, kw, block, scale)
    assert torch.equal(pa, pb)
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- checkpoints


def _mixed_opt(model, bits, cls=mo.AdamW, **kw):
    ps = list(model.parameters())
    return cls([{"params": ps[:2]}, {"params": ps[2:], "state_bits": 32}], state_bits=bits, **kw)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cls,kw", [(mo.AdamW, dict(lr=3e-3)), (mo.SGD, dict(lr=0.05, momentum=0.9)),
                                    (mo.Lion, dict(lr=3e-4))], ids=["adamw", "sgd", "lion"])
def test_state_dict_round_trip_is_exact(bits, cls, kw):
    data = batches(12)
    m1 = big_model()
    o1 = _mixed_opt(m1, bits, cls, **kw)
    train(m1, o1, data[:6])
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = big_model(seed=5)
    m2.load_state_dict(ck["model"])
    o2 = _mixed_opt(m2, bits, cls, **kw)
    o2.load_state_dict(ck["opt"])
    # the loaded state is a copy, not shared with the checkpoint
    k = next(iter(ck["opt"]["state"]))
    for name, v in ck["opt"]["state"][k].items():
        if isinstance(v, torch.Tensor) and v.numel():
            assert v.data_ptr() != o2.state[list(m2.parameters())[k]][name].data_ptr()
    train(m1, o1, data[6:])
    train(m2, o2, data[6:])
    assert params_equal(m1, m2)
    # and a second round trip gives equal state dicts
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    for key in s1:
        for name in s1[key]:
            a, b = s1[key][name], s2[key][name]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_load_torch_adamw_state_quantizes_it():
    data = batches(10)
    m1 = big_model()
    t = torch.optim.AdamW(m1.parameters(), lr=3e-3)
    train(m1, t, data[:5])
    sd = t.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    m2 = copy.deepcopy(m1)
    o = mo.AdamW(m2.parameters(), lr=1.0, state_bits=8)
    o.load_state_dict(sd)
    assert o.param_groups[0]["lr"] == 3e-3 and o.param_groups[0]["state_bits"] == 8
    p = list(m2.parameters())[0]
    st_ = o.state[p]
    assert st_["qbits"] == 8 and float(st_["step"]) == 5.0
    m, v = Q.dequantize(st_, o._STATE_NAMES)
    ref = t.state[list(m1.parameters())[0]]
    assert torch.allclose(m.view_as(p), ref["exp_avg"], atol=0.032 * float(ref["exp_avg"].abs().max()))  # E4M3: half a step at the top
    assert torch.allclose(v.view_as(p), ref["exp_avg_sq"], atol=0.032 * float(ref["exp_avg_sq"].abs().max()))
    l1 = train(m1, t, data[5:])
    l2 = train(m2, o, data[5:])
    assert l2 == pytest.approx(l1, rel=0.02)


@pytest.mark.parametrize("bits", [8, 4])
def test_export_to_torch_adamw(bits):
    data = batches(10)
    m1 = big_model()
    o = mo.AdamW(m1.parameters(), lr=3e-3, state_bits=bits)
    train(m1, o, data[:5])
    sd = o.to_torch_state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    m2 = copy.deepcopy(m1)
    t = torch.optim.AdamW(m2.parameters(), lr=1.0)
    t.load_state_dict(sd)
    assert t.param_groups[0]["lr"] == 3e-3
    p1, p2 = list(m1.parameters())[0], list(m2.parameters())[0]
    m, v = Q.dequantize(o.state[p1], o._STATE_NAMES)
    assert torch.equal(t.state[p2]["exp_avg"], m.view_as(p2))
    assert torch.equal(t.state[p2]["exp_avg_sq"], v.view_as(p2))
    assert t.state[p2]["exp_avg"].dtype == p2.dtype
    l1 = train(m1, o, data[5:])
    l2 = train(m2, t, data[5:])
    assert l2 == pytest.approx(l1, rel=0.03)
    # and back again: torch -> memfit
    o3 = mo.AdamW(copy.deepcopy(m2).parameters(), state_bits=bits)
    o3.load_state_dict(t.state_dict())


def test_sgd_state_converts_both_ways():
    data = batches(6)
    m1 = big_model()
    t = torch.optim.SGD(m1.parameters(), lr=0.05, momentum=0.9)
    train(m1, t, data[:3])
    m2 = copy.deepcopy(m1)
    o = mo.SGD(m2.parameters(), lr=0.05, momentum=0.9, state_bits=8)
    o.load_state_dict(t.state_dict())
    p = list(m2.parameters())[0]
    assert o.state[p]["qbits"] == 8 and float(o.state[p]["step"]) >= 1
    train(m2, o, data[3:])
    t2 = torch.optim.SGD(copy.deepcopy(m2).parameters(), lr=0.05, momentum=0.9)
    t2.load_state_dict(o.to_torch_state_dict())


def test_mismatched_state_dict_is_refused():
    m1 = big_model()
    o1 = mo.AdamW(m1.parameters())
    train(m1, o1, batches(2))
    sd = o1.state_dict()
    # different shapes, same parameter count
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(96, 150), torch.nn.Tanh(), torch.nn.Linear(150, 96), torch.nn.Tanh(),
                                torch.nn.Linear(96, 7))
    o2 = mo.AdamW(other.parameters())
    with pytest.raises(ValueError, match="shape"):
        o2.load_state_dict(sd)
    assert len(o2.state) == 0  # nothing was loaded
    # different parameter count
    o3 = mo.AdamW(make_model().parameters())
    with pytest.raises(ValueError):
        o3.load_state_dict(sd)
    # torch format with a wrong shape
    tsd = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
           "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match="shape"):
        mo.AdamW(big_model().parameters()).load_state_dict(tsd)


def test_state_bits_change_converts_state():
    m = big_model()
    o = mo.AdamW(m.parameters(), state_bits=8)
    data = batches(4)
    train(m, o, data[:2])
    p = list(m.parameters())[0]
    before = Q.dequantize(o.state[p], o._STATE_NAMES)
    for g in o.param_groups:
        g["state_bits"] = 32
    train(m, o, data[2:3])
    assert "exp_avg" in o.state[p] and "qbits" not in o.state[p]
    for g in o.param_groups:
        g["state_bits"] = 4
    train(m, o, data[3:])
    assert o.state[p]["qbits"] == 4
    assert before[0].shape == (p.numel(),)


# --------------------------------------------------------------------------- torch-optimizer behaviour


def test_lr_scheduler_and_clipping_like_torch():
    data = batches(8)
    m1 = make_model()
    m2 = copy.deepcopy(m1)
    t = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    o = mo.AdamW(m2.parameters(), lr=1e-2, state_bits=32)
    s1 = torch.optim.lr_scheduler.OneCycleLR(t, max_lr=1e-2, total_steps=8)
    s2 = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=8)
    train(m1, t, data, s1, clip=0.5)
    train(m2, o, data, s2, clip=0.5)
    assert s1.get_last_lr() == s2.get_last_lr()
    assert params_equal(m1, m2)
    # quantized: the scheduler drives the lr the step uses
    m3 = big_model()
    o3 = mo.AdamW(m3.parameters(), lr=1e-2, state_bits=8)
    s3 = torch.optim.lr_scheduler.LambdaLR(o3, lambda i: 0.0 if i >= 2 else 1.0)
    train(m3, o3, data[:2], s3, clip=1.0)
    frozen = [p.detach().clone() for p in m3.parameters()]
    train(m3, o3, data[2:4], s3, clip=1.0)  # lr 0, weight decay * lr = 0: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(frozen, m3.parameters()))


@pytest.mark.parametrize("bits", [8, 4])
def test_grad_accumulation_and_zero_grad(bits):
    x, y = batches(1, bs=32)[0]
    m1 = big_model()
    m2 = copy.deepcopy(m1)
    o1, o2 = mo.AdamW(m1.parameters(), state_bits=bits), mo.AdamW(m2.parameters(), state_bits=bits)
    o1.zero_grad()
    (torch.nn.functional.mse_loss(m1(x), y, reduction="sum")).backward()
    o1.step()
    o2.zero_grad(set_to_none=False)
    for i in range(2):
        sl = slice(16 * i, 16 * (i + 1))
        torch.nn.functional.mse_loss(m2(x[sl]), y[sl], reduction="sum").backward()
    o2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    o2.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in m2.parameters())
    before = [p.detach().clone() for p in m2.parameters()]
    o2.step()  # no grads: nothing changes
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters()))


# --------------------------------------------------------------------------- non-finite gradients


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_nonfinite_gradients_like_torch(bits, bad):
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(64, 128))
    p2 = torch.nn.Parameter(p1.detach().clone())
    p3 = torch.nn.Parameter(p1.detach().clone())
    t = torch.optim.AdamW([p1], lr=1e-2)
    o = mo.AdamW([p2], lr=1e-2, state_bits=bits)
    clean = mo.AdamW([p3], lr=1e-2, state_bits=bits)  # same run without the bad element
    for i in range(5):
        g = torch.Generator().manual_seed(i)
        grad = torch.randn(64, 128, generator=g) * 1e-2
        p3.grad = grad.clone()
        if i == 2:
            grad[0, 3] = bad
        p1.grad, p2.grad = grad.clone(), grad.clone()
        t.step()
        o.step()
        clean.step()
    # the offending element gets torch's outcome (NaN param for NaN/Inf; frozen for overflow)
    assert torch.equal(p1.isnan(), p2.isnan())
    assert torch.equal(p1.isinf(), p2.isinf())
    st_ = o.state[p2]
    for name in o._STATE_NAMES:
        assert bool(torch.isfinite(st_[f"{name}_absmax"]).all())
    m, v = Q.dequantize(st_, o._STATE_NAMES)
    tm, tv = t.state[p1]["exp_avg"].reshape(-1), t.state[p1]["exp_avg_sq"].reshape(-1)
    assert torch.equal(torch.isfinite(m), torch.isfinite(tm)) and torch.equal(torch.isfinite(v), torch.isfinite(tv))
    assert int((~torch.isfinite(m) | ~torch.isfinite(v)).sum()) == 1  # only the offending element
    # every other block is exactly what it is without the bad element
    block = Q.DEFAULT_BLOCK[bits]
    flat2, flat3 = p2.detach().reshape(-1), p3.detach().reshape(-1)
    assert torch.equal(flat2[block:], flat3[block:])
    m3, v3 = Q.dequantize(clean.state[p3], clean._STATE_NAMES)
    assert torch.equal(m[block:], m3[block:]) and torch.equal(v[block:], v3[block:])
    # and the rest of the bad element's own block keeps a sane state (no block-wide NaN)
    ok = torch.ones(block, dtype=torch.bool)
    ok[3] = False
    assert bool(torch.isfinite(m[:block][ok]).all()) and bool(torch.isfinite(v[:block][ok]).all())
    assert torch.allclose(m[:block][ok], m3[:block][ok], atol=0.2 * float(m3[:block].abs().max()))
    assert torch.allclose(flat2[:block][ok], flat3[:block][ok], atol=5e-2)


# --------------------------------------------------------------------------- bad input, special params


def test_bad_state_bits_and_options():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for bad in (16, 2):
        with pytest.raises(ValueError):
            mo.AdamW(p, state_bits=bad)
    for bad in ("8", True, None, 8.0):
        with pytest.raises(TypeError):
            mo.AdamW(p, state_bits=bad)
    with pytest.raises(ValueError):
        mo.AdamW([{"params": p, "state_bits": 7}])
    with pytest.raises(ValueError):
        mo.AdamW(p, block_size=3)
    with pytest.raises(ValueError):
        mo.AdamW(p, amsgrad=True)
    with pytest.raises(ValueError):
        mo.AdamW(p, lr=-1.0)


@pytest.mark.parametrize("bits", [8, 32])
def test_sparse_gradients_raise_like_torch(bits):
    emb1 = torch.nn.Embedding(5000, 4, sparse=True)
    emb1(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError) as theirs:
        torch.optim.AdamW(emb1.parameters()).step()
    with pytest.raises(RuntimeError) as ours:
        mo.AdamW(emb1.parameters(), state_bits=bits).step()
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError, match="sparse"):
        mo.Lion(emb1.parameters()).step()
    with pytest.raises(RuntimeError, match="sparse"):
        mo.SGD(emb1.parameters(), momentum=0.9).step()
    mo.SGD(emb1.parameters(), momentum=0.0, lr=0.1).step()  # no state: torch's SGD path handles it


def test_complex_params_get_fp32_state_like_torch():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(80, 80, dtype=torch.complex64))
    p2 = torch.nn.Parameter(p1.detach().clone())
    t, o = torch.optim.AdamW([p1], lr=1e-2), mo.AdamW([p2], lr=1e-2, state_bits=4)
    assert o.layout_for(p2, o.param_groups[0]) is None
    for i in range(3):
        g = torch.randn(80, 80, dtype=torch.complex64)
        p1.grad, p2.grad = g.clone(), g.clone()
        t.step()
        o.step()
    assert torch.equal(p1, p2)
    assert o.state[p2]["exp_avg"].dtype == torch.complex64


def test_small_and_marked_params_keep_fp32():
    small = torch.nn.Parameter(torch.randn(4095))
    big = torch.nn.Parameter(torch.randn(4096))
    marked = mo.keep_fp32(torch.nn.Parameter(torch.randn(10000)))
    lin = torch.nn.Linear(100, 100)
    mo.keep_fp32(lin)
    o = mo.AdamW([small, big, marked, *lin.parameters()], state_bits=4)
    for p in o.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    o.step()
    assert "qbits" not in o.state[small] and "qbits" in o.state[big]
    assert "qbits" not in o.state[marked] and "qbits" not in o.state[lin.weight]
    assert list(o.quantized_params()) == [big]


def test_bytes_per_param():
    ps = [torch.nn.Parameter(torch.randn(512, 512)) for _ in range(4)]
    total = sum(p.numel() for p in ps)
    for bits, bar in ((8, 2.1), (4, 1.1)):
        o = mo.AdamW(ps, state_bits=bits)
        set_grads(ps, 0)
        o.step()
        assert o.state_nbytes() / total <= bar
    o = mo.AdamW(ps, state_bits=32)
    o.step()
    assert o.state_nbytes() / total >= 8.0
    for bits, bar in ((8, 1.05), (4, 0.55)):
        o = mo.SGD(ps, lr=0.1, momentum=0.9, state_bits=bits)
        o.step()
        assert o.state_nbytes() / total <= bar


def test_weights_only_state_dict_contents():
    m = big_model()
    o = mo.AdamW(m.parameters(), state_bits=4)
    train(m, o, batches(2))
    allowed = (torch.Tensor, int, float, str, bool, type(None))

    def check(x):
        if isinstance(x, dict):
            for k, v in x.items():
                assert isinstance(k, (int, str))
                check(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                check(v)
        else:
            assert isinstance(x, allowed), type(x)

    check(o.state_dict())
