"""memfit.activations on torch.compile'd models: the pack/unpack hooks run inside
compiled graphs (AOTAutograd calls them on the tensors the graph saves)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import memfit

transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=128,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).train()


IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def grads(model, run, compressor=None):
    model.zero_grad(set_to_none=True)
    with compressor if compressor is not None else contextlib.nullcontext():
        loss = run(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_whole_model_compile_compresses_and_warns_that_rules_cannot_apply():
    torch._dynamo.reset()
    model = tiny_gpt2()
    compiled = torch.compile(model)
    grads(model, compiled)  # compile, warm up
    loss0, g0 = grads(model, compiled)

    keep = memfit.activations(model, bits=None, min_bytes=0)
    loss1, g1 = grads(model, compiled, keep)
    # Inductor's CPU reductions are not bit-reproducible from one call to the next (two
    # plain compiled calls differ by ~1e-9 relative), so "unchanged" is up to that.
    assert torch.equal(loss0, loss1)
    assert ((g1 - g0).norm() / g0.norm()).item() < 1e-6, "bits=None must not change a compiled step"
    assert keep.stats.counts["kept"] > 0, "the hooks must fire inside the compiled graph"

    mf = memfit.activations(model, bits=2, min_bytes=0)
    with pytest.warns(RuntimeWarning, match="torch.compile"):
        loss2, g2 = grads(model, compiled, mf)
    assert torch.equal(loss0, loss2)
    assert mf.stats.counts["int2"] > 0 and mf.stats.ratio > 8
    assert ((g2 - g0).norm() / g0.norm()).item() < 1.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per context, not every step
        grads(model, compiled, mf)

    mf8 = memfit.activations(model, bits=8, min_bytes=0)
    _, g8 = grads(model, compiled, mf8)
    assert ((g8 - g0).norm() / g0.norm()).item() < 0.03


def test_blocks_compiled_one_by_one_keep_per_module_rules():
    torch._dynamo.reset()
    model = tiny_gpt2()
    for block in model.transformer.h:
        block.compile()
    mf = memfit.activations(model, bits=2, min_bytes=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        grads(model, model, mf)
    by_module = mf.stats.by_module
    assert by_module["transformer.h.1"].counts["int2"] > 0
    assert by_module["lm_head"].counts["int8"] == 1  # the loss head rule still applies
