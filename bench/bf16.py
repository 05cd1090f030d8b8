#!/usr/bin/env python
"""bf16 weights: the final loss of a full bf16 run with memfit's 8-bit AdamW, per
``bf16=`` mode, against torch's AdamW on fp32 and on bf16 weights.

Runs (same init, same batches, same warmup+cosine LR, weight decay and gradient
clipping: the demo's ``DemoConfig``), on the demo's GPT (``memfit.demo.build_model``)
over the stdlib ``.py`` bytes (``memfit.data``):

* ``torch fp32``: ``torch.optim.AdamW`` on fp32 weights, the reference;
* ``torch bf16``: ``torch.optim.AdamW`` on bf16 weights (forward, backward, weights
  and its moments in bf16; updates rounded to nearest);
* ``memfit-8 fp32``: ``memfit.optim.AdamW(state_bits=8)`` on fp32 weights (what the
  8-bit state alone changes);
* ``memfit-8 nearest | stochastic | master``: ``memfit.optim.AdamW(state_bits=8,
  bf16=...)`` on bf16 weights.

Final loss = mean of the last 20 steps (the loss is computed in fp32 from the logits,
as transformers does). The bar (issue 17): memfit's 8-bit AdamW on bf16 weights within
1% of torch AdamW's final loss; both torch references are reported. Also reported: the
optimizer state's bytes per parameter after the run (the master adds 4).

Usage::

    python bench/bf16.py                 # 300 steps, updates docs/benchmarks.md
    python bench/bf16.py --quick         # smoke test (tiny model, few steps; no docs update)
    python bench/bf16.py --json          # results as JSON on stdout, no docs update
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

MARKER = "bf16"
DOCS = C.REPO / "docs" / "benchmarks.md"
BAR = 0.01  # |final loss / torch AdamW's - 1|
REFERENCES = ("torch fp32", "torch bf16")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def runs() -> dict[str, tuple[torch.dtype, Callable]]:
    """name -> (weight dtype, optimizer maker)."""
    import memfit.optim as mo
    from memfit.optim.bf16 import BF16_MODES

    out: dict[str, tuple[torch.dtype, Callable]] = {
        "torch fp32": (torch.float32, lambda ps, **kw: torch.optim.AdamW(ps, **kw)),
        "torch bf16": (torch.bfloat16, lambda ps, **kw: torch.optim.AdamW(ps, **kw)),
        "memfit-8 fp32": (torch.float32, lambda ps, **kw: mo.AdamW(ps, state_bits=8, **kw)),
    }
    for mode in BF16_MODES:
        out[f"memfit-8 {mode}"] = (torch.bfloat16, lambda ps, mode=mode, **kw: mo.AdamW(ps, state_bits=8, bf16=mode, **kw))
    return out


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def train(name, dtype, make_opt, base, batches, cfg) -> dict:
    model = copy.deepcopy(base).to(dtype)
    opt = make_opt(list(model.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    t0 = time.perf_counter()
    losses = C.train_demo_lm(model, opt, batches, cfg)
    tail = losses[-cfg.final_window:]
    n_params = sum(p.numel() for p in model.parameters())
    out = dict(final=sum(tail) / len(tail), last=losses[-1], nonfinite=sum(not math.isfinite(v) for v in losses),
               state_bytes_per_param=state_bytes(opt) / n_params, losses=losses)
    log(f"  {name}: final loss {out['final']:.4f} ({time.perf_counter() - t0:.0f}s)")
    return out


def bench(steps: int, quick: bool, seed: int, only: list[str] | None, lr: float | None) -> tuple[object, int, dict, dict]:
    cfg, batches, base, n_params, _ = C.demo_lm_setup(steps, quick, seed, **({"lr": lr} if lr else {}))
    log(f"bf16: GPT {cfg.n_layer}x{cfg.n_embd}, {n_params / 1e6:.2f}M params, {cfg.steps} steps, seed {seed}")
    results, errors = {}, {}
    for name, (dtype, make_opt) in runs().items():
        if only and name not in only and name not in REFERENCES:
            continue
        try:
            results[name] = train(name, dtype, make_opt, base, batches, cfg)
        except Exception as exc:  # reported in the table, the other runs go on
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            log(f"  {name}: FAILED {errors[name]}")
    return cfg, n_params, results, errors


def relative(results: dict, name: str, ref: str) -> float:
    base = results.get(ref, {}).get("final")
    return (results[name]["final"] - base) / base if base else float("nan")


def verdicts(results: dict, name: str) -> dict[str, bool]:
    """For memfit runs: whether each torch reference is met within the bar."""
    if not name.startswith("memfit") or name.endswith("fp32"):
        return {}
    return {ref: abs(relative(results, name, ref)) <= BAR for ref in REFERENCES if ref in results}


def report(info: dict, cfg, n_params: int, results: dict, errors: dict) -> str:
    lines = [f"## bf16 weights: memfit's 8-bit AdamW per `bf16=` mode, peak LR {cfg.lr:g} (`bench/bf16.py`)", ""]
    lines += C.machine_lines(info)
    lines += [f"- **run:** demo GPT {cfg.n_layer} layers x {cfg.n_embd} ({n_params / 1e6:.2f}M params) on stdlib "
              f"`.py` bytes, seq {cfg.seq_len}, batch {cfg.batch_size}, {cfg.steps} steps, seed {cfg.seed}; "
              f"warmup+cosine LR (peak {cfg.lr}), weight decay {cfg.weight_decay}, gradient-norm clip "
              f"{cfg.grad_clip}; same init and batches for every run", ""]
    rows = []
    for name, r in results.items():
        ok = verdicts(results, name)
        bar = " ".join(f"vs {ref}: {'PASS' if v else 'FAIL'}" for ref, v in ok.items())
        rows.append([name, "fp32" if name.endswith("fp32") else "bf16", f"{r['final']:.4f}",
                     f"{relative(results, name, 'torch fp32'):+.2%}" if "torch fp32" in results else "—",
                     f"{relative(results, name, 'torch bf16'):+.2%}" if "torch bf16" in results else "—",
                     f"{relative(results, name, 'memfit-8 fp32'):+.2%}" if "memfit-8 fp32" in results else "—",
                     f"{r['state_bytes_per_param']:.2f}", str(r["nonfinite"]), bar])
    for name, err in errors.items():
        rows.append([name, "—", "—", "—", "—", "—", "—", "—", f"failed: {err}"])
    lines.append(C.markdown_table(
        ["run", "weights", f"final loss (mean of last {cfg.final_window})", "vs torch AdamW fp32 weights",
         "vs torch AdamW bf16 weights", "vs memfit-8 fp32 weights", "state bytes/param", "non-finite losses", f"bar: within {BAR:.0%}"], rows))
    lines += ["", "memfit-8 = `memfit.optim.AdamW(state_bits=8, bf16=mode)`; fp32-format state (parameters under "
              "4096 elements) is bf16 under `nearest` (as torch's) and fp32 under `stochastic` and `master`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps; implies --no-write")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300; 30 with --quick)")
    ap.add_argument("--seed", type=int, default=0, help="init and batch order")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak learning rate (default: the demo's); a fine-tuning-sized one (1e-4) is where "
                         "round-to-nearest loses most updates. Written to its own docs section")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: only losses are measured, and small ops on a shared machine "
                         "mostly wait at barriers with more)")
    ap.add_argument("--only", default=None,
                    help="comma list of memfit runs (e.g. 'memfit-8 master'); the torch references always run")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOCS.relative_to(C.REPO)}")
    ap.add_argument("--json", action="store_true", help="print the results as JSON (per-step losses included); "
                                                        "implies --no-write")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (30 if args.quick else 300)
    only = [s.strip() for s in args.only.split(",")] if args.only else None
    info = C.machine_info()
    cfg, n_params, results, errors = bench(steps, args.quick, args.seed, only, args.lr)
    if args.json:
        print(json.dumps({"config": {k: v for k, v in cfg.__dict__.items() if isinstance(v, (int, float, str))},
                          "params": n_params, "machine": info, "results": results, "errors": errors,
                          "verdicts": {n: verdicts(results, n) for n in results}}, indent=1))
        return 0
    marker = MARKER if args.lr is None else f"{MARKER}-lr{args.lr:g}"
    C.publish(report(info, cfg, n_params, results, errors), DOCS, marker, write=not (args.quick or args.no_write),
              log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
