"""memfit.integrations.lightning: MemfitCallback on tiny GPTs, and the example's core."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

L = pytest.importorskip("lightning", reason="memfit.integrations.lightning needs lightning (memfit[lightning])")
pytest.importorskip("transformers")

import memfit  # noqa: E402
from memfit.integrations import DeferredOptimizer, IncompatibleSetup  # noqa: E402
from memfit.integrations.lightning import MemfitCallback  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST_PLAN = {"step_seconds": 0.01, "max_rounds": 3}


def tiny_gpt(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2))


class GPTModule(L.LightningModule):
    def __init__(self, opt: str = "adamw", scheduler: bool = True, two_optimizers: bool = False):
        super().__init__()
        self.model = tiny_gpt()
        self.opt, self.scheduler, self.two = opt, scheduler, two_optimizers

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        if self.opt == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.05)
        elif self.opt == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)
        else:
            opt = torch.optim.RMSprop(self.parameters(), lr=1e-3)
        if self.two:
            return [opt, torch.optim.SGD(self.parameters(), lr=1e-2)]
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(n: int = 8):
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 256, (4, 64), generator=g) for _ in range(n)]
    return torch.utils.data.DataLoader(data, batch_size=None)


def fit(module, cb, steps: int = 3, **kw):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, **kw)
    trainer.fit(module, loader())
    return trainer


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------- training


def test_budget_plans_applies_and_fits():
    module = GPTModule()
    before = params_of(module)
    cb = MemfitCallback(budget="50%", measure=True, plan_kwargs=dict(FAST_PLAN, recompute=False), verbose=False)
    trainer = fit(module, cb)
    plan = cb.plan
    assert isinstance(plan, memfit.Plan) and plan.policy is not None
    assert cb.steps == 3 and cb.compressed_steps == 3
    assert any(k.startswith("int") for k in cb.stats.counts)
    # the planned optimizer replaced configure_optimizers' AdamW, the scheduler follows it
    held = trainer.optimizers[0]
    assert isinstance(held, DeferredOptimizer) and held.inner is cb.optimizer
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is held
    if plan.optimizer_in_backward:
        assert isinstance(cb.optimizer, memfit.plan.InBackwardOptimizer)
    elif plan.state_bits != 32:
        assert isinstance(cb.optimizer, memfit.optim.AdamW)
    assert held.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)  # LambdaLR after 3 steps
    assert held.param_groups[0]["weight_decay"] == 0.05
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert len(cb.meter.step_peaks) == 2
    assert 0 < cb.measured_peak_bytes <= plan.budget_bytes
    # configure_optimizers is the module's own again
    assert "configure_optimizers" not in module.__dict__


def test_budget_planned_under_autocast_runs_the_forward_in_bf16():
    """plan_kwargs={"autocast": "bf16"}: the plan is made under autocast and carries it,
    so every training forward runs in bf16 (the plan's context enters it), within the
    budget."""
    module = GPTModule()
    seen = []
    module.model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    cb = MemfitCallback(budget="60%", measure=True, plan_kwargs=dict(FAST_PLAN, autocast="bf16"), verbose=False)
    fit(module, cb)
    assert cb.plan.autocast == "bf16" and cb.plan.config.autocast == "bf16"
    assert seen[-3:] == [torch.bfloat16] * 3  # the three training forwards (planning ran before them)
    assert 0 < cb.measured_peak_bytes <= cb.plan.budget_bytes


def test_optimizer_in_backward_follows_the_schedule():
    module = GPTModule()
    cb = MemfitCallback(budget="70%", verbose=False, plan_kwargs=dict(FAST_PLAN, optimizer_in_backward=True))
    trainer = fit(module, cb)
    inner = cb.optimizer
    assert cb.plan.optimizer_in_backward and isinstance(inner, memfit.plan.InBackwardOptimizer)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3 / 4)
    # the last batch's update used the lr set after step 2 (1e-3 / 3); sync then copied 1e-3 / 4
    cb._deferred.sync()
    assert all(g["lr"] == pytest.approx(lr) for o in inner.inner_optimizers() for g in o.param_groups)
    assert all(g["weight_decay"] == 0.05 for o in inner.inner_optimizers() for g in o.param_groups)


def test_bits_and_state_bits_without_budget():
    module = GPTModule(opt="sgd")
    cb = MemfitCallback(bits=4, state_bits=8, verbose=False)
    trainer = fit(module, cb)
    assert cb.plan is None
    assert cb.steps == 3 and cb.compressed_steps == 3 and cb.stats.counts["int4"] > 0
    opt = cb.optimizer
    assert isinstance(opt, memfit.optim.SGD) and trainer.optimizers[0].inner is opt
    assert all(g["state_bits"] == 8 and g["momentum"] == 0.9 for g in opt.param_groups)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    assert len(opt.state) > 0


def test_bits_only_with_manual_optimization():
    class Manual(GPTModule):
        def __init__(self):
            super().__init__(scheduler=False)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            loss = self.model(input_ids=batch, labels=batch).loss
            self.manual_backward(loss)
            opt.step()
            return loss

    cb = MemfitCallback(bits=8, verbose=False)
    fit(Manual(), cb)
    assert cb.steps == 3 and cb.compressed_steps == 3 and cb.stats.counts["int8"] > 0


# --------------------------------------------------------------------------- refusals


def _setup(cb, module, *, strategy=None, world_size=1, accumulate=1, clip=None):
    trainer = SimpleNamespace(strategy=strategy or SimpleNamespace(), world_size=world_size,
                              accumulate_grad_batches=accumulate, gradient_clip_val=clip)
    cb.setup(trainer, module, "fit")


def test_refuses_deepspeed_and_fsdp_strategies():
    class DeepSpeedStrategy:  # the real one needs deepspeed installed
        pass

    class FSDPStrategy:
        pass

    with pytest.raises(IncompatibleSetup, match="DeepSpeed"):
        _setup(MemfitCallback(bits=8, verbose=False), GPTModule(), strategy=DeepSpeedStrategy())
    with pytest.raises(IncompatibleSetup, match="FSDPStrategy"):
        _setup(MemfitCallback(bits=8, verbose=False), GPTModule(), strategy=FSDPStrategy())
    with pytest.raises(IncompatibleSetup, match="2 processes under the SimpleNamespace strategy"):
        _setup(MemfitCallback(budget="1GB", verbose=False), GPTModule(), world_size=2)

    class DDPStrategy:
        pass

    class ModelParallelStrategy:
        pass

    # a per-rank budget under DDP and FSDP2 (tests/test_integrations_lightning_distributed.py runs them)
    for strategy in (DDPStrategy(), ModelParallelStrategy()):
        _setup(MemfitCallback(budget="1GB", verbose=False), GPTModule(), strategy=strategy, world_size=2)


def test_refuses_budget_with_manual_optimization():
    module = GPTModule()
    module.automatic_optimization = False
    with pytest.raises(IncompatibleSetup, match="manual optimization"):
        _setup(MemfitCallback(budget="1GB", verbose=False), module)


def test_refuses_forced_in_backward_with_accumulation_or_clipping():
    cb = MemfitCallback(budget="1GB", verbose=False, plan_kwargs={"optimizer_in_backward": True})
    with pytest.raises(IncompatibleSetup, match="gradient accumulation"):
        _setup(cb, GPTModule(), accumulate=2)
    with pytest.raises(IncompatibleSetup, match="gradient clipping"):
        _setup(cb, GPTModule(), clip=1.0)


def test_refuses_gradient_checkpointing_with_a_budget():
    module = GPTModule()
    module.model.gradient_checkpointing_enable()
    with pytest.raises(IncompatibleSetup, match="gradient checkpointing"):
        _setup(MemfitCallback(budget="1GB", verbose=False), module)


@pytest.mark.parametrize("module, match", [
    (lambda: GPTModule(two_optimizers=True), "2 optimizers"),
    (lambda: GPTModule(opt="rmsprop"), "RMSprop"),
])
def test_refuses_optimizers_it_cannot_replace(module, match):
    with pytest.raises(IncompatibleSetup, match=match):
        fit(module(), MemfitCallback(state_bits=8, verbose=False))


def test_refuses_a_different_optimizer_family():
    with pytest.raises(IncompatibleSetup, match="make them agree"):
        fit(GPTModule(opt="sgd"), MemfitCallback(state_bits=8, optimizer="adamw", verbose=False))


# --------------------------------------------------------------------------- the example


def test_lightning_example_core_runs():
    spec = importlib.util.spec_from_file_location("_memfit_example_lightning_gpt", ROOT / "examples" / "lightning_gpt.py")
    ex = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ex
    spec.loader.exec_module(ex)
    r = ex.run(budget="50%", steps=3, batch_size=4, seq_len=64, n_layer=2, n_embd=64, max_bytes=200_000,
               eval_batches=1, plan_kwargs=FAST_PLAN, verbose=False, measure=True)
    assert r["steps"] == 3
    assert r["measured_steps"] == 2
    assert r["measured_peak_bytes"] <= r["budget_bytes"]
    assert r["predicted_peak_bytes"] <= r["budget_bytes"] < r["plain_peak_bytes"]
