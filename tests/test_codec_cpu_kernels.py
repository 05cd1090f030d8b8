"""The fused C++ CPU kernels (memfit.codec._cpu) against the eager reference.

Round-to-nearest must be bit-identical to :mod:`memfit.codec._eager` (codes, scales,
offsets, flags and decoded values); stochastic rounding is checked for determinism,
thread-count independence, the one-step error bound and unbiasedness.
"""

from __future__ import annotations

import math

import pytest
import torch

from memfit.codec import _eager

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKS = (8, 64, 256, 2048)


@pytest.fixture(scope="module")
def cpp():
    try:
        from memfit.codec import _cpu

        return _cpu.load()
    except Exception as exc:  # no compiler / ninja: the eager fallback is tested elsewhere
        pytest.skip(f"fused CPU kernels cannot be built here: {type(exc).__name__}: {exc}")


def _data(n: int, dtype: torch.dtype, seed: int, nonfinite: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3 + 0.5
    if n > 40 and nonfinite:
        x[3] = float("nan")
        x[17] = float("inf")
        x[n // 2] = float("-inf")
        x[n - 1] = float("inf")
    if n > 200:
        x[64:128] = 0.0  # a constant block at block 8/64: scale 0
        if nonfinite:
            x[128:136] = float("nan")  # an all-non-finite block at block 8
    return x.to(dtype)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_nearest_matches_eager_bit_for_bit(cpp, bits, symmetric, dtype):
    for block in BLOCKS:
        for n in (1, 7, block - 8 if block > 8 else 5, block, 3 * block + 8, 5000, 20011):
            x = _data(n, dtype, seed=n + block)
            ref = _eager.quantize_int(x, bits, block, symmetric, False, 0)
            got = cpp.quantize_int(x, bits, block, symmetric, False, 0)
            ctx = f"n={n} block={block}"
            assert _same(got[0], ref[0]), f"codes differ, {ctx}"
            assert _same(got[1], ref[1]), f"scale differs, {ctx}"
            assert _same(got[2], ref[2]), f"lo differs, {ctx}"
            assert _same(got[3], ref[3]), f"nonfinite_block differs, {ctx}"
            for out in DTYPES:
                want = _eager.dequantize_int(ref[0], ref[1], ref[2], bits, block, n, out)
                have = cpp.dequantize_int(ref[0], ref[1], ref[2], bits, block, n, out)
                assert _same(have, want), f"decode to {out} differs, {ctx}"


def test_outputs_layout(cpp):
    x = torch.randn(1000)
    codes, scale, lo, nf = cpp.quantize_int(x, 4, 64, False, True, 5)
    assert codes.dtype == torch.uint8 and codes.shape == (16 * 64 // 2,)
    assert scale.dtype == torch.float32 and scale.shape == (16,)
    assert lo.dtype == torch.float32 and lo.shape == (16,)
    assert nf.dtype == torch.bool and nf.shape == (16,) and not nf.any()
    assert cpp.quantize_int(x, 2, 64, True, False, 0)[2] is None
    for out in DTYPES:
        y = cpp.dequantize_int(codes, scale, lo, 4, 64, 1000, out)
        assert y.dtype == out and y.shape == (1000,) and y.is_contiguous()
    empty = cpp.quantize_int(torch.empty(0), 8, 64, False, False, 0)
    assert [t.numel() for t in (empty[0], empty[1], empty[2], empty[3])] == [0, 0, 0, 0]


def _step(scale: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return scale.repeat_interleave(block)[:n]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_stochastic_deterministic_and_one_step(cpp, bits, symmetric):
    n, block = 10007, 64
    x = _data(n, torch.float32, seed=bits, nonfinite=False)
    a = cpp.quantize_int(x, bits, block, symmetric, True, 1234)
    b = cpp.quantize_int(x, bits, block, symmetric, True, 1234)
    c = cpp.quantize_int(x, bits, block, symmetric, True, 1235)
    assert all(_same(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # scale / offset do not depend on the rounding
    ref = _eager.quantize_int(x, bits, block, symmetric, False, 0)
    assert _same(a[1], ref[1]) and _same(a[2], ref[2])
    y = cpp.dequantize_int(a[0], a[1], a[2], bits, block, n, torch.float32)
    step = _step(a[1], block, n)
    assert ((y - x).abs() <= step * (1 + 1e-5) + 1e-6).all()


def test_stochastic_independent_of_thread_count(cpp):
    x = torch.randn(1 << 18)
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(cpp.quantize_int(x, 4, 256, False, True, 99)[0])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_stochastic_unbiased(cpp, symmetric, dtype):
    n, block, bits, seeds = 4096, 64, 2, 400
    x = _data(n, dtype, seed=7, nonfinite=False)
    xf = x.float()
    acc = torch.zeros(n, dtype=torch.float64)
    for s in range(seeds):
        codes, scale, lo, _ = cpp.quantize_int(x, bits, block, symmetric, True, s)
        acc += cpp.dequantize_int(codes, scale, lo, bits, block, n, torch.float32).double()
    mean = acc / seeds
    step = _step(scale, block, n).double()
    err = (mean - xf.double()) / step.clamp_min(1e-30)
    # per element the standard error is at most 0.5 / sqrt(400) = 0.025 steps
    assert err.abs().max() < 0.15, float(err.abs().max())
    assert abs(float(err.mean())) < 0.01, float(err.mean())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_matches_eager(cpp, dtype):
    for block in BLOCKS:
        for n in (1, 13, block, 3 * block + 8, 20011):
            x = _data(n, dtype, seed=n)
            ref = _eager.quantize_fp8(x, block)
            got = cpp.quantize_fp8(x, block)
            assert all(_same(p, q) for p, q in zip(got, ref)), f"n={n} block={block}"
            for out in DTYPES:
                want = _eager.dequantize_fp8(ref[0], ref[1], block, n, out)
                have = cpp.dequantize_fp8(ref[0], ref[1], block, n, out)
                assert _same(have, want), f"n={n} block={block} out={out}"


def test_bits_match_eager(cpp):
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 8, 9, 31, 32, 33, 255, 1000, 100003):
        m = torch.rand(n, generator=g) < 0.4
        packed = cpp.pack_bits(m)
        assert _same(packed, _eager.pack_bits(m))
        assert _same(cpp.unpack_bits(packed, n), _eager.unpack_bits(packed, n))
        u = m.to(torch.uint8)
        assert _same(cpp.pack_bits(u), _eager.pack_bits(u))
        junk = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)  # beyond {0, 1}
        assert _same(cpp.pack_bits(junk), _eager.pack_bits(junk))


def test_encode_decode_uses_cpp_backend(cpp, monkeypatch):
    monkeypatch.delenv("MEMFIT_KERNELS", raising=False)
    from memfit.codec import (
        BitMaskFormat, FP8Format, IntFormat, backend_name, decode, encode,
    )

    assert backend_name("cpu") == "cpu"
    x = torch.randn(3, 1001)
    x[1, 5] = float("nan")
    x[2, 7] = float("-inf")
    for fmt in (IntFormat(8, 256, "nearest"), IntFormat(4, 64, "stochastic"),
                IntFormat(2, 64, "nearest", symmetric=True), FP8Format(128)):
        for dtype in DTYPES:
            xd = x.to(dtype)
            y = decode(encode(xd, fmt, seed=3))
            assert y.shape == xd.shape and y.dtype == dtype
            finite = torch.isfinite(xd)
            assert torch.equal(finite, torch.isfinite(y))
            assert torch.equal(xd[~finite].float().nan_to_num(), y[~finite].float().nan_to_num())
            assert (y[finite].float() - xd[finite].float()).abs().max() < 2.0
    mask = torch.rand(5, 77) < 0.5
    assert torch.equal(decode(encode(mask, BitMaskFormat())), mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,stochastic", [(8, False), (4, True), (2, False)])
def test_blocks_at_the_float_limits_decode_finitely_on_both_backends(cpp, dtype, bits, stochastic, monkeypatch):
    import memfit.codec.blockwise as blockwise
    from memfit.codec import IntFormat, decode, encode

    big = torch.finfo(dtype).max
    t = torch.full((512,), big, dtype=dtype)
    t[::2] = -big
    t[256:] = torch.randn(256).to(dtype)
    fmt = IntFormat(bits, rounding="stochastic" if stochastic else "nearest")
    outs = []
    for backend in (_eager, cpp):
        monkeypatch.setattr(blockwise, "backend_for", lambda device, _b=backend: _b)
        enc = encode(t, fmt, seed=5)
        outs.append((enc, decode(enc)))
    for enc, y in outs:
        assert torch.isfinite(y).all() and torch.equal(y[:256], t[:256])
    if not stochastic:  # round-to-nearest: the two backends agree bit for bit
        (ea, ya), (eb, yb) = outs
        assert _same(ea.codes, eb.codes) and _same(ea.scale, eb.scale) and _same(ya, yb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,channels", [(1, 16), (7, 24), (300, 768), (2048, 384)])
def test_channel_absmax_matches_eager(cpp, dtype, rows, channels):
    x = _data(rows * channels, dtype, seed=rows)
    if rows > 2:
        x.view(rows, channels)[:, 2] = float("nan")  # a column of NaNs only: 0
        x.view(rows, channels)[rows // 2, 5] = -1e4  # a massive activation in one row
    expect = _eager.channel_absmax(x, channels)
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            got = cpp.channel_absmax(x, channels)
        finally:
            torch.set_num_threads(old)
        assert _same(got, expect)
    finite = x.float().view(rows, channels).nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
    assert torch.equal(expect, finite.abs().amax(dim=0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,symmetric", [(8, False), (4, True), (2, False)])
@pytest.mark.parametrize("channels,rows", [(16, 3), (100, 9), (384, 20)])
def test_channel_scaled_codes_match_eager_bit_for_bit(cpp, dtype, bits, symmetric, channels, rows):
    """Per-channel factors fused into the kernels (runs of one row, across block edges
    when a row is not a whole number of blocks) give the reference's codes and values."""
    x = _data(channels * rows, dtype, seed=channels + bits)
    col_scale = torch.rand(channels, generator=torch.Generator().manual_seed(bits)) * 50 + 0.1
    col_inv = 1.0 / col_scale
    for block in (64, 256):
        ref = _eager.quantize_int(x, bits, block, symmetric, False, 0, col_inv)
        got = cpp.quantize_int(x, bits, block, symmetric, False, 0, col_inv)
        for want, have in zip(ref, got):
            assert _same(have, want)
        for out in DTYPES:
            want = _eager.dequantize_int(ref[0], ref[1], ref[2], bits, block, x.numel(), out, col_scale)
            have = cpp.dequantize_int(ref[0], ref[1], ref[2], bits, block, x.numel(), out, col_scale)
            assert _same(have, want)
    with pytest.raises(RuntimeError, match="whole rows"):
        cpp.quantize_int(x[:-1], bits, 64, symmetric, False, 0, col_inv)
