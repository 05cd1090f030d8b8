"""The Triton kernels (memfit.codec._triton, memfit.optim._triton) against the eager
reference.

Without a GPU they run on CPU tensors under Triton's interpreter: this module sets
``TRITON_INTERPRET=1`` before it imports triton. With a CUDA device the same tests run
compiled on it (device "cuda"), and the interpreter run happens in a child process
(``test_cpu_interpreter_run``), since one process cannot hold both modes.

Round-to-nearest codes, scales, offsets, flags, fp8 codes, masks and every optimizer
step (parameters, codes, absmax, side tables) must be bit-identical to
:mod:`memfit.codec._eager` and :func:`memfit.optim._qstate.eager_step`; stochastic
rounding must be unbiased and within ``IntFormat.error_bound``.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
_ENV_BEFORE = os.environ.get("TRITON_INTERPRET")
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    from memfit.codec import _eager
    from memfit.codec import _triton as codec_triton
    from memfit.codec.formats import IntFormat
    from memfit.optim import _qstate as Q
    from memfit.optim import _triton as optim_triton
    from test_codec_cpu_kernels import _data  # the same cases as the C++ kernels' tests
finally:  # other modules keep their own setting; this one's tests set it again (below)
    _ENV_INTERPRET = os.environ.get("TRITON_INTERPRET")
    if _ENV_BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _ENV_BEFORE

INTERPRETED = codec_triton.interpreted()
# Triton was imported in compiled mode before this module could set TRITON_INTERPRET=1
# (another test module imported it first, as in the full suite) and there is no GPU:
# this process can run none of the kernels, so the whole file runs in a child process
# (test_cpu_interpreter_run) and the tests here are skipped.
IN_CHILD_ONLY = not INTERPRETED and not CUDA


@pytest.fixture(autouse=True)
def _only_the_child_run(request):
    if IN_CHILD_ONLY and request.node.originalname != "test_cpu_interpreter_run":
        pytest.skip("triton is in compiled mode here without a GPU: test_cpu_interpreter_run runs this file")



@pytest.fixture(autouse=True, scope="module")
def _interpreter_setting():
    """Triton reads TRITON_INTERPRET again while running (lazy imports check it), so it
    must hold the value the kernels were built under during these tests."""
    before = os.environ.get("TRITON_INTERPRET")
    if _ENV_INTERPRET is not None:
        os.environ["TRITON_INTERPRET"] = _ENV_INTERPRET
    yield
    if before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = before


DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETED, reason="this process runs triton compiled: test_cpu_interpreter_run runs the interpreter half")),
    pytest.param("cuda", marks=pytest.mark.skipif(INTERPRETED, reason="no CUDA device")),
]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# numpy's floating-point warnings from inside the interpreter: the inputs hold inf and NaN
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _same(a, b) -> bool:
    """Same dtype, shape and bits (NaNs compare by position, whatever their payload)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.cpu(), b.cpu()
    if a.is_floating_point():
        nan = torch.isnan(a)
        if not torch.equal(nan, torch.isnan(b)):
            return False
        a, b = a[~nan], b[~nan]
        bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
        return torch.equal(a.view(bits), b.view(bits))
    return torch.equal(a, b)


# --------------------------------------------------------------------------- codec


@pytest.mark.parametrize("device", DEVICES)
def test_channel_scaled_int_matches_eager_bit_for_bit(device):
    for dtype in DTYPES:
        for channels, rows in ((24, 5), (100, 7)):
            x = _data(channels * rows, dtype, seed=channels)
            col_scale = torch.rand(channels, generator=torch.Generator().manual_seed(1)) * 30 + 0.5
            col_inv = 1.0 / col_scale
            ref = _eager.quantize_int(x, 4, 64, False, False, 0, col_inv)
            got = codec_triton.quantize_int(x.to(device), 4, 64, False, False, 0, col_inv.to(device))
            for name, want, have in zip(("codes", "scale", "lo", "nonfinite_block"), ref, got):
                assert _same(have, want), f"{name} differs, dtype={dtype} channels={channels}"
            want = _eager.dequantize_int(ref[0], ref[1], ref[2], 4, 64, x.numel(), dtype, col_scale)
            have = codec_triton.dequantize_int(*(t.to(device) for t in ref[:3]), 4, 64, x.numel(), dtype,
                                               col_scale.to(device))
            assert _same(have, want), f"decode differs, dtype={dtype} channels={channels}"


def _limits(dtype: torch.dtype) -> torch.Tensor:
    """Blocks of 64 at the float limits: +-max (the range overflows fp32), the smallest
    subnormals (1 / scale overflows), then ordinary values."""
    info = torch.finfo(dtype)
    x = torch.randn(192)
    x[0:64:2], x[1:64:2] = info.max, -info.max
    x[64:128] = torch.arange(64) * info.smallest_normal / 64
    return x.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_nearest_int_matches_eager_bit_for_bit(device, bits):
    for symmetric in (False, True):
        for dtype in DTYPES:
            sizes = ((8, 1), (8, 301), (24, 100), (64, 1000), (256, 264), (64, None))
            for block, n in sizes:
                x = _limits(dtype) if n is None else _data(n, dtype, seed=n + block + bits)
                n = x.numel()
                ref = _eager.quantize_int(x, bits, block, symmetric, False, 0)
                got = codec_triton.quantize_int(x.to(device), bits, block, symmetric, False, 0)
                ctx = f"symmetric={symmetric} dtype={dtype} block={block} n={n}"
                for name, want, have in zip(("codes", "scale", "lo", "nonfinite_block"), ref, got):
                    assert _same(have, want), f"{name} differs, {ctx}"
                codes, scale, lo = (t if t is None else t.to(device) for t in ref[:3])
                for out in DTYPES:
                    want = _eager.dequantize_int(ref[0], ref[1], ref[2], bits, block, n, out)
                    have = codec_triton.dequantize_int(codes, scale, lo, bits, block, n, out)
                    assert _same(have, want), f"decode to {out} differs, {ctx}"


@pytest.mark.parametrize("device", DEVICES)
def test_int_layout_and_bad_input(device):
    x = torch.randn(1000, device=device)
    codes, scale, lo, nf = codec_triton.quantize_int(x, 4, 64, False, True, 5)
    assert codes.dtype == torch.uint8 and codes.shape == (16 * 64 // 2,) and codes.device.type == device
    assert scale.shape == lo.shape == nf.shape == (16,) and nf.dtype == torch.bool and not nf.any()
    assert codec_triton.quantize_int(x, 2, 64, True, False, 0)[2] is None
    empty = codec_triton.quantize_int(x[:0], 8, 64, False, False, 0)
    assert [t.numel() for t in empty] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="bits"):
        codec_triton.quantize_int(x, 3, 64, False, False, 0)
    with pytest.raises(ValueError, match="block"):
        codec_triton.quantize_int(x, 8, 12, False, False, 0)
    with pytest.raises(TypeError, match="float32"):
        codec_triton.quantize_int(x.to(torch.int32), 8, 64, False, False, 0)
    with pytest.raises(TypeError, match="out_dtype"):
        codec_triton.dequantize_int(codes, scale, lo, 4, 64, 1000, torch.int8)
    with pytest.raises(ValueError, match="does not fit"):
        codec_triton.dequantize_int(codes, scale, lo, 4, 64, 1100, torch.float32)
    with pytest.raises(ValueError, match="codes has"):
        codec_triton.dequantize_int(codes, scale, lo, 8, 64, 1000, torch.float32)
    unusable = ["meta"] + ([] if INTERPRETED else ["cpu"])  # compiled kernels need CUDA tensors
    for dev in unusable:
        with pytest.raises(ValueError, match="cannot run these Triton kernels"):
            codec_triton.quantize_int(torch.zeros(64, device=dev), 8, 64, False, False, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,symmetric", [(8, False), (4, True), (2, False)])
def test_stochastic_unbiased_and_within_error_bound(device, bits, symmetric):
    n, block, seeds = 8192, 64, 24
    x = _data(n, torch.float32, seed=bits, nonfinite=False)
    xd = x.to(device)
    fmt = IntFormat(bits, block, "stochastic", symmetric)
    xb = x.view(-1, block)
    span = 2 * xb.abs().amax(dim=1) if symmetric else xb.amax(dim=1) - xb.amin(dim=1)
    bound = torch.tensor([fmt.error_bound(float(r)) for r in span]).repeat_interleave(block)
    step = (span / fmt.levels).repeat_interleave(block).double()
    ref = _eager.quantize_int(x, bits, block, symmetric, False, 0)
    acc = torch.zeros(n, dtype=torch.float64)
    for seed in range(seeds):
        codes, scale, lo, _ = codec_triton.quantize_int(xd, bits, block, symmetric, True, 1000 + seed)
        assert _same(scale, ref[1]) and _same(lo, ref[2])  # the rounding does not move the grid
        y = codec_triton.dequantize_int(codes, scale, lo, bits, block, n, torch.float32).cpu()
        assert ((y - x).abs() <= bound * (1 + 1e-5) + 1e-6).all(), f"seed {seed}: beyond error_bound"
        acc += y.double()
    again = codec_triton.quantize_int(xd, bits, block, symmetric, True, 1000)[0]
    assert _same(again, codec_triton.quantize_int(xd, bits, block, symmetric, True, 1000)[0])
    assert not _same(again, codec_triton.quantize_int(xd, bits, block, symmetric, True, 1001)[0])
    # each decode errs by at most one step, with variance at most step**2 / 4: the mean
    # of `seeds` decodes has a standard error of at most 0.5 / sqrt(seeds) steps
    diff = acc / seeds - x.double()
    err = torch.where(step > 0, diff / step.clamp_min(1e-300), diff)  # a constant block decodes exactly
    se = 0.5 / math.sqrt(seeds)
    assert err.abs().max() < 6 * se, float(err.abs().max())
    assert abs(float(err.mean())) < 6 * se / math.sqrt(n), float(err.mean())
    # the mean |error| is about 0.31 / sqrt(seeds) steps here; round-to-nearest would
    # leave a quarter of a step on average, whatever the number of decodes
    assert float(err.abs().mean()) < 0.15, float(err.abs().mean())


def _fp8_grid_block() -> torch.Tensor:
    """A block whose absmax is 448 (so scale 1: values reach the e4m3 grid unscaled)
    holding the rounding cases: ties to even in the normal and subnormal ranges, the
    normal/subnormal boundary, signed zeros and the largest value."""
    sub = 2.0**-9
    vals = [448.0, -448.0, 1.0625, 1.1875, -1.0625, 0.5 * sub, 1.5 * sub, 2.5 * sub, 7.5 * sub,
            2.0**-6 - 2.0**-12, 2.0**-6, 0.0, -0.0, -0.25 * sub, 300.0, 232.0, 240.0, -1e-30]
    return torch.tensor(vals + [0.1 * k for k in range(64 - len(vals))])


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_matches_eager(device):
    cases = [(_fp8_grid_block(), 64)]
    cases += [(_data(n, dtype, seed=n), block) for dtype in DTYPES for block, n in ((8, 301), (64, 7), (256, 1000))]
    # In a block of subnormals 1 / scale overflows and 0 * inf is NaN: the C++ and Triton
    # kernels give it code 0; the reference does so only when the tensor holds a
    # non-finite element (else it casts the NaN, code 0xFF), hence the one NaN here.
    for dtype in DTYPES:
        x = _limits(dtype)
        x[-1] = float("nan")
        cases.append((x, 64))
    for x, block in cases:
        n = x.numel()
        ref = _eager.quantize_fp8(x, block)
        got = codec_triton.quantize_fp8(x.to(device), block)
        ctx = f"dtype={x.dtype} block={block} n={n}"
        for name, want, have in zip(("codes", "scale", "nonfinite_block"), ref, got):
            assert _same(have, want), f"{name} differs, {ctx}"
        for out in DTYPES:
            want = _eager.dequantize_fp8(ref[0], ref[1], block, n, out)
            have = codec_triton.dequantize_fp8(ref[0].to(device), ref[1].to(device), block, n, out)
            assert _same(have, want), f"decode to {out} differs, {ctx}"
    every = torch.arange(256, dtype=torch.uint8)  # every code, NaNs included
    scale = torch.full((4,), 0.37)
    want = _eager.dequantize_fp8(every, scale, 64, 256, torch.float32)
    assert _same(codec_triton.dequantize_fp8(every.to(device), scale.to(device), 64, 256, torch.float32), want)


@pytest.mark.parametrize("device", DEVICES)
def test_masks_match_eager(device):
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 8, 33, 4099):
        m = torch.rand(n, generator=g) < 0.4
        packed = codec_triton.pack_bits(m.to(device))
        assert _same(packed, _eager.pack_bits(m))
        assert _same(codec_triton.unpack_bits(packed, n), _eager.unpack_bits(packed.cpu(), n))
        junk = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)  # beyond {0, 1}
        assert _same(codec_triton.pack_bits(junk.to(device)), _eager.pack_bits(junk))
    with pytest.raises(TypeError, match="bool"):
        codec_triton.pack_bits(torch.zeros(8, device=device))
    with pytest.raises(ValueError, match="exceeds"):
        codec_triton.unpack_bits(torch.zeros(1, dtype=torch.uint8, device=device), 9)


# --------------------------------------------------------------------------- optimizer steps

_STATES = {
    Q.ALGO_ADAMW: (("exp_avg", "exp_avg_sq"),
                   {8: ("float8_e4m3_signed", "float8_e5m3_unsigned"), 4: ("dynamic4_signed", "linear4_unsigned_nozero")}),
    Q.ALGO_SGD: (("momentum_buffer",), {8: ("float8_e4m3_signed",), 4: ("dynamic4_signed",)}),
    Q.ALGO_LION: (("exp_avg",), {8: ("float8_e4m3_signed",), 4: ("dynamic4_signed",)}),
}


def _hparams(algo: int, step: int, variant: int) -> list[float]:
    """Hyperparameters as the optimizers pass them; ``variant`` switches options
    (SGD: nesterov / weight decay / maximize; AdamW and Lion: maximize)."""
    gs = -1.0 if variant == 2 else 1.0
    if algo == Q.ALGO_ADAMW:
        lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.01
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        return [1 - lr * wd, b1, 1 - b1, b2, 1 - b2, 1 / math.sqrt(bc2), eps, lr / bc1, gs]
    if algo == Q.ALGO_SGD:
        wd, nesterov = (0.0, 0.0) if variant == 0 else (5e-4, 1.0)
        return [0.01, 0.9, 0.9, wd, gs, nesterov, 1.0 if step == 1 else 0.0]
    return [1 - 1e-4 * 0.1, 1e-4, 0.9, 0.1, 0.99, 0.01, gs]


def _entry_same(a: dict, b: dict, names) -> bool:
    keys = ["nf_idx"] + [f"{nm}_{part}" for nm in names for part in ("codes", "absmax", "nf")]
    return all(_same(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("algo", [Q.ALGO_ADAMW, Q.ALGO_SGD, Q.ALGO_LION], ids=["adamw", "sgd", "lion"])
def test_step_matches_eager_bit_for_bit(device, algo, bits):
    names, maps = _STATES[algo]
    for variant, (block, n) in enumerate(((64, 5), (128, 1000), (32, 3 * 32 + 6))):
        g0 = torch.Generator().manual_seed(variant + 10 * bits + 100 * algo)
        layout = Q.Layout(bits, block, maps[bits])
        states = [torch.randn(n, generator=g0) * 0.1 for _ in names]
        if algo == Q.ALGO_ADAMW:
            states[1] = states[1].abs() * 0.01
        if n > 100:
            states[0][40] = float("inf")  # a block with a side-table entry: flagged on entry
            states[0][130:140] = 0.0
        start = 0 if algo == Q.ALGO_SGD and variant == 0 else 3  # SGD's first step: no buffer yet
        ref = Q.quantize(states, names, layout, [n], float(start))
        mine = {k: (v.clone().to(device) if isinstance(v, torch.Tensor) and k != "step" else copy.deepcopy(v))
                for k, v in ref.items()}
        p_ref = torch.randn(n, generator=g0)
        p = p_ref.clone().to(device)
        grad = torch.randn(n, generator=g0)
        if n > 500:
            grad[700] = float("nan")  # a state goes non-finite in this step: redone eagerly
            grad[300:400] = 0.0
        nb = Q.n_blocks(n, block)
        for t in (start + 1, start + 2):
            hp = _hparams(algo, t, variant)
            Q.eager_step(algo, p_ref, grad, ref, names, hp, None)
            redo = torch.zeros(nb, dtype=torch.uint8)
            if mine["nf_idx"].numel():
                redo[mine["nf_idx"].cpu() // block] = 1
            flagged = redo.clone()
            codes, absmax, values, table, mids, tparams = Q.fused_args(mine, names)
            optim_triton.step(algo, p, grad.to(device), codes, absmax, values, table, mids, tparams, bits, block,
                              redo, hp)
            if n > 500 and t == start + 1:  # then it is in the side table: flagged on entry
                assert redo[700 // block] == 1 and flagged[700 // block] == 0, "the NaN block was not flagged"
            assert (redo >= flagged).all(), "a block flagged on entry was cleared"
            ids = torch.nonzero(redo).reshape(-1).to(device)
            if ids.numel():
                Q.eager_step(algo, p, grad.to(device), mine, names, hp, ids)
            ctx = f"variant={variant} block={block} n={n} step={t}"
            assert _same(p, p_ref), f"parameters differ, {ctx}"
            assert _entry_same(mine, ref, names), f"states differ, {ctx}"


@pytest.mark.parametrize("device", DEVICES)
def test_step_skips_flagged_blocks_and_rejects_bad_input(device):
    names, maps = _STATES[Q.ALGO_ADAMW]
    n, block = 300, 64
    entry = {k: (v.to(device) if isinstance(v, torch.Tensor) and k != "step" else v)
             for k, v in Q.new_entry(names, Q.Layout(4, block, maps[4]), n, [n]).items()}
    args = Q.fused_args(entry, names)
    p = torch.zeros(n, device=device)
    before = [t.clone() for t in args[0] + args[1]]
    redo = torch.ones(Q.n_blocks(n, block), dtype=torch.uint8)
    hp = _hparams(Q.ALGO_ADAMW, 1, 0)
    optim_triton.step(Q.ALGO_ADAMW, p, torch.ones(n, device=device), *args, 4, block, redo, hp)
    assert (p == 0).all() and all(torch.equal(a, b) for a, b in zip(before, args[0] + args[1]))
    assert (redo == 1).all()
    ok = (Q.ALGO_ADAMW, p, torch.ones(n, device=device), *args, 4, block, torch.zeros_like(redo), hp)
    bad = {
        0: (7, ValueError, "algo"),
        9: (3, ValueError, "bits must be 8 or 4"),
        10: (33, ValueError, "block"),
        11: (torch.zeros(2, dtype=torch.uint8), ValueError, "redo"),
        12: (hp[:5], ValueError, "hyperparameters"),
        2: (torch.ones(n, dtype=torch.float16, device=device), TypeError, "float32"),
        3: (args[0][:1], ValueError, "state"),
    }
    for pos, (value, exc, match) in bad.items():
        call = list(ok)
        call[pos] = value
        with pytest.raises(exc, match=match):
            optim_triton.step(*call)


# --------------------------------------------------------------------------- the other mode


@pytest.mark.skipif(not (CUDA or IN_CHILD_ONLY), reason="no CUDA device: the interpreter tests run in this process")
def test_cpu_interpreter_run():
    """On a GPU machine, or where triton was already imported in compiled mode, the
    interpreter half of this file runs in a child process."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_kernels_compile_for_cuda_without_fused_multiply_add():
    """The kernels compile for a real GPU target (sm_90) with no GPU present, and their
    PTX holds no fused multiply-add and no approximate division or square root (which
    would break bit-identity with the eager path)."""
    script = Path(__file__).with_name("_triton_ptx_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "kernels compiled:" in proc.stdout, proc.stdout
