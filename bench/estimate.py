#!/usr/bin/env python
"""memfit.plan.estimate against the measured peak of a real training step.

For each model and step configuration:

* **estimated**: ``memfit.plan.estimate(model, batch, config=...)``: two training steps
  (forward, backward, optimizer step, zero_grad) on fake tensors (FakeTensorMode)
  under MemTracker; the second step's peak. Nothing real is computed or allocated.
* **measured**: ``memfit.plan.measure_peak(model, batch, config)``: the same two steps
  on real tensors with the real optimizer and kernels, under MemTracker; the second
  step's peak. Parameters, buffers, inputs, gradients, optimizer state, activations
  and temporaries all count.

A row passes when estimated / measured is within 5% of 1.

Models (random init, train mode, fp32): GPT-2-small shape (GPT2LMHeadModel, 12 layers,
d=768, batch 4 x 256, labels = input ids), ResNet-50 (ResNetConfig defaults,
ResNetForImageClassification, batch 16 x 3 x 224 x 224 with labels), BERT-base
(BertConfig defaults, BertForMaskedLM, batch 4 x 256, labels = input ids).

Configurations: ``plain`` (torch AdamW, plain autograd); ``act4+adamw8`` (memfit
activations at 4 bits, memfit AdamW with 8-bit state); ``act2`` (2-bit activations,
torch AdamW); ``ckpt+adamw4+in-bwd`` (every block checkpointed, 4-bit AdamW stepped
in backward).

Usage::

    python bench/estimate.py                     # all models and configs, updates docs/benchmarks.md
    python bench/estimate.py --quick             # tiny models, smoke test (no docs update)
    python bench/estimate.py --models gpt2 --configs plain,act4+adamw8 --no-write
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

MARKER = "estimate"
DOCS = C.REPO / "docs" / "benchmarks.md"
TOLERANCE = 0.05
MODELS = ("gpt2", "resnet50", "bert")
HEADERS = ["model", "config", "estimated MB", "measured MB", "ratio", "within 5%", "peak phase (est/meas)",
           "estimate s", "measure s"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for_quiet() -> None:
    flag = Path("/tmp/memfit_quiet")
    while flag.exists():
        log("waiting: /tmp/memfit_quiet exists (someone is timing benchmarks)")
        time.sleep(60)


# --------------------------------------------------------------------------- workloads


def build(key: str, quick: bool):
    """(title, model, batch, names of the blocks to checkpoint)."""
    import transformers

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if key == "gpt2":
        if quick:
            cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=1024)
            b, s = 2, 64
        else:
            cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=256, vocab_size=50257)
            b, s = 4, 256
        model = transformers.GPT2LMHeadModel(cfg)
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen)
        batch = {"input_ids": ids, "labels": ids, "use_cache": False}
        blocks = [f"transformer.h.{i}" for i in range(cfg.n_layer)]
        title = f"GPT-2{' (quick)' if quick else '-small'} ({cfg.n_layer} layers, d={cfg.n_embd}), batch {b} x {s}"
    elif key == "bert":
        if quick:
            cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                          intermediate_size=128, vocab_size=1024)
            b, s = 2, 64
        else:
            cfg = transformers.BertConfig()
            b, s = 4, 256
        model = transformers.BertForMaskedLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=gen)
        batch = {"input_ids": ids, "labels": ids}
        blocks = [f"bert.encoder.layer.{i}" for i in range(cfg.num_hidden_layers)]
        title = f"BERT-{'tiny (quick)' if quick else 'base'} (BertForMaskedLM), batch {b} x {s}"
    elif key == "resnet50":
        if quick:
            cfg = transformers.ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256], embedding_size=16)
            b, hw = 2, 64
        else:
            cfg = transformers.ResNetConfig()
            b, hw = 16, 224
        model = transformers.ResNetForImageClassification(cfg)
        batch = {"pixel_values": torch.randn(b, 3, hw, hw, generator=gen),
                 "labels": torch.randint(0, cfg.num_labels, (b,), generator=gen)}
        blocks = [n for n, m in model.named_modules() if type(m).__name__ == "ResNetBottleNeckLayer"]
        title = f"ResNet-50{' (quick)' if quick else ''} (ResNetForImageClassification), batch {b} x 3 x {hw} x {hw}"
    else:
        raise ValueError(key)
    n = sum(p.numel() for p in model.parameters())
    return f"{title}, {n / 1e6:.1f}M params", model.train(), batch, blocks


def configs(blocks: list[str]) -> dict:
    from memfit.plan import StepConfig

    return {
        "plain": StepConfig(),
        "act4+adamw8": StepConfig(policy=4, state_bits=8),
        "act2": StepConfig(policy=2),
        "ckpt+adamw4+in-bwd": StepConfig(checkpoint=tuple(blocks), state_bits=4, optimizer_in_backward=True),
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--configs", default=None, help="comma list (default: all): plain, act4+adamw8, act2, "
                                                    "ckpt+adamw4+in-bwd")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny models: a smoke test; implies --no-write")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOCS.relative_to(C.REPO)}")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        ap.error(f"unknown model(s): {', '.join(sorted(unknown))}")

    info = C.start_bench(args.threads, log)

    from memfit.plan import estimate, measure_peak
    rows, sections, fails = [], [], 0
    for key in models:
        title, model, batch, blocks = build(key, args.quick)
        cfgs = configs(blocks)
        wanted = list(cfgs) if args.configs is None else [c.strip() for c in args.configs.split(",") if c.strip()]
        model_rows = []
        for name in wanted:
            if name not in cfgs:
                ap.error(f"unknown config {name!r}; known: {', '.join(cfgs)}")
            cfg = cfgs[name]
            wait_for_quiet()
            t0 = time.perf_counter()
            est = estimate(model, batch, config=cfg)
            t1 = time.perf_counter()
            gc.collect()
            meas = measure_peak(model, batch, cfg)
            t2 = time.perf_counter()
            gc.collect()
            ratio = est.peak_bytes / meas.peak_bytes
            ok = abs(ratio - 1) <= TOLERANCE
            fails += not ok
            row = [key, name, C.mb(est.peak_bytes), C.mb(meas.peak_bytes), f"{ratio:.4f}",
                   "PASS" if ok else "FAIL", f"{est.peak_phase}/{meas.peak_phase}", f"{t1 - t0:.1f}",
                   f"{t2 - t1:.1f}"]
            log("  " + "  ".join(row))
            model_rows.append(row)
            rows.append(row)
            if not ok:
                log(f"    estimated breakdown: {est.peak_breakdown}")
                log(f"    measured breakdown:  {meas.peak_breakdown}")
        sections.append((title, model_rows))
        del model, batch
        gc.collect()

    C.print_table("memfit.plan.estimate vs measured peak of a training step (2nd step)", HEADERS, rows)
    print(f"{len(rows) - fails}/{len(rows)} within {TOLERANCE:.0%}")
    try:
        info["load average (1/5/15 min, at end)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    if args.quick or args.no_write:
        print("(docs not updated: " + ("--quick" if args.quick else "--no-write") + ")")
    else:
        lines = [
            "## Estimator: estimated vs measured peak of a training step",
            "",
            "Written by `bench/estimate.py`; do not edit by hand between the markers.",
            "",
            *C.machine_lines(info),
            "",
            "- **estimated**: `memfit.plan.estimate(model, batch, config=...)`: two training steps "
            "(forward, backward, optimizer step, zero_grad) on fake tensors under MemTracker, peak of "
            "the second step; nothing real computed or allocated.",
            "- **measured**: `memfit.plan.measure_peak(model, batch, config)`: the same two steps on "
            "real tensors (real optimizer, real kernels) under MemTracker, peak of the second step.",
            "- Both count parameters, buffers, inputs, gradients, optimizer state, activations and "
            "temporaries. Configs: `plain` = torch AdamW, plain autograd; `act4+adamw8` = memfit "
            "activations at 4 bits + memfit AdamW 8-bit state; `act2` = 2-bit activations + torch "
            "AdamW; `ckpt+adamw4+in-bwd` = every block checkpointed, 4-bit AdamW stepped in backward.",
            "- estimate s / measure s: wall time of each call (the measurement runs under "
            "MemTracker's per-op bookkeeping, so it is not a step time).",
        ]
        for title, mrows in sections:
            lines += ["", f"### {title}", "", C.markdown_table(HEADERS, mrows)]
        lines += ["", f"{len(rows) - fails}/{len(rows)} within {TOLERANCE:.0%}."]
        C.update_markdown_section(DOCS, MARKER, "\n".join(lines))
        print(f"updated {DOCS.relative_to(C.REPO)}")
    return 0 if fails == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
