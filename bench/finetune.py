#!/usr/bin/env python
"""Fine-tuning workloads: memfit.plan.estimate and memfit.plan against measured peaks.

Two parts (issue 17's bars):

* **estimate**: ``memfit.plan.estimate(model, batch, config=...)`` against
  ``memfit.plan.measure_peak(model, batch, config)`` (plain step: torch AdamW, plain
  autograd) on five fine-tuning workloads: a peft LoRA Llama (r=8 on q_proj and
  v_proj, the base frozen), Whisper (its positions are frozen), a Llama with bf16
  weights, a Llama under bf16 autocast (``StepConfig(autocast="bf16")``) and Mixtral
  (MoE; fake tensors cannot run its grouped matmul, so the estimate falls back to a
  measured step: its ``method`` column says so). A row passes within 5%.
* **plan**: ``memfit.plan(model, batch, budget)`` at 50% and 30% of the plain step's
  measured peak, on the LoRA Llama and the bf16 Llama, with the model's own loss and
  with ``memfit.causal_lm_loss()`` (chunked); the plan's step is then measured. A row passes when the measured peak is at most the budget and at least
  85% of it, or when ``BudgetTooSmall`` names the floor (the smallest peak reachable).

Models: transformers config classes, random weights, train mode; hidden 256, 4 layers,
batch 4 x 128 (Whisper: 80 mel bins x 400 frames, 4 x 64 labels). Peaks are MemTracker's
live tensor bytes of the second of two steps (MB = 10^6 bytes).

Usage::

    python bench/finetune.py                          # both parts, updates docs/benchmarks.md
    python bench/finetune.py --parts estimate --no-write
    python bench/finetune.py --quick --json out.json  # tiny models (no docs update)
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

MARKER = "finetune"
DOCS = C.REPO / "docs" / "benchmarks.md"
TOLERANCE = 0.05
FILL = 0.85
PARTS = ("estimate", "plan")
MODELS = ("lora-llama", "whisper", "bf16-llama", "autocast-llama", "mixtral")
PLAN_MODELS = ("lora-llama", "bf16-llama")
FRACTIONS = (0.5, 0.3)
EST_HEADERS = ["model", "method", "estimated MB", "measured MB", "ratio", "within 5%", "peak phase (est/meas)"]
PLAN_HEADERS = ["model", "budget", "budget MB", "plan", "predicted MB", "measured MB", "% of budget", "result"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- workloads


def _llama(quick: bool):
    import transformers

    h, layers, b, s, vocab = (64, 2, 2, 32, 256) if quick else (256, 4, 4, 128, 4096)
    cfg = transformers.LlamaConfig(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                   max_position_embeddings=max(64, s))
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}, f"d={h}, {layers} layers, vocab {vocab}, batch {b} x {s}"


def build(key: str, quick: bool):
    """(description, model, batch, StepConfig of the plain step)."""
    import transformers

    from memfit.plan import StepConfig

    torch.manual_seed(0)
    cfg = StepConfig()
    if key in ("lora-llama", "bf16-llama", "autocast-llama"):
        model, batch, shape = _llama(quick)
        if key == "lora-llama":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
            what = f"Llama + peft LoRA r=8 (q_proj, v_proj), {shape}"
        elif key == "bf16-llama":
            model.to(torch.bfloat16)
            what = f"Llama, bf16 weights, {shape}"
        else:
            cfg = StepConfig(autocast="bf16")
            what = f"Llama, fp32 weights, bf16 autocast, {shape}"
    elif key == "whisper":
        h, layers, mel, frames, b, t = (64, 2, 16, 60, 2, 16) if quick else (256, 4, 80, 400, 4, 64)
        wcfg = transformers.WhisperConfig(
            d_model=h, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=4 * h, decoder_ffn_dim=4 * h, vocab_size=4096,
            num_mel_bins=mel, max_source_positions=frames // 2, max_target_positions=max(64, t), pad_token_id=0,
            decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)
        model = transformers.WhisperForConditionalGeneration(wcfg)
        g = torch.Generator().manual_seed(1)
        batch = {"input_features": torch.randn(b, mel, frames, generator=g),
                 "labels": torch.randint(3, 4096, (b, t), generator=g)}
        what = f"Whisper (frozen positions), d={h}, {layers}+{layers} layers, {mel} mels x {frames}, labels {b} x {t}"
    elif key == "mixtral":
        h, layers, b, s = (64, 2, 2, 32) if quick else (256, 4, 4, 128)
        mcfg = transformers.MixtralConfig(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=layers,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                          num_local_experts=8, num_experts_per_tok=2,
                                          max_position_embeddings=max(64, s))
        model = transformers.MixtralForCausalLM(mcfg)
        ids = torch.randint(0, 4096, (b, s), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "labels": ids}
        what = f"Mixtral (8 experts, top 2), d={h}, {layers} layers, batch {b} x {s}"
    else:
        raise ValueError(key)
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{what}; {n / 1e6:.2f}M params, {trainable / 1e6:.2f}M trainable", model.train(), batch, cfg


# --------------------------------------------------------------------------- parts


def run_estimate(models: list[str], quick: bool) -> tuple[list[list[str]], list[dict], int]:
    from memfit.plan import estimate, measure_peak

    rows, records, fails = [], [], 0
    for key in models:
        what, model, batch, cfg = build(key, quick)
        log(f"{key}: {what}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            est = estimate(model, batch, config=cfg)
        for w in caught:
            log(f"  warning: {w.message}")
        gc.collect()
        meas = measure_peak(model, batch, cfg)
        gc.collect()
        ratio = est.peak_bytes / meas.peak_bytes
        ok = abs(ratio - 1) <= TOLERANCE
        fails += not ok
        row = [key, est.method, C.mb(est.peak_bytes), C.mb(meas.peak_bytes), f"{ratio:.4f}",
               "PASS" if ok else "FAIL", f"{est.peak_phase}/{meas.peak_phase}"]
        log("  " + "  ".join(row))
        rows.append(row)
        records.append({"model": key, "what": what, "method": est.method, "fake_error": est.fake_error,
                        "estimated_bytes": est.peak_bytes, "measured_bytes": meas.peak_bytes, "ratio": ratio,
                        "pass": ok, "estimate": est.to_dict(), "measured": meas.to_dict()})
        del model, batch
        gc.collect()
    return rows, records, fails


def chunked_loss():
    """``memfit.causal_lm_loss()`` (the loss head in chunks), applied to a peft model's
    base model (its adapters are injected there): ``causal_lm_loss`` does not unwrap
    ``PeftModel`` itself."""
    import memfit

    fn = memfit.causal_lm_loss()

    def loss_fn(model, batch):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return fn(base, batch)

    return loss_fn


def run_plan(models: list[str], quick: bool) -> tuple[list[list[str]], list[dict], int]:
    import memfit
    from memfit.plan import BudgetTooSmall, measure_peak

    rows, records, fails = [], [], 0
    for key in models:
        what, model, batch, cfg = build(key, quick)
        log(f"{key}: {what}")
        plain = measure_peak(model, batch, cfg).peak_bytes
        log(f"  plain measured peak {C.mb(plain)} MB")
        for loss_name, loss_fn in (("model(**batch).loss", None), ("chunked", chunked_loss())):
            label = key if loss_fn is None else f"{key}, chunked loss"
            cache: dict = {}
            for frac in FRACTIONS:
                budget = int(frac * plain)
                rec = {"model": key, "what": what, "loss": loss_name, "fraction": frac, "plain_bytes": plain,
                       "budget_bytes": budget}
                try:
                    p = memfit.plan(model, batch, budget, loss_fn=loss_fn, cache=cache)
                except BudgetTooSmall as exc:
                    rec.update(result="floor", floor_bytes=exc.min_peak_bytes, dominant=exc.dominant)
                    row = [label, f"{frac:.0%}", C.mb(budget), "BudgetTooSmall", C.mb(exc.min_peak_bytes), "-",
                           "-", f"PASS (floor {C.mb(exc.min_peak_bytes)} MB: {exc.dominant})"]
                else:
                    gc.collect()
                    peak = measure_peak(model, batch, p.config, loss_fn=loss_fn).peak_bytes
                    share = peak / budget
                    ok = FILL <= share <= 1.0
                    fails += not ok
                    rec.update(result="plan", config=p.config.to_dict(), predicted_bytes=p.predicted_peak_bytes,
                               measured_bytes=peak, share=share, ok=ok)
                    row = [label, f"{frac:.0%}", C.mb(budget), p.config.describe(), C.mb(p.predicted_peak_bytes),
                           C.mb(peak), f"{share:.1%}", "PASS" if ok else "FAIL"]
                log("  " + "  ".join(row))
                rows.append(row)
                records.append(rec)
                gc.collect()
            del cache
        del model, batch
        gc.collect()
    return rows, records, fails


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)} "
                                                             f"(the plan part uses {', '.join(PLAN_MODELS)})")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny models: a smoke test; implies --no-write")
    ap.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOCS.relative_to(C.REPO)}")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name, got, known in (("part", parts, PARTS), ("model", models, MODELS)):
        unknown = set(got) - set(known)
        if unknown:
            ap.error(f"unknown {name}(s): {', '.join(sorted(unknown))}; known: {', '.join(known)}")

    info = C.start_bench(args.threads, log)
    out: dict = {"machine": info}
    fails = 0
    lines = [
        "## Fine-tuning: frozen weights, LoRA, bf16, MoE",
        "",
        "Written by `bench/finetune.py`; do not edit by hand between the markers.",
        "",
    ]
    est_note = ("Plain step (torch AdamW, plain autograd; the autocast row runs its forward under bf16 autocast). "
                "*method* `fake`: fake tensors, nothing run; `measured`: fake tensors could not run the step "
                "(Mixtral: fake `aten._grouped_mm` wants bf16 inputs, the CPU kernel does not), so `estimate` "
                "measured one real step and said so.")
    plan_note = ("`memfit.plan(model, batch, budget, loss_fn=...)` with its defaults; the plan's step is "
                 f"measured with `measure_peak(model, batch, plan.config, loss_fn=...)`. Budgets are fractions "
                 "of the plain step's measured peak (`model(**batch).loss`). *chunked loss* rows plan with "
                 "`memfit.causal_lm_loss()` (on the peft model's base model), so the full logits never exist. "
                 f"PASS: measured peak <= budget and >= {FILL:.0%} of it, or `BudgetTooSmall` with the floor "
                 "it names.")
    pmodels = [m for m in models if m in PLAN_MODELS] or list(PLAN_MODELS)
    part_specs = {
        "estimate": (run_estimate, models, EST_HEADERS, "Estimated vs measured peak", est_note),
        "plan": (run_plan, pmodels, PLAN_HEADERS, "Plans at 50% and 30% of the plain step's measured peak",
                 plan_note),
    }
    sections = []
    for part in parts:
        runner, which, headers, title, note = part_specs[part]
        rows, recs, f = runner(which, args.quick)
        fails += f
        out[part] = recs
        C.print_table(title, headers, rows)
        described = sorted({(r["model"], r["what"]) for r in recs})
        sections += [f"### {title}", "", note, "", *[f"- {k}: {w}" for k, w in described], "",
                     C.markdown_table(headers, rows), ""]
    C.end_bench(info, args.json, out)
    if args.quick or args.no_write:
        print("(docs not updated: " + ("--quick" if args.quick else "--no-write") + ")")
    else:
        lines += [*C.machine_lines(info), "", *sections]
        C.update_markdown_section(DOCS, MARKER, "\n".join(lines))
        print(f"updated {DOCS.relative_to(C.REPO)}")
    return 0 if fails == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
