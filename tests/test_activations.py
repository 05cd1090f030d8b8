"""The saved-tensor engine on real models: gradients, policies, dedupe, errors, odd tensors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import memfit

transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=128,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).train()


def tiny_bert():
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        vocab_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg).train()


def batch(n=4, seq=32):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (n, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def grads_of(model, data, compressor=None):
    model.zero_grad(set_to_none=True)
    if compressor is None:
        loss = model(**data).loss
    else:
        with compressor:
            loss = model(**data).loss
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def rel_err(a, b):
    a = torch.cat([t.flatten() for t in a])
    b = torch.cat([t.flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert], ids=["gpt2", "bert"])
def test_bits_none_is_bit_identical(make):
    model, data = make(), batch()
    loss0, g0 = grads_of(model, data)
    mf = memfit.activations(model, bits=None, min_bytes=0)
    loss1, g1 = grads_of(model, data, mf)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert mf.stats.original_bytes == mf.stats.stored_bytes > 0


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert], ids=["gpt2", "bert"])
# 2 bits: the linears' inputs take 4 (the op table), which costs the tiny GPT-2 about a tenth
@pytest.mark.parametrize("bits,tol,min_ratio", [(8, 0.03, 3.5), ("fp8", 0.1, 3.5), (4, 0.35, 6.0), (2, 1.2, 9.5)])
def test_compressed_gradients_are_close(make, bits, tol, min_ratio):
    model, data = make(), batch()
    loss0, g0 = grads_of(model, data)
    mf = memfit.activations(model, bits=bits, min_bytes=0)
    loss1, g1 = grads_of(model, data, mf)
    assert torch.equal(loss0, loss1), "the forward pass must be untouched"
    assert rel_err(g1, g0) < tol
    if make is tiny_bert:
        # Without dropout BERT's attention runs as a fused kernel, whose q, k and output
        # the op table keeps at 8 bits, or bf16 at 8-bit settings (memfit.activations.ops);
        # in this tiny model attention is about half of what is saved.
        min_ratio = {8: 3.2, "fp8": 3.2, 4: 5.0, 2: 6.3}[bits]
    assert mf.stats.ratio >= min_ratio * 0.9  # tiny model: int64 ids and tiny stats dilute it


def test_gradient_error_shrinks_with_bits():
    model, data = tiny_gpt2(), batch()
    _, g0 = grads_of(model, data)
    errs = [rel_err(grads_of(model, data, memfit.activations(model, bits=b, min_bytes=0))[1], g0) for b in (8, 4, 2)]
    assert errs[0] < errs[1] < errs[2]


def test_unbiased_weight_gradient_error_shrinks_as_one_over_sqrt_k():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 8))
    x = torch.randn(64, 32)
    y = torch.randn(64, 8)

    def weight_grad(compressor=None):
        model.zero_grad()
        if compressor is None:
            loss = nn.functional.mse_loss(model(x), y)
        else:
            with compressor:
                loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return model[2].weight.grad.clone()

    exact = weight_grad()
    # The linears' inputs at 2 bits (the op table gives them 4): their stochastic codes
    # are the subject here, and must dominate the few-bit GELU derivative's fixed error.
    samples = torch.stack([weight_grad(memfit.activations(model, bits=2, policy={"op:linear": 2}, min_bytes=0, seed=s))
                           for s in range(256)])
    err = {}
    for k in (4, 16, 64, 256):
        # average over disjoint groups of k seeds to smooth the estimate
        groups = samples[: (256 // k) * k].view(256 // k, k, *exact.shape).mean(1)
        err[k] = ((groups - exact).norm(dim=(1, 2)) / exact.norm()).mean().item()
    slope = (math.log(err[256]) - math.log(err[4])) / (math.log(256) - math.log(4))
    assert -0.65 < slope < -0.35, (slope, err)
    assert err[256] < err[4] / 5


def test_inplace_modification_raises_like_pytorch():
    def run(compress):
        a = torch.randn(64, 64, requires_grad=True)
        ctx = memfit.activations(bits=8, min_bytes=0) if compress else memfit.activations(bits=None)
        with ctx:
            b = a.exp()  # exp saves its output
        b.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
            b.sum().backward()
        return str(info.value)

    plain = run(False)
    compressed = run(True)
    assert "is at version 1; expected version 0 instead" in plain
    assert "is at version 1; expected version 0 instead" in compressed


def test_inplace_modification_of_dead_tensor_still_raises():
    a = torch.randn(64, 64, requires_grad=True)
    with memfit.activations(bits=4, min_bytes=0):
        b = a.exp()
        c = b * 3
    b.add_(1)
    del b  # the original is gone; the version check must still see the change
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        c.sum().backward()


def test_parameters_are_never_compressed_or_copied():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    seen = []
    mf = memfit.activations(model, bits=2, min_bytes=0)
    orig = mf._pack

    def spy(t):
        packed = orig(t)
        seen.append((t, packed))
        return packed

    mf._pack = spy
    with mf:
        loss = model(torch.randn(16, 128)).sum()
    weight_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept_params = [p for t, p in seen if t.untyped_storage().data_ptr() in weight_ptrs]
    assert kept_params and all(type(p).__name__ == "_Kept" for p in kept_params)
    assert all(p.tensor.untyped_storage().data_ptr() in weight_ptrs for p in kept_params)
    assert mf.stats.counts["param"] == len(kept_params)
    loss.backward()


def test_views_of_one_storage_are_stored_once():
    x = torch.randn(8, 64, 3 * 256, requires_grad=True)
    mf = memfit.activations(bits=8, min_bytes=0, rounding="nearest")
    with mf:
        qkv = x * 1.5  # one storage
        q, k, v = qkv.split(256, dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # strided views
        out = (q.sin() + k.cos() + v.pow(3) + q.pow(2)).sum()  # each saves its input view
    # q, k and v are each a third of the storage: each encoded on its own (elements
    # outside a saved view never share its blocks); q saved twice is encoded once.
    assert mf.stats.counts["int8"] == 3 and mf.stats.counts["shared"] == 1
    assert mf.stats.original_bytes == qkv.numel() * 4 + x.numel() * 0  # storage counted once
    assert mf.stats.stored_bytes < qkv.numel() * 4 / 3.5
    out.backward()
    exact = torch.autograd.grad((x * 1.5).split(256, -1)[0].transpose(1, 2).sin().sum()
                                + (x * 1.5).split(256, -1)[1].transpose(1, 2).cos().sum()
                                + (x * 1.5).split(256, -1)[2].transpose(1, 2).pow(3).sum()
                                + (x * 1.5).split(256, -1)[0].transpose(1, 2).pow(2).sum(), x)[0]
    assert rel_err([x.grad], [exact]) < 0.01


def test_small_tensors_are_kept():
    x = torch.randn(4, 4, requires_grad=True)
    mf = memfit.activations(bits=2)  # default min_bytes is far above 64 bytes
    with mf:
        y = x.exp().sum()
    assert mf.stats.counts["small"] >= 1 and mf.stats.ratio == 1.0
    y.backward()
    assert torch.allclose(x.grad, x.exp())


def test_bool_masks_are_one_bit_and_lossless():
    x = torch.randn(256, 256, requires_grad=True)
    mask = torch.rand(256, 256) > 0.5
    mf = memfit.activations(bits=8, min_bytes=0)
    with mf:
        y = torch.where(mask, x, 0.0).sum()  # where saves the bool condition
    y.backward()
    assert mf.stats.counts["mask"] == 1
    assert torch.equal(x.grad, mask.float())


def test_policy_globs_choose_formats_per_module():
    model = tiny_gpt2()
    mf = memfit.activations(
        model, bits=8, policy={"transformer.h.*.attn": 4, "*.mlp": 2, "lm_head": None}, min_bytes=0
    )
    assert mf.format_for("transformer.h.0.attn").bits == 4
    assert mf.format_for("transformer.h.0.attn.c_attn").bits == 4  # inherited from the parent
    assert mf.format_for("transformer.h.1.mlp.act").bits == 2
    assert mf.format_for("lm_head").bits is None
    assert mf.format_for("transformer.wte").bits == 8
    _, g = grads_of(model, batch(), mf)
    kinds = mf.stats.by_module
    # gelu_new is stored as its input's 2-bit derivative level (the op table's gelu)
    assert "op-fewbit2" in kinds["transformer.h.0.mlp.act"].counts
    assert any("int4" in m.counts for n, m in kinds.items() if ".attn" in n)


def _int_kinds(stats, name):
    return {k for k in stats.by_module[name].counts if k.startswith("int")}


def test_loss_head_stays_at_8_bits_below_8():
    model, data = tiny_gpt2(), batch()
    mf = memfit.activations(model, bits=2, min_bytes=0)
    grads_of(model, data, mf)
    grads_of(model, data, mf)  # a second forward starts in the blocks again
    stats = mf.stats
    # After the last block: final norm, output layer and the loss (in the root's forward).
    for name in ("transformer.ln_f", "lm_head", ""):
        assert _int_kinds(stats, name) == {"int8"}, name
    # (the attention module itself also holds the op table's 8-bit q, k and output)
    for name in ("transformer.h.1.mlp.c_fc", "transformer.h.1.attn.c_proj"):
        assert _int_kinds(stats, name) == {"int4"}, name  # the op table: a linear's input
    # gelu_new, written as plain ops: its input as a 2-bit derivative level, its four
    # saved tensors recomputed from it in backward
    act = stats.by_module["transformer.h.1.mlp.act"].counts
    assert (act["op-fewbit2"], act["op-recomputed"], _int_kinds(stats, "transformer.h.1.mlp.act")) == (1, 4, set())
    assert _int_kinds(stats, "transformer.h.0.ln_1") == {"int4"}  # the op table: a norm's input
    assert mf.head_format.bits == 8 and mf.head_format.rounding == "stochastic"


def test_head_bits_equal_to_bits_quantizes_everything_alike():
    model, data = tiny_gpt2(), batch()
    mf = memfit.activations(model, bits=2, head_bits=2, min_bytes=0,
                            policy={"op:sdpa": 2, "op:norm": 2, "op:linear": 2})
    grads_of(model, data, mf)
    kinds = set().union(*(_int_kinds(mf.stats, n) for n in mf.stats.by_module))
    assert kinds == {"int2"}


@pytest.mark.parametrize("bits", [8, "fp8", None])
def test_no_head_rule_at_8_bits_and_above(bits):
    assert memfit.activations(tiny_gpt2(), bits=bits).head_format is None


def test_policy_rules_beat_the_head_rule():
    model, data = tiny_gpt2(), batch()
    mf = memfit.activations(model, bits=2, policy={"lm_head": 4, "transformer.*": 2, "op:norm": 2}, min_bytes=0)
    grads_of(model, data, mf)
    assert _int_kinds(mf.stats, "lm_head") == {"int4"}
    assert _int_kinds(mf.stats, "transformer.ln_f") == {"int2"}  # inherits the transformer.* rule
    assert _int_kinds(mf.stats, "") == {"int8"}  # the loss: no rule names the root


@pytest.mark.parametrize("head_bits,head_kind", [("auto", "int8"), (2, "int2")])
def test_op_keys_do_not_lower_the_loss_head(head_bits, head_kind):
    model, data = tiny_gpt2(), batch()
    mf = memfit.activations(model, bits=2, head_bits=head_bits, policy={"op:linear": 2}, min_bytes=0)
    grads_of(model, data, mf)
    assert _int_kinds(mf.stats, "transformer.h.1.mlp.c_fc") == {"int2"}  # the key, in the blocks
    assert _int_kinds(mf.stats, "lm_head") == {head_kind}  # head_bits sets the head
    exact = memfit.activations(model, bits=2, policy={"op:linear": None}, min_bytes=0)
    grads_of(model, data, exact)
    assert "int8" not in exact.stats.by_module["lm_head"].counts  # a finer key applies in the head too


def test_op_keys_do_not_lower_a_module_rule():
    model, data = tiny_gpt2(), batch()
    mf = memfit.activations(model, bits=2, policy={"transformer.h.0*": None, "transformer.h.1*": 8,
                                                   "op:linear": 2}, min_bytes=0)
    grads_of(model, data, mf)
    assert _int_kinds(mf.stats, "transformer.h.0.mlp.c_fc") == set()  # kept exact, as its rule says
    assert _int_kinds(mf.stats, "transformer.h.1.mlp.c_fc") == {"int8"}
    finer = memfit.activations(model, bits=2, policy={"transformer.h.1*": 8, "op:linear": None}, min_bytes=0)
    grads_of(model, data, finer)
    assert _int_kinds(finer.stats, "transformer.h.1.mlp.c_fc") == set()  # a finer key still applies


def test_head_without_module_list_is_code_outside_submodules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(128, 64, requires_grad=True)
    mf = memfit.activations(model, bits=2, min_bytes=0, policy={"op:linear": 2})
    with mf:
        loss = torch.log_softmax(model(x), dim=-1).exp().sum()  # saved outside every submodule
    loss.backward()
    assert _int_kinds(mf.stats, "") == {"int8"}
    assert _int_kinds(mf.stats, "2") == {"int2"}  # (module "1", the GELU, stores few-bit levels)


def test_invalid_head_bits_raise():
    with pytest.raises(ValueError, match="head_bits"):
        memfit.activations(tiny_gpt2(), bits=2, head_bits=3)


@pytest.mark.parametrize("bad", [3, 16, "int4", 8.0, True])
def test_invalid_bits_raise_naming_the_entry(bad):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"policy\['\*\.mlp'\]"):
        memfit.activations(model, policy={"*.mlp": bad})
    with pytest.raises(ValueError, match="bits"):
        memfit.activations(model, bits=bad)


def test_strict_policy_rejects_glob_matching_nothing():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="'encoder.*'"):
        memfit.activations(model, policy={"*.mlp": 4, "encoder.*": 2}, strict=True)
    memfit.activations(model, policy={"*.mlp": 4, "encoder.*": 2})  # lenient by default


def test_policy_without_model_is_refused():
    with pytest.raises(ValueError, match="needs the model"):
        memfit.activations(policy={"*": 4})


def test_context_is_reusable_and_stats_reset():
    model, data = tiny_gpt2(), batch()
    mf = memfit.activations(model, bits=4, min_bytes=0)
    grads_of(model, data, mf)
    first = mf.stats.original_bytes
    grads_of(model, data, mf)
    assert mf.stats.original_bytes == first


def test_codec_time_is_counted_per_module_in_forward_and_backward():
    model, data = tiny_gpt2(), batch()
    mf = memfit.activations(model, bits=4, min_bytes=0)
    with mf:
        loss = model(**data).loss
    assert mf.stats.encode_seconds > 0
    assert mf.stats.decode_seconds == 0  # nothing decoded before backward
    loss.backward()  # outside the block: decodes still land in its stats
    assert mf.stats.decode_seconds > 0
    mods = mf.stats.by_module.values()
    assert math.isclose(mf.stats.encode_seconds, sum(m.encode_seconds for m in mods))
    assert all(m.encode_seconds > 0 for m in mods if m.stored_bytes < m.original_bytes)
    kept = memfit.activations(model, bits=None, min_bytes=0)
    grads_of(model, data, kept)
    assert kept.stats.encode_seconds == 0 and kept.stats.decode_seconds == 0
    first = mf.stats
    spent = (first.encode_seconds, first.decode_seconds)
    grads_of(model, data, mf)  # a new block counts in new stats; the old ones stay as they were
    assert mf.stats is not first and mf.stats.encode_seconds > 0 and mf.stats.decode_seconds > 0
    assert (first.encode_seconds, first.decode_seconds) == spent
    # times are measurements: the same step's stats compare equal across runs
    assert mf.stats.by_module == first.by_module


def test_backward_outside_context_and_twice_with_retain_graph():
    x = torch.randn(64, 64, requires_grad=True)
    with memfit.activations(bits=8, min_bytes=0, rounding="nearest"):
        y = x.sigmoid().sum()
    y.backward(retain_graph=True)
    g1 = x.grad.clone()
    y.backward()
    assert torch.allclose(x.grad, 2 * g1)


def test_unhandled_tensor_kinds_are_kept_losslessly():
    # complex
    z = torch.randn(64, 64, dtype=torch.complex64, requires_grad=True)
    mf = memfit.activations(bits=2, min_bytes=0)
    with mf:
        out = (z * z.sin()).real.sum()  # only complex tensors are saved
    out.backward()
    assert mf.stats.counts["raw"] >= 1  # z.sin(); z itself is a leaf, kept by reference
    z2 = z.detach().clone().requires_grad_()
    (z2 * z2.sin()).real.sum().backward()
    assert torch.equal(z.grad, z2.grad)
    # sparse (a non-leaf sparse tensor, so it is an activation, not a parameter)
    s_leaf = torch.randn(64, 64).relu().to_sparse().requires_grad_()
    w = torch.randn(64, 32, requires_grad=True)
    mf = memfit.activations(bits=2, min_bytes=0)
    with mf:
        out = torch.sparse.mm(s_leaf * 2.0, w).sum()
    out.backward()
    assert mf.stats.counts["raw"] >= 1
    s2 = s_leaf.detach().clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    torch.sparse.mm(s2 * 2.0, w2).sum().backward()
    assert torch.equal(w.grad, w2.grad)
    assert torch.equal(s_leaf.grad.to_dense(), s2.grad.to_dense())


def test_nested_tensors_are_kept():
    a = torch.randn(3, 16, requires_grad=True)
    b = torch.randn(5, 16, requires_grad=True)
    mf = memfit.activations(bits=2, min_bytes=0)
    with mf:
        nt = torch.nested.as_nested_tensor([a, b])
        out = (nt.sin()).to_padded_tensor(0.0).sum()
    out.backward()
    assert torch.allclose(a.grad, a.detach().cos()) and torch.allclose(b.grad, b.detach().cos())


def test_tensor_subclass_is_kept():
    from torch.testing._internal.two_tensor import TwoTensor

    x = TwoTensor(torch.randn(32, 32), torch.randn(32, 32)).requires_grad_()
    mf = memfit.activations(bits=2, min_bytes=0)
    with mf:
        out = x.exp().sum()
    out.backward()
    assert mf.stats.counts["raw"] >= 1
    assert torch.allclose(x.grad.a, x.a.exp()) and torch.allclose(x.grad.b, x.b.exp())


def test_dtensor_is_kept(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    started = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
        started = True
    try:
        mesh = init_device_mesh("cpu", (1,))
        x = distribute_tensor(torch.randn(64, 64), mesh, [Replicate()]).requires_grad_()
        mf = memfit.activations(bits=2, min_bytes=0)
        with mf:
            out = x.exp().sum()
        out.backward()
        assert mf.stats.counts["raw"] >= 1
        assert torch.allclose(x.grad.full_tensor(), x.full_tensor().exp())
    finally:
        if started:
            dist.destroy_process_group()


def test_bf16_and_fp16_activations():
    for dtype in (torch.bfloat16, torch.float16):
        lin = nn.Linear(128, 128).to(dtype)
        x = torch.randn(64, 128, dtype=dtype)
        mf = memfit.activations(lin, bits=8, min_bytes=0)
        with mf:
            out = lin(x).float().pow(2).sum()
        out.backward()
        assert mf.stats.counts.get("int8", 0) >= 1
        assert lin.weight.grad.dtype == dtype
