#!/usr/bin/env python
"""Activation memory and step time: plain PyTorch vs torch.utils.checkpoint vs memfit.

Contenders, on each model:

* ``plain``: ordinary autograd.
* ``ckpt``: ``torch.utils.checkpoint`` (non-reentrant) around every block: each GPT-2
  transformer block (HF's own activation checkpointing), each ResNet bottleneck layer.
* ``memfit-8/4/2``: ``with memfit.activations(model, bits=b): loss = ...``, then
  ``loss.backward()`` outside the block. These are memfit's defaults, so at 4 and 2
  bits the loss head (what is saved after the last block: final norm, output layer,
  loss) is kept at 8 bits.
* ``memfit-2/all`` (``--with-everywhere``): 2 bits for the loss head too
  (``head_bits=2``), to show what the head costs in memory.

Measured, for each contender, as a ratio to ``plain``:

1. **kept**: bytes of live tensors once the loss exists (before backward), minus
   the live bytes before forward: what the forward pass leaves alive for backward.
   Measured for every contender the same way, with ``MemTracker``.
2. **peak**: the highest live tensor bytes during one full step (forward + backward,
   no optimizer), parameters and inputs included, also with ``MemTracker``.
3. **step time**: forward + backward (no optimizer), timed outside MemTracker, with
   the contenders interleaved round-robin after one warm-up step each; the ratio to
   plain is taken within each round, then the median over rounds.

Also reported: memfit's own ``stats.original_bytes -> stored_bytes`` as a cross-check,
and the seconds memfit spends in its pack (forward) and unpack (backward) hooks in one
extra step, to show where any time overhead goes.

Usage::

    python bench/activations.py                  # both models, 5 rounds, updates docs/benchmarks.md
    python bench/activations.py --quick          # tiny models, smoke test (< 1 min, no docs update)
    python bench/activations.py --models gpt2 --rounds 7 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

MARKER = "activations"
DOCS = C.REPO / "docs" / "benchmarks.md"
BITS = (8, 4, 2)

# The bars. kept: plain / contender must be >= the factor. time: contender /
# plain must be <= the factor.
KEPT_BARS = {("gpt2", "memfit-8"): 3.5, ("gpt2", "memfit-4"): 6.0, ("gpt2", "memfit-2"): 10.0,
             ("resnet50", "memfit-2"): 10.0}
TIME_BARS = {"memfit-8": 1.10, "memfit-4": 1.10, "memfit-2": 1.15}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    key: str  # "gpt2" / "resnet50"
    title: str
    model: torch.nn.Module
    tensors: tuple  # inputs, tracked by MemTracker
    loss: Callable[[], torch.Tensor]
    checkpointing: Callable[[], contextlib.AbstractContextManager]  # on for one step
    notes: list[str] = field(default_factory=list)


def build_gpt2(quick: bool) -> Workload:
    import transformers

    if quick:
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=1024)
        batch, seq = 2, 64
    else:
        cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=256, vocab_size=50257)
        batch, seq = 4, 256
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))

    # HF's per-block activation checkpointing, configured once (non-reentrant); each
    # step then only flips the blocks' flags, so the other contenders run plain.
    enable = getattr(model, "activation_checkpointing_enable", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers 4.x
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "disable_input_require_grads"):
        try:  # the embedding output requires grad anyway; keep 'plain' free of the hook
            model.disable_input_require_grads()
        except Exception:
            pass
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    n_blocks = sum(1 for m in flagged if type(m).__name__ == "GPT2Block")
    for m in flagged:
        m.gradient_checkpointing = False

    @contextlib.contextmanager
    def checkpointing():
        for m in flagged:
            m.gradient_checkpointing = True
        try:
            yield
        finally:
            for m in flagged:
                m.gradient_checkpointing = False

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    n_params = sum(p.numel() for p in model.parameters())
    title = (f"GPT-2{' (quick)' if quick else '-small'}: {cfg.n_layer} layers, d={cfg.n_embd}, "
             f"{n_params / 1e6:.0f}M params, batch {batch} x {seq}, fp32, train mode")
    notes = [f"attention: `{getattr(cfg, '_attn_implementation', None) or 'default'}`, dropout "
             f"{cfg.resid_pdrop}/{cfg.embd_pdrop}/{cfg.attn_pdrop}; ckpt = HF activation checkpointing "
             f"on {n_blocks} GPT2Block(s), non-reentrant"]
    return Workload("gpt2", title, model, (ids,), loss, checkpointing, notes)


def build_resnet(quick: bool, batch: int | None) -> Workload:
    import transformers
    from torch.utils.checkpoint import checkpoint

    if quick:
        cfg = transformers.ResNetConfig(depths=[1, 1, 1, 1], embedding_size=32,
                                        hidden_sizes=[64, 128, 256, 512], num_labels=1000)
        batch, size = batch or 2, 32
    else:
        cfg = transformers.ResNetConfig(num_labels=1000)  # defaults: ResNet-50
        batch, size = batch or 16, 224
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(cfg).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, cfg.num_labels, (batch,), generator=g)

    # torch.utils.checkpoint around each bottleneck layer, switched per step.
    state = {"on": False}
    layers = [m for m in model.modules() if type(m).__name__ == "ResNetBottleNeckLayer"]
    if not layers:
        layers = [m for m in model.modules() if type(m).__name__ == "ResNetBasicLayer"]

    def wrap(orig):
        def forward(hidden_state):
            if state["on"] and torch.is_grad_enabled():
                return checkpoint(orig, hidden_state, use_reentrant=False)
            return orig(hidden_state)

        return forward

    for m in layers:
        m.forward = wrap(m.forward)

    @contextlib.contextmanager
    def checkpointing():
        state["on"] = True
        try:
            yield
        finally:
            state["on"] = False

    def loss() -> torch.Tensor:
        return model(pixel_values=x, labels=y).loss

    n_params = sum(p.numel() for p in model.parameters())
    title = (f"ResNet-{'quick' if quick else '50'}: depths {list(cfg.depths)}, {cfg.layer_type}, "
             f"{n_params / 1e6:.1f}M params, batch {batch} x 3 x {size} x {size}, fp32, train mode")
    notes = [f"ckpt = torch.utils.checkpoint (non-reentrant) around each of the {len(layers)} "
             f"{type(layers[0]).__name__}s (BatchNorm running stats are updated twice, as with any "
             "checkpointing)"]
    return Workload("resnet50", title, model, (x, y), loss, checkpointing, notes)


# --------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    name: str
    mode: Callable[[], contextlib.AbstractContextManager]  # around forward + backward
    fwd: Callable[[], contextlib.AbstractContextManager]  # around forward only
    mf: object | None = None  # the memfit ActivationCompressor


def contenders(w: Workload, seed: int, with_everywhere: bool = False) -> list[Contender]:
    import memfit

    out = [Contender("plain", contextlib.nullcontext, contextlib.nullcontext),
           Contender("ckpt", w.checkpointing, contextlib.nullcontext)]
    for b in BITS:
        mf = memfit.activations(w.model, bits=b, seed=seed)
        out.append(Contender(f"memfit-{b}", contextlib.nullcontext, (lambda mf=mf: mf), mf))
    if with_everywhere:
        mf = memfit.activations(w.model, bits=2, head_bits=2, seed=seed)
        out.append(Contender("memfit-2/all", contextlib.nullcontext, (lambda mf=mf: mf), mf))
    return out


def forward(w: Workload, c: Contender) -> torch.Tensor:
    w.model.zero_grad(set_to_none=True)
    with c.fwd():
        loss = w.loss()
    return loss


def step(w: Workload, c: Contender) -> None:
    with c.mode():
        loss = forward(w, c)
        loss.backward()


def codec_seconds(w: Workload, c: Contender) -> tuple[float, float]:
    """Seconds spent in memfit's pack and unpack hooks during one step."""
    mf = c.mf
    spent = {"pack": 0.0, "unpack": 0.0}
    orig_pack, orig_unpack = mf._pack, mf._unpack

    def pack(t):
        t0 = time.perf_counter()
        try:
            return orig_pack(t)
        finally:
            spent["pack"] += time.perf_counter() - t0

    def unpack(p):
        t0 = time.perf_counter()
        try:
            return orig_unpack(p)
        finally:
            spent["unpack"] += time.perf_counter() - t0

    mf._pack, mf._unpack = pack, unpack  # instance attributes shadow the methods
    try:
        step(w, c)
    finally:
        del mf._pack, mf._unpack
    return spent["pack"], spent["unpack"]


# --------------------------------------------------------------------------- run one model


@dataclass
class Row:
    name: str
    mem: C.StepMemory
    timing: C.Timing
    stats: tuple[int, int] | None = None  # memfit (original_bytes, stored_bytes)
    codec: tuple[float, float] | None = None  # memfit (pack s, unpack s)


def run_model(w: Workload, rounds: int, seed: int, with_everywhere: bool = False) -> list[Row]:
    cs = contenders(w, seed, with_everywhere)
    log(f"\n== {w.title}")
    log(f"timing: 1 warm-up step each, then {rounds} interleaved rounds")
    timings = C.interleaved_timing({c.name: (lambda c=c: step(w, c)) for c in cs},
                                   rounds=rounds, baseline="plain", warmup=1, log=log)
    rows = []
    for c in cs:
        log(f"memory: {c.name} under MemTracker")
        w.model.zero_grad(set_to_none=True)
        gc.collect()
        with c.mode():
            mem = C.measure_step_memory(lambda c=c: forward(w, c), lambda loss: loss.backward(),
                                        w.model, *w.tensors)
        row = Row(c.name, mem, timings[c.name])
        if c.mf is not None:
            row.stats = (c.mf.stats.original_bytes, c.mf.stats.stored_bytes)
            log(f"codec: {c.name} pack/unpack hook time")
            row.codec = codec_seconds(w, c)
        rows.append(row)
    w.model.zero_grad(set_to_none=True)
    return rows


# --------------------------------------------------------------------------- report


def fraction(x: float) -> str:
    return "1/inf" if x <= 0 else (f"1/{1 / x:.2f}" if x < 1 else f"{x:.2f}")


def bars_for(key: str, row: Row, plain: Row) -> tuple[str, str, list[tuple[str, bool]]]:
    verdicts = []
    kept_bar = time_bar = "—"
    factor = KEPT_BARS.get((key, row.name))
    if factor is not None:
        ok = row.mem.kept * factor <= plain.mem.kept
        kept_bar = f"≤1/{factor:g} {'PASS' if ok else 'FAIL'}"
        verdicts.append((f"kept ≤ 1/{factor:g} of plain", ok))
    limit = TIME_BARS.get(row.name)
    if limit is not None:
        ok = row.timing.median_ratio <= limit
        time_bar = f"≤{limit:.2f}x {'PASS' if ok else 'FAIL'}"
        verdicts.append((f"step time ≤ {limit:.2f}x plain", ok))
    return kept_bar, time_bar, verdicts


HEADERS = ["contender", "kept MB", "kept/plain", "memfit stats MB", "peak MB", "peak/plain",
           "step s", "time/plain (min–max)", "pack+unpack s", "kept bar", "time bar"]


def table_rows(key: str, rows: list[Row]) -> tuple[list[list[str]], list[tuple[str, str, bool]]]:
    plain = rows[0]
    out, verdicts = [], []
    for r in rows:
        kept_ratio = r.mem.kept / plain.mem.kept if plain.mem.kept else float("nan")
        lo, hi = r.timing.spread
        stats = "—"
        if r.stats is not None:
            o, s = r.stats
            stats = f"{C.mb(o)}→{C.mb(s)} ({o / s:.2f}x)" if s else f"{C.mb(o)}→0"
        codec = "—"
        if r.codec is not None:
            p, u = r.codec
            codec = f"{p:.2f}+{u:.2f} ({(p + u) / plain.timing.median_s:.0%})"
        kept_bar, time_bar, v = bars_for(key, r, plain)
        verdicts += [(r.name, what, ok) for what, ok in v]
        out.append([
            r.name, C.mb(r.mem.kept), fraction(kept_ratio), stats, C.mb(r.mem.peak),
            f"{r.mem.peak / plain.mem.peak:.2f}x", f"{r.timing.median_s:.2f}",
            f"{r.timing.median_ratio:.3f}x ({lo:.2f}–{hi:.2f})", codec, kept_bar, time_bar,
        ])
    return out, verdicts


def markdown_section(info: dict, results: list[tuple[Workload, list[Row]]], rounds: int) -> str:
    lines = [
        "## Activations: plain vs checkpointing vs memfit",
        "",
        "Written by `bench/activations.py`; do not edit by hand between the markers.",
        "",
        *C.machine_lines(info),
        "",
        "- **kept**: live tensor bytes once the loss exists minus live bytes before forward "
        "(what forward leaves for backward), MemTracker, same for every contender.",
        "- **peak**: highest live tensor bytes in one step (forward + backward, no optimizer), "
        "parameters, inputs and gradients included, MemTracker.",
        f"- **step time**: forward + backward, no optimizer, 1 warm-up then {rounds} rounds "
        "interleaved round-robin; ratio to plain within each round, median (and min–max) over "
        "rounds. Not run under MemTracker.",
        "- **memfit stats**: memfit's own `stats.original_bytes → stored_bytes` (ratio), a "
        "cross-check of the measured kept bytes.",
        "- **pack+unpack s**: time inside memfit's saved-tensor hooks in one extra step "
        "(share of the plain step in brackets).",
    ]
    for w, rows in results:
        trows, verdicts = table_rows(w.key, rows)
        lines += ["", f"### {w.title}", ""]
        lines += [f"- {n}" for n in w.notes]
        lines += ["", C.markdown_table(HEADERS, trows), ""]
        if verdicts:
            lines.append("Bars: " + "; ".join(
                f"{name} {what}: **{'PASS' if ok else 'FAIL'}**" for name, what, ok in verdicts) + ".")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2,resnet50", help="comma list of gpt2, resnet50")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    ap.add_argument("--batch-resnet", type=int, default=None, help="ResNet batch (default 16; 2 with --quick)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="memfit stochastic-rounding seed")
    ap.add_argument("--quick", action="store_true", help="tiny models: a smoke test; implies --no-write")
    ap.add_argument("--with-everywhere", action="store_true",
                    help="add memfit-2/all: 2 bits for the loss head too (head_bits=2)")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOCS.relative_to(C.REPO)}")
    args = ap.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"gpt2", "resnet50"}
    if unknown:
        ap.error(f"unknown model(s): {', '.join(sorted(unknown))}")
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    if rounds < 1:
        ap.error("--rounds must be >= 1")
    torch.set_num_threads(args.threads)

    import memfit  # noqa: F401  (fail early if it is not importable)

    info = C.machine_info()
    backend = info["memfit codec backend (cpu)"]
    print(f"memfit codec backend (cpu): {backend}")
    for k, v in info.items():
        log(f"{k}: {v}")

    results = []
    for key in models:
        w = build_gpt2(args.quick) if key == "gpt2" else build_resnet(args.quick, args.batch_resnet)
        rows = run_model(w, rounds, args.seed, args.with_everywhere)
        results.append((w, rows))
        w.model = w.loss = w.checkpointing = None  # free the model before the next one
        w.tensors = ()
        trows, verdicts = table_rows(w.key, rows)
        C.print_table(f"{w.title}  [codec backend: {backend}]", HEADERS, trows)
        for n in w.notes:
            print(f"  {n}")
        gc.collect()

    try:
        info["load average (1/5/15 min, at end)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        log(f"load average at end: {info['load average (1/5/15 min, at end)']}")
    except OSError:
        pass
    all_verdicts = [(w.key, *v) for w, rows in results for v in table_rows(w.key, rows)[1]]
    if all_verdicts:
        print("\nBars (ratios vs plain):")
        for key, name, what, ok in all_verdicts:
            print(f"  {'PASS' if ok else 'FAIL'}  {key:9s} {name:9s} {what}")
    print(f"\ncodec backend: {backend}; threads: {torch.get_num_threads()}; step = forward + backward, no optimizer")

    if args.quick or args.no_write:
        print("(docs not updated: " + ("--quick" if args.quick else "--no-write") + ")")
    else:
        C.update_markdown_section(DOCS, MARKER, markdown_section(info, results, rounds))
        print(f"updated {DOCS.relative_to(C.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
