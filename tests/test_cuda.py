"""memfit's paths on a real CUDA device, end to end: the codec and the optimizers
through the backend ``auto`` picks there (Triton, compiled) against the eager
reference on the same device, and activation offload (side streams, pinned memory)
against plain autograd.

Every test needs a GPU and is skipped without one. The kernels' own bit-for-bit tests
are in tests/test_triton_kernels.py (under Triton's interpreter on CPU); the offload
logic's CPU tests are in tests/test_offload.py.
"""

from __future__ import annotations

import pytest
import torch

import memfit
from memfit.activations import Offload
from memfit.codec import IntFormat, decode, encode
from test_activations import grads_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: compiled kernels, side streams and pinned memory")

DEVICE = "cuda"


def _encoded_tensors(enc):
    return [getattr(enc, n) for n in ("codes", "scale", "lo", "nonfinite_index", "nonfinite_value")]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_codec_round_to_nearest_is_bit_identical_to_eager(bits, monkeypatch):
    g = torch.Generator(device=DEVICE).manual_seed(bits)
    x = torch.randn(1 << 20, device=DEVICE, generator=g) * 3
    x[::997] = 1e4  # outliers set some blocks' scale
    fmt = IntFormat(bits=bits, rounding="nearest")
    fast = encode(x, fmt)
    monkeypatch.setenv("MEMFIT_KERNELS", "eager")
    ref = encode(x, fmt)
    for a, b in zip(_encoded_tensors(fast), _encoded_tensors(ref)):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    assert torch.equal(decode(ref), decode(fast))


def test_codec_backend_on_cuda_is_named():
    name = memfit.codec.backend_name(DEVICE)
    assert name in ("triton", "eager")


@pytest.mark.parametrize("bits", [8, 4])
def test_adamw_steps_are_bit_identical_to_eager(bits, monkeypatch):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    start = [torch.randn(256, 512, device=DEVICE, generator=g) for _ in range(3)]
    grads = [[torch.randn(256, 512, device=DEVICE, generator=g) * 1e-2 for _ in range(3)] for _ in range(3)]

    def run():
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = memfit.optim.AdamW(ps, lr=1e-3, state_bits=bits)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.clone()
            opt.step()
        return ps

    fast = run()
    monkeypatch.setenv("MEMFIT_KERNELS", "eager")
    ref = run()
    for a, b in zip(fast, ref):
        assert torch.equal(a, b)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=1024, n_positions=256,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).to(DEVICE).train()
    ids = torch.randint(0, 1024, (4, 256), device=DEVICE)
    return model, {"input_ids": ids, "labels": ids}


def _grads(model, batch, mf=None):
    return grads_of(model, batch, mf)[1]


@pytest.mark.parametrize("prefetch", [0, 2, 8])
def test_offload_gradients_identical_to_plain(prefetch):
    model, batch = _gpt2()
    plain = _grads(model, batch)
    mf = memfit.activations(model, "offload", offload=Offload(prefetch=prefetch))
    for _ in range(3):  # reused pinned blocks and streams, step after step
        got = _grads(model, batch, mf)
        assert all(torch.equal(a, b) for a, b in zip(got, plain))
    st = mf.stats
    assert st.host_bytes > 0 and st.counts["offloaded"] > 0
    assert st.stored_bytes < 0.25 * st.original_bytes


def test_offload_after_coding_identical_to_coding_alone():
    model, batch = _gpt2()
    coded = _grads(model, batch, memfit.activations(model, 4, seed=5))
    off = _grads(model, batch, memfit.activations(model, "offload:4", seed=5))
    assert all(torch.equal(a, b) for a, b in zip(off, coded))


def test_offload_survives_a_busy_compute_stream():
    # The copy out must wait for the kernel producing the tensor, and the block must
    # not be reused before the copy has read it: a long matmul queued right before
    # the forward makes either race show up as wrong gradients.
    model, batch = _gpt2()
    plain = _grads(model, batch)
    mf = memfit.activations(model, "offload", offload=Offload(prefetch=1))
    big = torch.randn(4096, 4096, device=DEVICE)
    for _ in range(3):
        for _ in range(4):
            big = big @ big / 64
        got = _grads(model, batch, mf)
        assert all(torch.equal(a, b) for a, b in zip(got, plain))


def test_offload_lowers_the_device_peak():
    model, batch = _gpt2()

    def peak(mf):
        _grads(model, batch, mf)  # warm up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _grads(model, batch, mf)
        return torch.cuda.max_memory_allocated()

    plain = peak(None)
    offloaded = peak(memfit.activations(model, "offload"))
    assert offloaded < plain


def test_offload_under_autocast():
    model, batch = _gpt2()

    def run(mf):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _grads(model, batch, mf)

    plain = run(None)
    got = run(memfit.activations(model, "offload"))
    assert all(torch.equal(a, b) for a, b in zip(got, plain))


def test_estimate_counts_offloaded_bytes_on_the_host():
    model, batch = _gpt2()
    plain = memfit.estimate(model, batch)
    off = memfit.estimate(model, batch, policy="offload")
    assert off.host_bytes > 0
    assert off.activation_bytes < plain.activation_bytes
    assert off.reserved_bytes >= off.peak_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_with_dropout_recomputes_the_forward_mask_on_cuda(dtype):
    # A fused kernel with dropout (flash / efficient) draws its mask from the CUDA
    # generator: the recomputation restores that state, so without memfit's hooks the
    # output, the gradients and the RNG streams after forward and backward all match
    # plain autograd.
    import torch.nn.functional as F
    from memfit.activations.dropout_attention import recomputed_attention

    g = torch.Generator(device=DEVICE).manual_seed(0)
    q0, k0, v0, w = (torch.randn(2, 4, 256, 64, device=DEVICE, generator=g, dtype=dtype) for _ in range(4))

    def run(fn):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        torch.manual_seed(3)
        out = fn(q, k, v)
        after_forward = torch.rand(4, device=DEVICE)
        (out * w).float().sum().backward()
        return out.detach(), [q.grad, k.grad, v.grad], after_forward, torch.rand(4, device=DEVICE)

    kw = {"dropout_p": 0.2, "is_causal": True}
    ref = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw))
    got = run(lambda q, k, v: recomputed_attention((q, k, v), dict(kw)))
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])
    for a, b in zip(got[1], ref[1]):
        torch.testing.assert_close(a, b)
    mf = memfit.activations(bits=4, min_bytes=0)
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    with mf:
        F.scaled_dot_product_attention(q * 1, k * 1, v * 1, **kw)
    assert mf.stats.by_op["sdpa"].counts["op-recomputed"] == 1
