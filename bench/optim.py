#!/usr/bin/env python
"""Optimizer state: bytes per parameter, CPU step time and convergence, in one run.

Contenders (each skipped, with a note, when its package is not importable):

* ``torch-fused``: ``torch.optim.AdamW(fused=True)``, the baseline;
* ``torch-foreach``: ``torch.optim.AdamW(foreach=True)``;
* ``memfit-8`` / ``memfit-4``: ``memfit.optim.AdamW(state_bits=8 | 4)``;
* ``bnb-8``: ``bitsandbytes.optim.AdamW8bit``;
* ``torchao-8`` / ``torchao-4``: ``torchao.optim.AdamW8bit`` / ``AdamW4bit``.

Measured:

1. **state bytes per parameter**: every tensor the optimizer holds in ``state`` after
   one step (tensor subclasses are opened up into their inner tensors; shared tensors
   such as a common quantization map are counted once), divided by the parameter count.
2. **step time** on a stack of ``nn.Linear(2048, 2048)`` (about 100M parameters) with
   fixed random gradients: ``opt.step()`` only, contenders interleaved round-robin after
   one warm-up step each; the ratio to ``torch-fused`` is taken within each round, then
   the median over rounds.
3. **convergence**: the demo's small GPT (``memfit.demo.build_model``, the demo's
   ``DemoConfig`` hyper-parameters: LR, warmup+cosine schedule, weight decay, gradient
   clipping) on the stdlib ``.py`` bytes (``memfit.data``), same init, same batches,
   500 steps; final loss = mean of the last 20 steps, relative to ``torch.optim.AdamW``;
   ``--seeds N`` averages over N seeds (init and batch order).

Usage::

    python bench/optim.py            # full run, updates docs/benchmarks.md
    python bench/optim.py --quick    # smoke test (small model, few steps; no docs update)
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

MARKER = "optim"
DOCS = C.REPO / "docs" / "benchmarks.md"
BYTES_BARS = {"memfit-8": 2.1, "memfit-4": 1.1}
TIME_BARS = {"memfit-8": 2.0, "memfit-4": 2.5}
CONV_BARS = {"memfit-8": 0.01, "memfit-4": 0.02}
BNB_MARGIN = 0.005
MEMFIT_LAYOUTS = ("- **memfit layouts:** memfit-8: blocks of 256, first moment on an E4M3-like map, second on an "
                  "E5M3-like map without a zero code (`memfit.codec.dynamic.float_map`); memfit-4: blocks of 128, "
                  "first moment on the 4-bit dynamic map, second on the linear map without zero")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- contenders


def contenders() -> tuple[dict[str, Callable], list[str]]:
    import memfit.optim as mo

    out: dict[str, Callable] = {
        "torch-fused": lambda ps, **kw: torch.optim.AdamW(ps, fused=True, **kw),
        "torch-foreach": lambda ps, **kw: torch.optim.AdamW(ps, foreach=True, **kw),
        "memfit-8": lambda ps, **kw: mo.AdamW(ps, state_bits=8, **kw),
        "memfit-4": lambda ps, **kw: mo.AdamW(ps, state_bits=4, **kw),
    }
    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb

        out["bnb-8"] = lambda ps, **kw: bnb.optim.AdamW8bit(ps, **kw)
        notes.append(f"bitsandbytes {bnb.__version__}")
    except Exception as exc:  # pragma: no cover - depends on the environment
        notes.append(f"bitsandbytes not importable ({type(exc).__name__}): skipped")
    try:
        import torchao
        from torchao.optim import AdamW4bit, AdamW8bit

        out["torchao-8"] = lambda ps, **kw: AdamW8bit(ps, **kw)
        out["torchao-4"] = lambda ps, **kw: AdamW4bit(ps, **kw)
        notes.append(f"torchao {torchao.__version__}")
    except Exception as exc:  # pragma: no cover
        notes.append(f"torchao not importable ({type(exc).__name__}): skipped")
    return out, notes


def _inner_tensors(t: torch.Tensor):
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from _inner_tensors(getattr(t, n))
    else:
        yield t


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0

    def visit(v):
        nonlocal total
        if isinstance(v, torch.Tensor):
            for t in _inner_tensors(v):
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
                if key not in seen:
                    seen.add(key)
                    total += t.numel() * t.element_size()
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)

    for st in opt.state.values():
        visit(st)
    return total


# --------------------------------------------------------------------------- step time


def big_params(layers: int, width: int, seed: int = 0) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    ps = []
    for _ in range(layers):
        lin = torch.nn.Linear(width, width)
        ps += [lin.weight, lin.bias]
    g = torch.Generator().manual_seed(seed + 1)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return ps


def bench_steps(makers, layers, width, rounds):
    ps = big_params(layers, width)
    n = sum(p.numel() for p in ps)
    log(f"step time: {layers} x Linear({width}, {width}) = {n / 1e6:.1f}M params, {rounds} rounds")
    opts, nbytes, errors = {}, {}, {}
    for name, make in makers.items():
        try:
            opt = make(ps)
            t0 = time.perf_counter()
            opt.step()  # creates the state (and builds kernels)
            log(f"  {name}: first step {time.perf_counter() - t0:.2f}s")
            opts[name] = opt
            nbytes[name] = state_bytes(opt) / n
        except Exception as exc:  # a contender that cannot run here is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            log(f"  {name}: FAILED {errors[name]}")
    steps = {name: opt.step for name, opt in opts.items()}
    timing = C.interleaved_timing(steps, rounds=rounds, baseline="torch-fused", warmup=1, log=log)
    return n, nbytes, timing, errors


# --------------------------------------------------------------------------- convergence


def bench_convergence(makers, steps, quick, seed=0):
    cfg, batches, base, n_params, n_bytes = C.demo_lm_setup(steps, quick, seed)
    log(f"convergence: GPT {cfg.n_layer}x{cfg.n_embd}, {n_params / 1e6:.2f}M params, {cfg.steps} steps, "
        f"{n_bytes / 1e6:.1f} MB of stdlib text")
    results, errors = {}, {}
    names = ["torch"] + [k for k in makers if k.startswith(("memfit", "bnb", "torchao"))]
    for name in names:
        model = copy.deepcopy(base)
        kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
        try:
            opt = torch.optim.AdamW(model.parameters(), **kw) if name == "torch" else makers[name](
                list(model.parameters()), **kw)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            continue
        t0 = time.perf_counter()
        try:
            losses = C.train_demo_lm(model, opt, batches, cfg)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            log(f"  {name}: FAILED {errors[name]}")
            continue
        tail = losses[-cfg.final_window:]
        results[name] = dict(final=sum(tail) / len(tail), last=losses[-1], seconds=time.perf_counter() - t0,
                             nonfinite=sum(1 for v in losses if not math.isfinite(v)))
        log(f"  {name}: final loss {results[name]['final']:.4f} ({results[name]['seconds']:.0f}s)")
    return cfg, n_params, results, errors


def merge_seeds(runs):
    """Mean final loss over seeds (every seed must have the optimizer), per-seed values kept."""
    cfg, n_params = runs[0][0], runs[0][1]
    results, errors = {}, {}
    for _, _, res, err in runs:
        errors.update(err)
    for name in runs[0][2]:
        per = [r[2][name] for r in runs if name in r[2]]
        if len(per) != len(runs):
            errors.setdefault(name, "failed on some seeds")
            continue
        mean = lambda key: sum(x[key] for x in per) / len(per)  # noqa: E731
        results[name] = dict(final=mean("final"), last=mean("last"), seconds=mean("seconds"),
                             nonfinite=sum(x["nonfinite"] for x in per), per_seed=[x["final"] for x in per])
    return cfg, n_params, results, errors


# --------------------------------------------------------------------------- report


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def build_report(info, notes, step_runs, conv_res, rounds):
    cfg, n_conv, conv, conv_err = conv_res
    lines = ["## Optimizer state (`bench/optim.py`)", ""]
    lines += C.machine_lines(info)
    lines += [f"- **contenders:** {', '.join(notes)}", MEMFIT_LAYOUTS, ""]
    for threads, step_res in step_runs:
        lines += step_table(threads, step_res, rounds)
    fused = {th: r[2]["torch-fused"].median_s for th, r in step_runs if "torch-fused" in r[2]}
    if len(fused) > 1 and max(fused) > min(fused) and fused[max(fused)] > fused[min(fused)]:
        lines += [f"Note: torch-fused took {fused[max(fused)] * 1e3:,.0f} ms with {max(fused)} threads but "
                  f"{fused[min(fused)] * 1e3:,.0f} ms with {min(fused)}: on this shared machine the multi-thread "
                  "timings mostly measure OpenMP threads waiting for a descheduled sibling, not the kernels. "
                  f"The {min(fused)}-thread table is the comparison of the kernels' own cost.", ""]
    lines += conv_table(cfg, n_conv, conv, conv_err)
    return "\n".join(lines)


def step_table(threads, step_res, rounds):
    n, nbytes, timing, step_err = step_res
    lines = [f"### State bytes per parameter and step time ({n / 1e6:.1f}M params, AdamW, "
             f"{threads} torch thread{'s' if threads > 1 else ''})", ""]
    rows = []
    for name in nbytes:
        tm = timing.get(name)
        lo, hi = tm.spread if tm else (float("nan"),) * 2
        b_ok = nbytes[name] <= BYTES_BARS[name] if name in BYTES_BARS else None
        t_ok = tm.median_ratio <= TIME_BARS[name] if (tm and name in TIME_BARS) else None
        bars = " ".join(x for x in (
            f"bytes<={BYTES_BARS[name]} {verdict(b_ok)}" if b_ok is not None else "",
            f"time<={TIME_BARS[name]}x {verdict(t_ok)}" if t_ok is not None else "") if x)
        rows.append([name, f"{nbytes[name]:.3f}", f"{tm.median_s * 1e3:,.0f}" if tm else "—",
                     f"{tm.median_ratio:.2f}x" if tm else "—", f"{lo:.2f}-{hi:.2f}", bars])
    for name, err in step_err.items():
        rows.append([name, "—", "—", "—", "—", f"failed: {err}"])
    lines.append(C.markdown_table(
        ["optimizer", "state bytes/param", "ms/step (median)", "vs torch-fused", "ratio range", "bar"], rows))
    lines += ["", f"Median over {rounds} interleaved rounds; the ratio is taken within each round.", ""]
    return lines


def conv_table(cfg, n_conv, conv, conv_err):
    lines = [f"### Convergence: small GPT on stdlib text ({cfg.steps} steps, {n_conv / 1e6:.2f}M params)", ""]
    base = conv.get("torch", {}).get("final")
    bnb = conv.get("bnb-8", {}).get("final")
    rows = []
    for name, r in conv.items():
        rel = (r["final"] - base) / base if base else float("nan")
        bars = []
        if name in CONV_BARS:
            bars.append(f"abs(rel)<={CONV_BARS[name]:.0%} {verdict(abs(rel) <= CONV_BARS[name])}")
            if name == "memfit-8" and bnb:
                bars.append(f"<=bnb+{BNB_MARGIN:.1%} {verdict(r['final'] <= bnb * (1 + BNB_MARGIN))}")
        seeds = ", ".join(f"{v:.4f}" for v in r.get("per_seed", [r["final"]]))
        rows.append([name, f"{r['final']:.4f}", seeds, f"{r['last']:.4f}", f"{rel:+.2%}", f"{r['seconds']:.0f}",
                     " ".join(bars)])
    for name, err in conv_err.items():
        rows.append([name, "—", "—", "—", "—", "—", f"failed: {err}"])
    lines.append(C.markdown_table(
        ["optimizer", f"final loss (mean of last {cfg.final_window}; mean over seeds)", "per seed", "last step",
         "vs torch AdamW", "s/run", "bar"],
        rows))
    clip = getattr(cfg, "grad_clip", None)
    lines += ["", f"Same init, batches and warmup+cosine LR (peak {cfg.lr}, weight decay {cfg.weight_decay}, "
              f"gradient-norm clip {clip}) "
              f"for every run; GPT {cfg.n_layer} layers x {cfg.n_embd}, seq {cfg.seq_len}, batch {cfg.batch_size}."]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few steps; implies --no-write")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; 2 with --quick)")
    ap.add_argument("--layers", type=int, default=None, help="Linear layers in the step-time model (default 24)")
    ap.add_argument("--width", type=int, default=None, help="their width (default 2048)")
    ap.add_argument("--steps", type=int, default=None, help="convergence steps (default 500; 30 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--also-threads", type=int, default=None,
                    help="time the steps a second time with this many threads (e.g. 1)")
    ap.add_argument("--conv-threads", type=int, default=1,
                    help="torch threads for the convergence runs (default 1: only losses matter there, and "
                         "tiny ops on 2 threads of a shared machine mostly wait at barriers)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="convergence runs per optimizer (seeds 0..N-1: init and batches); the mean is reported")
    ap.add_argument("--only", default=None, help="comma list of contenders to run")
    ap.add_argument("--skip-convergence", action="store_true")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOCS.relative_to(C.REPO)}")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 7)
    layers = args.layers or (4 if args.quick else 24)
    width = args.width or (512 if args.quick else 2048)
    steps = args.steps or (30 if args.quick else 500)
    makers, notes = contenders()
    if args.only:
        keep = set(args.only.split(",")) | {"torch-fused"}
        makers = {k: v for k, v in makers.items() if k in keep}
    info = C.machine_info()
    import memfit.optim as mo

    info["memfit optim backend (cpu)"] = mo.backend_name()
    step_runs = [(torch.get_num_threads(), bench_steps(makers, layers, width, rounds))]
    gc.collect()
    if args.also_threads:
        before = torch.get_num_threads()
        torch.set_num_threads(args.also_threads)
        step_runs.append((args.also_threads, bench_steps(makers, layers, width, rounds)))
        torch.set_num_threads(before)
        gc.collect()
    if args.skip_convergence:
        conv_res = (None, 0, {}, {})
    else:
        before = torch.get_num_threads()
        torch.set_num_threads(args.conv_threads)
        runs = [bench_convergence(makers, steps, args.quick, seed=sd) for sd in range(args.seeds)]
        conv_res = merge_seeds(runs)
        torch.set_num_threads(before)
    if conv_res[0] is None:
        from memfit.demo import DemoConfig

        conv_res = (DemoConfig(steps=max(steps, 2)), 0, {}, {})
    report = build_report(info, notes, step_runs, conv_res, rounds)
    C.publish(report, DOCS, MARKER, write=not (args.quick or args.no_write), log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
