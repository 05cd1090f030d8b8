"""memfit.plan.estimate / measure_peak / profile and the shared step mechanics.

Tiny models (GPT-2, BERT, ResNet from transformers config classes, random init) so
each test takes a few seconds; the estimate must be within 5% of the real measured
peak (it is usually exact)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import memfit  # noqa: E402
from memfit.plan import StepConfig, estimate, make_optimizer, measure_peak, preserved_state, run_step  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
try:
    transformers.utils.logging.set_verbosity_error()
except Exception:  # pragma: no cover
    pass

TOL = 0.05


# --------------------------------------------------------------------------- models


def tiny_gpt2(device="cpu"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=512)
    with torch.device(device):
        model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1), device=device)
    return model, {"input_ids": ids, "labels": ids}


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=512, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(cfg)
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


def tiny_resnet():
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=8, num_labels=10)
    model = transformers.ResNetForImageClassification(cfg)
    g = torch.Generator().manual_seed(1)
    return model, {"pixel_values": torch.randn(2, 3, 64, 64, generator=g), "labels": torch.randint(0, 10, (2,), generator=g)}


MODELS = {"gpt2": tiny_gpt2, "bert": tiny_bert, "resnet": tiny_resnet}
CKPT = {"gpt2": ("transformer.h.0", "transformer.h.1"), "bert": ("bert.encoder.layer.0",),
        "resnet": ("resnet.encoder.stages.0", "resnet.encoder.stages.1")}


def close(est, meas) -> bool:
    return abs(est.peak_bytes / meas.peak_bytes - 1) <= TOL


# --------------------------------------------------------------------------- estimate vs measured


CASES = [
    ("gpt2", dict()),
    ("gpt2", dict(policy=4, state_bits=8)),
    ("gpt2", dict(checkpoint="ckpt", optimizer_in_backward=True)),
    ("bert", dict(policy=2, optimizer="sgd", state_bits=4)),
    ("bert", dict(policy={"bert.encoder.*": 4}, optimizer="lion", state_bits=8, checkpoint="ckpt")),
    ("resnet", dict()),
    ("resnet", dict(policy="fp8", state_bits=4, optimizer_in_backward=True)),
    ("resnet", dict(checkpoint="ckpt", state_bits=8)),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_estimate_matches_measured_peak(name, kw):
    model, batch = MODELS[name]()
    if kw.get("checkpoint") == "ckpt":
        kw = {**kw, "checkpoint": CKPT[name]}
    cfg = StepConfig(**kw)
    est = estimate(model, batch, config=cfg)
    meas = measure_peak(model, batch, cfg)
    assert close(est, meas), (est.peak_bytes, meas.peak_bytes, est.peak_breakdown, meas.peak_breakdown)
    assert est.peak_phase == meas.peak_phase
    assert est.param_bytes == meas.param_bytes > 0
    assert abs(est.optimizer_bytes - meas.optimizer_bytes) <= 0.01 * max(meas.optimizer_bytes, 1)
    assert abs(est.activation_bytes - meas.activation_bytes) <= 0.05 * meas.activation_bytes
    assert sum(est.peak_breakdown.values()) == est.peak_bytes
    for phase, v in meas.phase_peaks.items():  # each phase, the optimizer step's included
        assert abs(est.phase_peaks[phase] - v) <= TOL * v, (phase, est.phase_peaks, meas.phase_peaks)
    if cfg.optimizer_in_backward:  # gradients never all alive at once
        assert 0 < est.grad_bytes < est.param_bytes
    else:
        assert est.grad_bytes == est.param_bytes


def test_estimate_matches_with_eager_kernels(monkeypatch):
    # the eager codec and optimizer step make temporaries the fused C++ ones do not;
    # the estimate measures whichever kernels a real run would use
    monkeypatch.setenv("MEMFIT_KERNELS", "eager")
    model, batch = tiny_gpt2()
    cfg = StepConfig(policy=2, state_bits=4)
    est, meas = estimate(model, batch, config=cfg), measure_peak(model, batch, cfg)
    assert close(est, meas), (est.peak_breakdown, meas.peak_breakdown)
    for phase, v in meas.phase_peaks.items():
        assert abs(est.phase_peaks[phase] - v) <= TOL * v, (phase, est.phase_peaks, meas.phase_peaks)


def test_estimate_keyword_form_and_fields():
    model, batch = tiny_gpt2()
    plain = estimate(model, batch)
    small = estimate(model, batch, "adamw", 8, 4)
    assert small.peak_bytes < plain.peak_bytes
    assert small.optimizer_bytes < plain.optimizer_bytes / 3
    assert small.activation_bytes < plain.activation_bytes / 2
    assert plain.optimizer_bytes == 2 * plain.param_bytes + 4 * len(list(model.parameters()))
    # per-module held bytes, attributed to innermost modules
    assert any(k.startswith("transformer.h.0.") for k in plain.activations_by_module)
    assert 0.9 * plain.activation_bytes < sum(plain.activations_by_module.values()) <= plain.activation_bytes
    d = plain.to_dict()
    again = type(plain).from_dict(d)
    assert again == plain
    assert "peak" in str(plain)
    from rich.table import Table

    assert isinstance(plain.table(), Table)
    with pytest.raises(ValueError, match="either config"):
        estimate(model, batch, "sgd", config=StepConfig())


# --------------------------------------------------------------------------- no real memory


def test_estimate_of_meta_model_allocates_nothing():
    # a 2-layer GPT-2 with a 1M-token... no: a 1.5 GB model built on the meta device
    cfg = transformers.GPT2Config(n_layer=2, n_embd=2048, n_head=16, n_positions=1024, vocab_size=160_000)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.zeros(8, 1024, dtype=torch.long, device="meta")
    est = estimate(model, {"input_ids": ids, "labels": ids}, state_bits=8, policy=4)
    n = sum(p.numel() for p in model.parameters())
    assert est.param_bytes == 4 * n
    assert est.peak_bytes > 4 * 2**30  # the logits alone are 8 * 1024 * 160k * 4 bytes
    assert all(p.is_meta for p in model.parameters())


def test_estimate_does_not_grow_rss():
    model, _ = tiny_gpt2()
    ids = torch.zeros(64, 64, dtype=torch.long)  # logits: 64*64*512*4 = 8 MB, many copies in a step

    def rss_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1])
        return 0

    estimate(model, {"input_ids": ids, "labels": ids})  # warm caches
    before = rss_kb()
    est = estimate(model, {"input_ids": ids, "labels": ids})
    grown = (rss_kb() - before) * 1024
    assert est.peak_bytes > 100 * 2**20
    assert grown < est.peak_bytes / 4, (grown, est.peak_bytes)


# --------------------------------------------------------------------------- state preserved


def _state(model):
    return {
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": [id(p) for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(m._backward_pre_hooks), "forward" in m.__dict__) for m in model.modules()],
        "param_hooks": [len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
                        for p in model.parameters()],
    }


def _same(a, b):
    assert a["params"] == b["params"]
    assert a["training"] == b["training"]
    assert a["hooks"] == b["hooks"]
    assert a["param_hooks"] == b["param_hooks"]
    assert a["values"].keys() == b["values"].keys()
    for k in a["values"]:
        assert torch.equal(a["values"][k], b["values"][k]), k
    for ga, gb in zip(a["grads"], b["grads"]):
        assert (ga is None) == (gb is None)
        if ga is not None:
            assert torch.equal(ga, gb)


@pytest.mark.parametrize("what", ["estimate", "measure", "profile"])
def test_model_state_unchanged(what):
    model, batch = tiny_resnet()  # BatchNorm: buffers change in real steps
    model.eval()
    model.resnet.embedder.train()
    model(**batch).loss.backward()  # some grads exist
    cfg = StepConfig(policy=4, state_bits=8, checkpoint=("resnet.encoder.stages.0",), optimizer_in_backward=True)
    before = _state(model)
    if what == "estimate":
        estimate(model, batch, config=cfg)
    elif what == "measure":
        measure_peak(model, batch, cfg)
    else:
        from memfit.plan import profile

        prof = profile(model, batch, steps=2)
        assert prof.modules["resnet.encoder"].saved_inclusive_bytes > 0
    _same(before, _state(model))


def test_preserved_state_restores_after_error():
    model, batch = tiny_gpt2()
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with preserved_state(model):
            model.eval()
            model.transformer.h[0].register_forward_hook(lambda *a: None)
            model.lm_head.weight.register_post_accumulate_grad_hook(lambda p: None)
            with torch.no_grad():
                model.lm_head.weight.add_(1.0)
            raise RuntimeError("boom")
    _same(before, _state(model))


# --------------------------------------------------------------------------- step mechanics


def test_run_step_trains_and_in_backward_matches_plain():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    lin2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    lin2.load_state_dict(lin.state_dict())
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def loss_fn(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    plain, inb = StepConfig(), StepConfig(optimizer_in_backward=True)
    o1, o2 = make_optimizer(lin, plain, lr=1e-2), make_optimizer(lin2, inb, lr=1e-2)
    assert isinstance(o2, torch.optim.Optimizer)
    for _ in range(3):
        l1 = run_step(lin, (x, y), plain, loss_fn, o1)
        l2 = run_step(lin2, (x, y), inb, loss_fn, o2)
        assert torch.allclose(l1, l2)
    for a, b in zip(lin.parameters(), lin2.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
        assert b.grad is None
    assert len(o2.state_dict()["per_parameter"]) == 4
    sched = torch.optim.lr_scheduler.StepLR(o2, step_size=1, gamma=0.5)
    o2.step()  # a no-op: the hooks did the work
    sched.step()
    assert all(opt.param_groups[0]["lr"] == 5e-3 for opt in o2.inner_optimizers())
    assert all(not p._post_accumulate_grad_hooks for p in lin2.parameters())  # hooks removed after each step


def tiny_tied_llama(vocab=8000, shape=(2, 16)):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64, vocab_size=vocab,
                                   num_attention_heads=4, tie_word_embeddings=True, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("extra", [dict(), dict(policy=4, checkpoint=("model.layers.0",), state_bits=8)])
def test_in_backward_tied_weights_match_plain(extra):
    """A tied embedding / output layer steps once, from the sum of both uses' gradients."""
    model, batch = tiny_tied_llama()
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    plain, inb = StepConfig(**extra), StepConfig(optimizer_in_backward=True, **extra)
    o1, o2 = make_optimizer(m1, plain), make_optimizer(m2, inb)
    assert list(o2._tied.params) == [m2.lm_head.weight]
    for _ in range(3):
        l1, l2 = run_step(m1, batch, plain, None, o1), run_step(m2, batch, inb, None, o2)
        assert torch.equal(l1, l2)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), n
        assert b.grad is None
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert not m2.lm_head._forward_hooks and not m2.model.embed_tokens._forward_pre_hooks


def test_in_backward_tied_weight_used_outside_its_modules():
    """A third use of the tied weight, read by the parent directly, reaches .grad and is summed too."""

    class ThreeUses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.head = torch.nn.Linear(8, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids)
            return (self.head(h).logsumexp(-1) + (h @ self.emb.weight.t()).mean(-1)).mean()

    torch.manual_seed(0)
    model = ThreeUses()
    ids = torch.randint(0, 50, (4, 6))
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    plain, inb = StepConfig(optimizer="sgd"), StepConfig(optimizer="sgd", optimizer_in_backward=True)
    o1, o2 = make_optimizer(m1, plain), make_optimizer(m2, inb)
    loss_fn = lambda m, b: m(b)  # noqa: E731
    for _ in range(3):
        run_step(m1, ids, plain, loss_fn, o1)
        run_step(m2, ids, inb, loss_fn, o2)
    assert torch.allclose(m1.emb.weight, m2.emb.weight, rtol=0, atol=1e-6)


def test_in_backward_tied_weights_sum_with_one_tensor_fewer(monkeypatch):
    """Under MemTracker autograd sums a tied weight's two gradients out of place (three
    vocabulary-sized tensors at the end of backward); memfit's gathering adds in place (two)."""
    from memfit.optim import in_backward

    model, batch = tiny_tied_llama(vocab=32000, shape=(1, 4))  # few tokens: the peak is at the end of backward
    cfg = StepConfig(optimizer_in_backward=True, state_bits=4)
    ours = measure_peak(model, batch, cfg)

    class NoGathering(in_backward._TiedGradients):
        def __init__(self, model, params):
            super().__init__(model, params)
            self.params = {}

    monkeypatch.setattr(in_backward, "_TiedGradients", NoGathering)
    autograds = measure_peak(model, batch, cfg)
    embedding_bytes = model.lm_head.weight.numel() * 4
    assert autograds.peak_bytes - ours.peak_bytes >= 0.9 * embedding_bytes
    monkeypatch.undo()
    est = estimate(model, batch, config=cfg)
    assert abs(est.peak_bytes / ours.peak_bytes - 1) <= 0.01


def test_config_errors():
    with pytest.raises(ValueError, match="accumulat"):
        StepConfig(optimizer_in_backward=True, accumulation_steps=2)
    with pytest.raises(ValueError, match="clip"):
        StepConfig(optimizer_in_backward=True, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="state_bits"):
        StepConfig(state_bits=16)
    with pytest.raises(ValueError, match="optimizer"):
        StepConfig(optimizer="adam")
    with pytest.raises(ValueError, match="bits"):
        StepConfig(policy=3)
    c = StepConfig(policy={"a.*": 4}, checkpoint=("a",), state_bits=8)
    assert StepConfig.from_dict(c.to_dict()) == c
    model, batch = tiny_gpt2()
    with pytest.raises(ValueError, match="no module named 'transformer.h.9'"):
        estimate(model, batch, checkpoint=("transformer.h.9",))


def test_bad_inputs_raise_clear_errors():
    model, batch = tiny_gpt2()
    with pytest.raises(ValueError, match=r"model\(\*\*batch\) failed: ValueError: You have to specify"):
        estimate(model, {"input_idz": batch["input_ids"]})
    with pytest.raises(ValueError, match="without a .loss"):
        estimate(model, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match=r"scalar tensor, got shape \(2, 48, 512\)"):
        estimate(model, batch, loss_fn=lambda m, b: m(**b).logits)
    with pytest.raises(ValueError, match="scalar tensor, got float"):
        estimate(model, batch, loss_fn=lambda m, b: 1.0)
    with pytest.raises(TypeError, match="dict of keyword arguments"):
        estimate(model, (batch["input_ids"],))
    with pytest.raises(ValueError, match=r"model\(\*\*batch\) failed"):
        measure_peak(model, {"input_idz": batch["input_ids"]}, StepConfig())
    # a step that looks at tensor values cannot run on fake tensors: one real step is measured
    with pytest.warns(RuntimeWarning, match="depends on tensor values"):
        est = estimate(model, batch, loss_fn=lambda m, b: m(**b).loss * (b["input_ids"].sum().item() > 0))
    assert est.method == "measured"
    # the model is intact after the failures
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_top_level_exports():
    for name in ("estimate", "Estimate", "StepConfig", "profile", "Profile"):
        assert name in memfit.__all__ and hasattr(memfit, name)


def test_profile_rows_self_and_inclusive():
    from memfit.plan import Profile, profile

    model, batch = tiny_gpt2()
    prof = profile(model, batch, steps=2)
    mods = prof.modules
    block = mods["transformer.h.0"]
    assert block.calls == 1 and block.forward_seconds > 0 and block.backward_seconds > 0
    # inclusive = self + children; the block's own code saves little, its children much
    kids = [m for n, m in mods.items() if n.startswith("transformer.h.0.") and n.count(".") == 3]
    assert block.saved_inclusive_bytes == block.saved_bytes + sum(k.saved_inclusive_bytes for k in kids)
    assert mods["transformer.h.0.mlp.act"].saved_by_dtype.get("float32", 0) > 0
    assert block.forward_self_seconds <= block.forward_seconds
    assert prof.saved_bytes == mods[""].saved_inclusive_bytes
    est = estimate(model, batch)
    assert abs(prof.saved_bytes - sum(est.activations_by_module.values())) <= 0.05 * prof.saved_bytes
    assert prof.step_seconds >= prof.forward_seconds > 0
    assert Profile.from_dict(prof.to_dict()) == prof
    assert prof.codec_seconds == 0  # nothing compressed
    from rich.table import Table

    assert isinstance(prof.table(), Table)


def test_profile_counts_codec_time_under_a_policy():
    from memfit.plan import profile

    model, batch = tiny_gpt2()
    prof = profile(model, batch, steps=2, config=StepConfig(policy=4, activation_kwargs={"min_bytes": 0}))
    assert 0 < prof.codec_seconds < prof.forward_seconds + prof.backward_seconds
    assert "codec" in prof.table().title


def test_profile_times_the_recomputation_of_checkpointed_modules():
    from memfit.plan import profile

    model, batch = tiny_gpt2()
    prof = profile(model, batch, steps=2, config=StepConfig(checkpoint=("transformer.h.1",)))
    rec = prof.modules["transformer.h.1"]
    # timed once per step, inside backward, and a part of that backward
    assert 0 < rec.recompute_seconds < prof.backward_seconds
    assert prof.modules["transformer.h.0"].recompute_seconds == 0  # not checkpointed
    assert profile(model, batch, steps=1).modules["transformer.h.1"].recompute_seconds == 0
    from io import StringIO

    from rich.console import Console

    buf = StringIO()
    Console(file=buf, width=250).print(prof.table())
    assert "recompute ms" in buf.getvalue()
    assert not any("forward" in m.__dict__ for m in model.modules())  # the wrapper is gone


def test_estimate_with_gradient_accumulation_equals_the_measured_step():
    model, batch = tiny_gpt2()
    cfg = StepConfig(accumulation_steps=2)
    est = estimate(model, batch, config=cfg)
    real = measure_peak(model, batch, cfg)
    assert abs(est.peak_bytes - real.peak_bytes) <= 0.01 * real.peak_bytes
    # the second micro-batch runs its forward and backward with the first one's gradients alive
    assert est.peak_bytes > estimate(model, batch).peak_bytes


def test_tables_print_decimal_megabytes():
    """memfit's MB are 10**6 bytes everywhere: the peak estimate's table agrees with
    format_bytes, measure_peak's and the plan's figures."""
    from memfit._units import format_bytes
    from memfit.plan import Estimate, ModuleProfile, Profile

    est = Estimate(peak_bytes=415_140_472, peak_phase="backward", param_bytes=2_500_000)
    rows = dict(est.rows())
    assert rows["peak"] == "415.1 MB  (in backward)" and format_bytes(415_140_472) == "415 MB"
    assert rows["parameters"] == "2.5 MB"
    prof = Profile(modules={"": ModuleProfile("", "GPT", 0, saved_bytes=3_000_000, saved_inclusive_bytes=3_000_000)},
                   saved_bytes=3_000_000, steps=1)
    t = prof.table()
    assert t.title.endswith("3.0 MB saved for backward")
    assert list(t.columns[3]._cells) == ["3.00"]


def test_profile_table_shows_full_names_wrapped():
    """Two ``mlp`` rows stay apart: the module column holds qualified names, folded
    onto several lines when the console is narrow, never cut."""
    from io import StringIO

    from rich.console import Console

    from memfit.plan import ModuleProfile, Profile

    names = ["", "transformer", "transformer.h.0.mlp", "transformer.h.1.mlp"]
    prof = Profile(modules={n: ModuleProfile(n, "Module", n.count(".") + bool(n), saved_inclusive_bytes=1)
                            for n in names}, steps=1)
    t = prof.table()
    module = t.columns[0]
    assert module.overflow == "fold"
    assert list(module._cells) == ["<root>", "transformer", "transformer.h.0.mlp", "transformer.h.1.mlp"]
    buf = StringIO()
    Console(file=buf, width=100).print(t)
    column = "".join(line.split("│")[1].strip() for line in buf.getvalue().splitlines() if line.count("│") > 2)
    assert "…" not in column
    assert column == "<root>transformertransformer.h.0.mlptransformer.h.1.mlp"  # the folds, joined
    assert max(len(line.split("│")[1].strip()) for line in buf.getvalue().splitlines() if line.count("│") > 2) < 19
