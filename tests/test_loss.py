"""memfit.causal_lm_loss: the chunked loss equals the model's own, in value and
gradients, holds less at its peak, and refuses what it cannot compute."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig
from transformers import LlamaForCausalLM, RobertaConfig, RobertaForCausalLM

import memfit


def gpt2(vocab=1000, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=500, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def batch_for(vocab, b=3, t=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :7] = -100  # ignored positions count neither in the sum nor in the mean
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("make,vocab", [(gpt2, 1000), (llama, 500)])
@pytest.mark.parametrize("chunk_bytes", [4 * 1000 * 7, 32 * 2**20])
def test_equals_model_loss_and_gradients(make, vocab, chunk_bytes):
    m1, m2 = make(), make()
    batch = batch_for(vocab)
    ref = m1(**batch).loss
    ref.backward()
    got = memfit.causal_lm_loss(chunk_bytes=chunk_bytes)(m2, batch)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_holds_less_than_full_logits():
    model = gpt2(vocab=8000)
    batch = batch_for(8000, b=4, t=64)
    plain = memfit.estimate(model, batch)
    chunked = memfit.estimate(model, batch, loss_fn=memfit.causal_lm_loss(chunk_bytes=64 * 8000 * 4))
    logits = 4 * 64 * 8000 * 4
    # at least one full-logits tensor less at the peak (plain holds two or three)
    assert chunked.peak_bytes < plain.peak_bytes - logits


def test_bad_input():
    with pytest.raises(ValueError, match="chunk_bytes"):
        memfit.causal_lm_loss(chunk_bytes=0)
    loss_fn = memfit.causal_lm_loss()
    model = gpt2()
    with pytest.raises(ValueError, match="labels"):
        loss_fn(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="do not match"):
        loss_fn(model, {"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 5, dtype=torch.long)})
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=100))
    with pytest.raises(ValueError, match="ForCausalLM"):  # not a causal LM
        loss_fn(bert, {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)})
    roberta = RobertaForCausalLM(RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=64, vocab_size=100, is_decoder=True))
    with pytest.raises(ValueError, match="plain nn.Linear"):  # dense + norm before its output layer
        loss_fn(roberta, {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)})
    capped = gpt2()
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="softcapping"):
        loss_fn(capped, batch_for(1000))


def test_padding_mask_and_num_items_in_batch_like_transformers():
    model = gpt2()
    batch = batch_for(1000)
    mask = torch.ones_like(batch["input_ids"])
    mask[1, 30:] = 0
    labels = batch["labels"].clone()
    labels[1, 30:] = -100
    padded = {"input_ids": batch["input_ids"], "attention_mask": mask, "labels": labels}
    loss_fn = memfit.causal_lm_loss(chunk_bytes=4 * 1000 * 16)
    assert loss_fn(model, padded).item() == pytest.approx(model(**padded).loss.item(), rel=1e-5)
    # gradient accumulation: transformers divides by the items of all micro-batches
    n = torch.tensor(500)
    ref = model(**padded, num_items_in_batch=n).loss
    got = loss_fn(model, {**padded, "num_items_in_batch": n})
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_matches_autograd_with_bias(dtype):
    from memfit.loss import _LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(50, 16, generator=g)).to(dtype).requires_grad_()
    b = torch.randn(50, generator=g).to(dtype).requires_grad_()
    y = torch.randint(0, 50, (37,), generator=g)
    y[::5] = -100
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b).float(), y, reduction="sum")
    ref_grads = torch.autograd.grad(2.5 * ref, (h, w, b))
    got = _LinearCrossEntropy.apply(h, y, w, b, 8)  # 5 chunks, the last one short
    got_grads = torch.autograd.grad(2.5 * got, (h, w, b))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert torch.allclose(got, ref, **tol)
    for name, a, c in zip("hwb", got_grads, ref_grads):
        assert a.dtype == dtype
        assert torch.allclose(a.float(), c.float(), **tol), name


def test_weight_gradient_held_once_however_many_chunks():
    """Backward adds every chunk's output-layer gradient into one tensor: the peak does
    not grow with the number of chunks (autograd's own sum of per-chunk gradients would
    hold three weight-sized tensors at once)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=32, vocab_size=20000, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    batch = batch_for(20000, b=2, t=16)
    # optimizer in backward: the peak is in backward, where the loss head's gradients are
    kw = dict(optimizer="sgd", state_bits=8, optimizer_in_backward=True)
    one = memfit.estimate(model, batch, loss_fn=memfit.causal_lm_loss(chunk_bytes=32 * 20000 * 4), **kw)
    many = memfit.estimate(model, batch, loss_fn=memfit.causal_lm_loss(chunk_bytes=4 * 20000 * 4), **kw)
    weight = 20000 * 64 * 4
    assert many.peak_bytes <= one.peak_bytes + 0.1 * weight


# --------------------------------------------------------------------------- peft


def lora_llama(task_type=None, seed=0, **lora):
    peft = pytest.importorskip("peft", reason="LoRA adapters come from peft")
    # init_lora_weights=False: B != 0, so the adapters change the loss and get gradients
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type=task_type,
                          **lora)
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(llama(seed), cfg)


@pytest.mark.parametrize("task_type, base_bits", [
    (None, None),  # PeftModel
    ("CAUSAL_LM", None),  # PeftModelForCausalLM
    (None, 8),  # the frozen base, output layer included, held in 8 bits by memfit.weights
])
def test_peft_lora_model_same_loss_and_adapter_gradients(task_type, base_bits):
    """The chunked loss equals the model's own on a peft LoRA model; with a compressed
    base it runs the output layer's decoding forward, on the same codes."""
    m1, m2 = lora_llama(task_type), lora_llama(task_type)
    if base_bits is not None:
        for m in (m1, m2):
            memfit.weights(m, bits=base_bits)
            assert m.get_base_model().lm_head._parameters.get("weight") is None
    batch = batch_for(500)
    ref = m1(**batch).loss
    ref.backward()
    got = memfit.causal_lm_loss(chunk_bytes=4 * 500 * 16)(m2, batch)
    got.backward()
    assert abs(got.item() - ref.item()) <= 1e-5, (got.item(), ref.item())
    trained = [(n, a, b) for (n, a), b in zip(m1.named_parameters(), m2.parameters()) if a.requires_grad]
    assert trained and all("lora_" in n for n, _, _ in trained)
    for name, a, b in trained:
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
    assert all(p.grad is None for p in m2.parameters() if not p.requires_grad)  # the frozen head included


def test_peft_lora_model_plans_with_the_chunked_loss():
    model = lora_llama()
    batch = batch_for(500, b=4, t=64)
    loss_fn = memfit.causal_lm_loss(chunk_bytes=4 * 500 * 32)
    plain = memfit.plan.measure_peak(model, batch, loss_fn=loss_fn).peak_bytes
    budget = int(0.7 * plain)
    # chunked, the logits are never whole: less than the model's own loss holds
    assert memfit.estimate(model, batch, loss_fn=loss_fn).peak_bytes < memfit.estimate(model, batch).peak_bytes
    p = memfit.plan(model, batch, budget, loss_fn=loss_fn, step_seconds=0.01, max_rounds=3)
    p.compress_weights()  # what the first `with p:` does: the plan's frozen-weight formats, if any
    assert memfit.plan.measure_peak(model, batch, p.config, loss_fn=loss_fn).peak_bytes <= budget


def test_peft_refusals_name_the_cause():
    peft = pytest.importorskip("peft", reason="LoRA adapters come from peft")
    batch = batch_for(500)
    head_lora = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="inside PeftModel, output layer peft.tuners.lora.layer.Linear"):
        memfit.causal_lm_loss()(head_lora, batch)
    prefix = peft.get_peft_model(llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="prompt-learning adapter"):
        memfit.causal_lm_loss()(prefix, batch)
