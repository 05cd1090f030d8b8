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
