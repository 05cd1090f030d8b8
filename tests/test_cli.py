"""``memfit estimate``, ``memfit profile`` and ``memfit plan``, run in-process."""

from __future__ import annotations

import json
import textwrap

import pytest

from memfit.cli import build_model_spec, build_parser, main

pytest.importorskip("transformers")
pytest.importorskip("rich")

MODEL = "gpt2:n_layer=2,n_embd=64,n_head=2,vocab_size=256,n_positions=64"


def run_json(capsys, *argv):
    rc = main(list(argv) + ["--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def test_commands_registered():
    parser = build_parser()
    actions = [a for a in parser._actions if a.dest == "command"][0]
    assert {"demo", "estimate", "profile", "plan"} <= set(actions.choices)


def test_estimate_json(capsys):
    rc, data = run_json(capsys, "estimate", "--model", MODEL, "--batch", "2x32")
    assert rc == 0
    assert data["peak_bytes"] > data["param_bytes"] > 0
    assert data["n_params"] > 0 and data["peak_phase"] in ("forward", "backward", "optimizer")
    rc, q = run_json(capsys, "estimate", "--model", MODEL, "--batch", "2x32", "--state-bits", "8", "--bits", "4")
    assert rc == 0 and q["optimizer_bytes"] < data["optimizer_bytes"]


def test_estimate_table_and_plot(capsys, tmp_path):
    png = tmp_path / "est.png"
    assert main(["estimate", "--model", MODEL, "--batch", "2x32", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "GPT2LMHeadModel" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_profile_json(capsys):
    rc, data = run_json(capsys, "profile", "--model", MODEL, "--batch", "2x32", "--steps", "2")
    assert rc == 0
    assert "modules" in data and data["step_seconds"] > 0


def test_plan_json_plot_and_save(capsys, tmp_path):
    png, saved = tmp_path / "plan.png", tmp_path / "plan.json"
    rc, data = run_json(capsys, "plan", "--model", MODEL, "--batch", "4x64", "--budget", "80%",
                        "--plot", str(png), "--save", str(saved))
    assert rc == 0
    assert data["predicted_peak_bytes"] <= data["budget_bytes"]
    assert {u["name"] for u in data["units"]} >= {"", "lm_head", "transformer.h.0"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    from memfit.plan import Plan

    model, _, _ = build_model_spec(MODEL, "4x64")
    Plan.from_json(saved.read_text(), model)


def test_plan_budget_too_small(capsys):
    rc, data = run_json(capsys, "plan", "--model", MODEL, "--batch", "2x32", "--budget", "10kB")
    assert rc == 3
    assert data["error"] == "BudgetTooSmall" and data["min_peak_bytes"] > data["budget_bytes"]
    assert data["dominant"]


def test_bad_inputs(capsys):
    assert main(["plan", "--model", MODEL, "--batch", "2x32", "--budget", "six gigs"]) == 2
    assert "'six gigs'" in capsys.readouterr().err
    assert main(["estimate", "--model", "nosuchmodel", "--batch", "2x32"]) == 2
    assert "nosuchmodel" in capsys.readouterr().err
    assert main(["estimate", "--model", "gpt2:n_layer", "--batch", "2x32"]) == 2
    assert main(["estimate", "--model", MODEL, "--batch", "2xq"]) == 2
    assert main(["plan", "--model", MODEL, "--batch", "2x32", "--budget", "1GB",
                 "--grad-accumulation", "0"]) == 2
    capsys.readouterr()
    for widths in ("8.0", "16", "8,x"):
        assert main(["plan", "--model", MODEL, "--batch", "2x32", "--budget", "1GB", "--state-bits", widths]) == 2
        err = capsys.readouterr().err
        assert "--state-bits" in err and "32, 8" in err, err
    assert main(["plan", "--model", MODEL, "--batch", "2x32", "--budget", "6G"]) == 2
    assert "'6GB'" in capsys.readouterr().err


def test_unknown_config_key_is_refused_with_close_matches(capsys):
    assert main(["estimate", "--model", "gpt2:n_layers=2", "--batch", "2x32"]) == 2
    err = capsys.readouterr().err
    assert "GPT2Config has no key 'n_layers'" in err and "did you mean n_layer" in err
    assert main(["estimate", "--model", "llama:hidden_sise=64", "--batch", "2x32"]) == 2
    err = capsys.readouterr().err
    assert "LlamaConfig has no key 'hidden_sise'" in err and "hidden_size" in err


def test_memory_plot_legend_beside_the_bars_and_totals_in_decimal_units():
    pytest.importorskip("matplotlib")
    from memfit._units import MB, format_bytes
    from memfit.cli import memory_figure

    plain = dict(params=496e6, grads=496e6, optimizer=992e6, activations=1718e6, temporaries=200e6)
    planned = dict(params=496e6, grads=10e6, optimizer=248e6, activations=300e6, temporaries=100e6)
    fig = memory_figure([("plain", plain), ("plan", planned)], budget=1_150_000_000)
    fig.canvas.draw()
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    axes_box, legend_box = ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer)
    assert legend_box.x0 >= axes_box.x1  # beside the axes: it cannot hide a bar or its label
    labels = [t.get_text() for t in ax.texts]
    assert labels == [format_bytes(sum(plain.values())), format_bytes(sum(planned.values()))] == ["3.90 GB", "1.15 GB"]
    tops = sorted(sum(p.get_height() for p in ax.patches if abs(p.get_x() + p.get_width() / 2 - x) < 0.1)
                  for x in (0, 1))
    assert tops == pytest.approx(sorted([sum(plain.values()) / MB, sum(planned.values()) / MB]))
    assert "10^6 bytes" in ax.get_ylabel()


def test_factory_spec(tmp_path, capsys):
    f = tmp_path / "mymodel.py"
    f.write_text(textwrap.dedent("""
        import torch

        def make():
            return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))

        def make_with_batch():
            return make(), torch.randn(16, 32)
    """))
    rc, data = run_json(capsys, "estimate", "--model", f"{f}:make", "--batch", "16x32")
    assert rc == 0 and data["peak_bytes"] > 0
    rc, data = run_json(capsys, "estimate", "--model", f"{f}:make_with_batch")
    assert rc == 0 and data["peak_bytes"] > 0
    assert main(["estimate", "--model", f"{f}:missing"]) == 2
    capsys.readouterr()


def test_image_model_spec():
    model, batch, loss_fn = build_model_spec("vit:hidden_size=32,num_hidden_layers=1,num_attention_heads=2,"
                                             "intermediate_size=64,image_size=32,patch_size=8", "3")
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and loss_fn is None
    out = model(**batch)
    assert out.loss.ndim == 0


# --------------------------------------------------------------------------- issue 17: the fine-tuning options

LLAMA_TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 256,
              "max_position_embeddings": 64, "torch_dtype": "float32"}


def _config(tmp_path, name="config.json", **over):
    path = tmp_path / name
    path.write_text(json.dumps({**LLAMA_TINY, **over}))
    return path


def test_model_from_config_json_and_directory_matches_the_key_spec(capsys, tmp_path):
    path = _config(tmp_path)
    rc, from_file = run_json(capsys, "estimate", "--model", str(path), "--batch", "2x32")
    assert rc == 0
    rc, from_dir = run_json(capsys, "estimate", "--model", str(tmp_path), "--batch", "2x32")
    assert rc == 0
    key = ("llama:hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=2,"
           "num_key_value_heads=2,vocab_size=256,max_position_embeddings=64")
    rc, from_key = run_json(capsys, "estimate", "--model", key, "--batch", "2x32")
    assert rc == 0
    assert from_file["peak_bytes"] == from_dir["peak_bytes"] == from_key["peak_bytes"]
    assert from_file["n_params"] == from_key["n_params"]
    # the config's own dtype is the default; --dtype overrides it
    _config(tmp_path, "bf16.json", torch_dtype="bfloat16")
    rc, bf16 = run_json(capsys, "estimate", "--model", str(tmp_path / "bf16.json"), "--batch", "2x32")
    assert rc == 0 and bf16["param_bytes"] * 2 == from_file["param_bytes"]
    rc, fp32 = run_json(capsys, "estimate", "--model", str(tmp_path / "bf16.json"), "--batch", "2x32",
                        "--dtype", "fp32")
    assert rc == 0 and fp32["param_bytes"] == from_file["param_bytes"]


def test_model_path_errors(capsys, tmp_path):
    assert main(["estimate", "--model", str(tmp_path / "nope" / "config.json")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["estimate", "--model", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    _config(tmp_path, model_type="lama")
    assert main(["estimate", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model_type 'lama'" in err and "did you mean llama" in err
    (tmp_path / "config.json").write_text("{not json")
    assert main(["estimate", "--model", str(tmp_path)]) == 2
    assert "as JSON" in capsys.readouterr().err


def test_estimate_lora_weights_dtype_accumulation_loss_autocast(capsys, tmp_path):
    pytest.importorskip("peft")
    path = str(_config(tmp_path))
    args = ["estimate", "--model", path, "--batch", "2x32"]
    rc, full = run_json(capsys, *args)
    rc, lora = run_json(capsys, *args, "--lora", "4")
    assert rc == 0 and lora["n_trainable"] < lora["n_params"] and lora["n_params"] > full["n_params"]
    assert lora["optimizer_bytes"] < full["optimizer_bytes"] / 10
    rc, nf4 = run_json(capsys, *args, "--lora", "4", "--weights", "nf4")
    rc8, int8 = run_json(capsys, *args, "--lora", "4", "--weights", "int8")
    assert rc == rc8 == 0
    # frozen weights held as codes: fewer parameter bytes, codes counted as buffers
    assert nf4["param_bytes"] < lora["param_bytes"] / 5 and nf4["buffer_bytes"] > lora["buffer_bytes"]
    assert nf4["peak_bytes"] < int8["peak_bytes"] < lora["peak_bytes"]
    rc, bf16 = run_json(capsys, *args, "--dtype", "bf16")
    assert rc == 0 and bf16["param_bytes"] * 2 == full["param_bytes"]
    rc, acc = run_json(capsys, *args, "--accumulation", "4")
    assert rc == 0 and acc["config"]["accumulation_steps"] == 4
    rc, chunked = run_json(capsys, *args, "--loss", "chunked")
    assert rc == 0 and chunked["peak_bytes"] != full["peak_bytes"]
    rc, auto = run_json(capsys, *args, "--autocast", "bf16")
    # autocast's bf16 copies of the weights and its bf16 activations change the forward
    assert rc == 0 and auto["phase_peaks"]["forward"] != full["phase_peaks"]["forward"]
    assert auto["config"]["autocast"] == "bf16" and full["config"]["autocast"] is None  # a step option
    # refusals
    assert main([*args, "--weights", "nf4"]) == 2
    assert "no frozen floating-point weights" in capsys.readouterr().err
    assert main([*args, "--lora", "0"]) == 2
    assert "--lora 0" in capsys.readouterr().err
    assert main([*args, "--accumulation", "0"]) == 2
    assert "--accumulation 0" in capsys.readouterr().err


def test_lora_without_peft_is_refused(capsys, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)
    assert main(["estimate", "--model", str(_config(tmp_path)), "--batch", "2x32", "--lora", "4"]) == 2
    assert "--lora needs peft" in capsys.readouterr().err


def test_llama_8b_from_config_estimates_on_meta_allocating_nothing(capsys, tmp_path):
    """'Does Llama-3-8B fit in 24 GB with LoRA?' from a config file alone."""
    pytest.importorskip("peft")
    import resource

    path = _config(tmp_path, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                   max_position_embeddings=8192, torch_dtype="bfloat16")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc, data = run_json(capsys, "estimate", "--model", str(path), "--batch", "1x64", "--lora", "8",
                        "--weights", "nf4")
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert rc == 0
    assert 8.0e9 < data["n_params"] < 8.1e9 and data["n_trainable"] < 1e7
    # the NF4 base (about 4.13 bits per frozen parameter) dominates, far below bf16's 16 GB
    assert 3.5e9 < data["peak_bytes"] < 7e9, data["peak_bytes"]
    assert grown_kb < 2_000_000  # the estimate allocated nothing of the model's size


def test_plan_weights_and_accumulation_options(capsys, tmp_path):
    pytest.importorskip("peft")
    path = str(_config(tmp_path))
    base = ["plan", "--model", path, "--batch", "2x32", "--lora", "4", "--accumulation", "2"]
    rc, data = run_json(capsys, *base, "--budget", "90%", "--weights", "none")
    assert rc == 0 and data["weights"] == {} and data["grad_accumulation"] == 2 and data["autocast"] is None
    rc, auto = run_json(capsys, *base, "--budget", "5MB", "--weights", "none", "--autocast", "bf16")
    # planned under autocast (its casts in the plain peak), and the plan carries it
    assert rc == 0 and auto["autocast"] == auto["config"]["autocast"] == "bf16"
    assert auto["plain_peak_bytes"] != data["plain_peak_bytes"]
    assert main([*base, "--budget", "1GB", "--weights", "fp8"]) == 2
    assert "--weights 'fp8'" in capsys.readouterr().err
    # the chunked loss on the LoRA model (peft's wrapper around the causal LM)
    rc, chunked = run_json(capsys, *base, "--budget", "90%", "--weights", "none", "--loss", "chunked")
    assert rc == 0 and chunked["plain_peak_bytes"] < data["plain_peak_bytes"]
    est = ["estimate", "--model", path, "--batch", "2x32", "--lora", "4"]
    rc, own = run_json(capsys, *est)
    rc2, chunked = run_json(capsys, *est, "--loss", "chunked")
    assert rc == rc2 == 0 and chunked["peak_bytes"] < own["peak_bytes"]


def test_budget_too_small_recommends_chunked_loss_option(capsys):
    big_vocab = "gpt2:n_layer=1,n_embd=32,n_head=2,vocab_size=8192,n_positions=64"
    rc = main(["plan", "--model", big_vocab, "--batch", "4x64", "--budget", "10kB"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "causal_lm_loss" in err and "--loss chunked" in err
