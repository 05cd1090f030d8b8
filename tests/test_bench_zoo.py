"""bench/zoo.py's reusable helpers: trained_like() and relative_error()."""

from __future__ import annotations

import math

import pytest
import torch
from _bench import bench_module

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def zoo():
    with bench_module("zoo.py", "bench_zoo") as module:
        yield module


def test_relative_error(zoo):
    ref = [torch.tensor([3.0, 4.0]), None, torch.tensor([0.0])]
    assert zoo.relative_error([r.clone() if r is not None else None for r in ref], ref) == 0.0
    assert zoo.relative_error([torch.tensor([3.0, 4.0 + 5.0]), None, torch.tensor([0.0])], ref) == pytest.approx(1.0)
    # a gradient missing where the reference has one counts in full
    assert zoo.relative_error([None, None, torch.tensor([0.0])], ref) == pytest.approx(1.0)
    # a parameter without a reference gradient is left out
    assert zoo.relative_error([ref[0], torch.tensor([9.0]), ref[2]], ref) == 0.0


def _capture(model, name, batch):
    out = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: out.setdefault("y", o.detach()))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return out["y"]


def test_trained_like_fused_per_head_layout(zoo):
    """GPT-NeoX fuses q, k, v per head ([q, k, v] for each head): q and k reach std 3,
    v is left alone, and every norm gets the same outlier channels."""
    cfg = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(cfg).eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))}
    name = "gpt_neox.layers.0.attention.query_key_value"
    before = _capture(model, name, batch).view(2, 32, 4, 3, 16)
    w_before = model.get_submodule(name).weight.detach().clone()
    norms_before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}

    def forward():
        with torch.no_grad():
            model(**batch)

    info = zoo.trained_like(model, forward, qk_std=3.0, outlier_channels=2, outlier_gain=8.0)
    after = _capture(model, name, batch).view(2, 32, 4, 3, 16)
    assert info["qk_modules"] == 2 and info["norms"] == len(norms_before)
    assert float(after[..., 0, :].std()) == pytest.approx(3.0, rel=0.05)
    assert float(after[..., 1, :].std()) == pytest.approx(3.0, rel=0.05)
    assert float(before[..., 0, :].std()) < 1.0  # it was changed, not found at 3
    v_rows = model.get_submodule(name).weight.view(4, 3, 16, 64)[:, 2]
    assert torch.equal(v_rows, w_before.view(4, 3, 16, 64)[:, 2])  # v's projection untouched
    assert not torch.equal(model.get_submodule(name).weight, w_before)
    gains = [(m.weight / norms_before[n]) for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    outliers = (gains[0] == 8.0).nonzero().flatten()
    assert len(outliers) == 2
    for g in gains:
        assert torch.equal((g == 8.0).nonzero().flatten(), outliers)
        assert int((g == 1.0).sum()) == g.numel() - 2


def test_trained_like_per_head_norms(zoo):
    """Qwen3 normalises q and k per head after the projection: the q/k norms are scaled."""
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    batch = {"input_ids": torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))}
    q_proj_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()

    def forward():
        with torch.no_grad():
            model(**batch)

    info = zoo.trained_like(model, forward, qk_std=3.0)
    assert info["qk_modules"] == 2 and math.isclose(info["qk_std"], 3.0, rel_tol=0.05)
    for name in ("q_norm", "k_norm"):
        y = _capture(model, f"model.layers.0.self_attn.{name}", batch)
        assert float(y.std()) == pytest.approx(3.0, rel=0.05)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_proj_before)
