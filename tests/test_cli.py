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
