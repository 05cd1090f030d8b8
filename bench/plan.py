#!/usr/bin/env python
"""memfit.plan against its bars, with real measured peaks.

Parts (``--parts``, default all):

* ``sweep``: GPT-2-small shape (12 x 768, vocab 50257, batch 4 x 256, AdamW). Plain
  PyTorch's measured peak and the smallest peak the planner can reach
  (``BudgetTooSmall.min_peak_bytes``, estimated) bound a sweep of budgets; at each,
  ``memfit.plan`` then :func:`memfit.plan.measure_peak` (real tensors, MemTracker,
  2 steps: the second is reported, optimizer state alive) of the plan's config.
  Bars: measured <= budget; measured >= 85% of the budget; |predicted - measured| <=
  10% of measured.
* ``time``: at every sweep budget that full activation checkpointing (every block,
  fp32 AdamW) also meets (its measured peak <= budget), the plan's whole training step
  (forward, backward, optimizer) against checkpointing's, interleaved round-robin
  after a warm-up, median of per-round ratios. Bar: plan / checkpointing <= 1.
* ``floor``: LLaMA shape (hidden 768, 12 layers, intermediate 2048, vocab 32000;
  LlamaConfig's default untied embeddings: 134M parameters), AdamW, batch 2 x 256:
  budgets of 60% and 40% of plain's measured peak. Bar: measured <= budget. The same
  shape with tied embeddings (110M) is reported too.
* ``fit``: the demo's GPT-2 (memfit.demo, stdlib bytes): the fp32 run and the planned
  run (``memfit.demo.make_demo_plan``: a quarter of the fp32 run's peak, or the
  smallest reachable peak + 5% when a quarter is below it), same init, data, steps.
  Bar: final loss within 1% of fp32. GPT-2-small's own quarter budget is reported
  from the sweep (planned or BudgetTooSmall with its figures).
* ``fitlm``: GPT-2-small shape at GPT-2's context, batch 4 x 1024, AdamW: plain
  PyTorch's measured peak (the model's own loss), then ``memfit.plan`` at a quarter of
  it with ``loss_fn=memfit.causal_lm_loss()`` (the output layer and cross-entropy in
  chunks), measured. Bar: measured <= budget. (Memory only: training GPT-2-small for
  the demo's steps is hours on this machine; the demo's loss bar is ``fit``'s.)
* ``fitloss``: GPT-2-small planned at a quarter of plain's peak with
  ``causal_lm_loss`` (``--fit-batch``, default 4x1024, as ``fitlm``), trained for
  ``--fit-steps`` steps (default 30) on the demo's text against fp32 (torch AdamW, the
  model's own loss), same init and batches, the two runs stepping in turn: final loss
  (the demo's: mean of the last 20 steps; the last fifth is shown too) vs fp32. The fit
  bar wants the demo's 300 steps: hours here, so ``--fit-dir`` saves both runs every
  ``--fit-save-every`` steps and a rerun with the same arguments resumes (a rerun of a
  finished run only measures and reports). Then the plan's peak is measured. The
  smallest batch at which a quarter of plain's peak is reachable is 4 x 512 (or 2 x
  1024), but only with 4-bit optimizer state, which ``statebits`` shows lags fp32 at
  GPT-2's vocabulary; at 6 x 512 the plan keeps 8-bit state; at 3 x 512 and below the
  floor is over a quarter (parameters dominate)::

      python bench/plan.py --parts fitloss --fit-steps 300 --fit-batch 6x512 \
          --fit-dir /work/fitrun/ck6 --json fitloss6.json --no-write

  The fp32 run does not depend on the plan: ``--fit-runs fp32`` trains only a fit
  dir's fp32 run, and ``--fit-baseline DIR`` trains only a (new) plan against DIR's
  fp32 losses, so a changed planner's plan is trained without training fp32 again::

      python bench/plan.py --parts fitloss --fit-steps 300 --fit-batch 6x512 \
          --fit-dir /work/fitrun/ck6 --fit-runs fp32 --threads 1 --no-write
      python bench/plan.py --parts fitloss --fit-steps 300 --fit-batch 6x512 \
          --fit-dir /work/fitrun/ck7 --fit-baseline /work/fitrun/ck6 --threads 1 \
          --json fitloss7.json --no-write

  ``--fit-plan JSON`` trains a given plan instead of planning: a ``Plan.to_json``, or a
  fit dir's ``meta.json`` with its plan edited (a unit's ``choice``, ``state_bits``),
  so an ablation asks which part of a plan costs loss. Its result is never the bar.
* ``statebits``: what the planner's fidelity prices for optimizer state rest on.
  GPT-2 4 x 384 (vocab 50257), batch 4 x 256, ``causal_lm_loss``, the first 40 steps
  of fitloss's 300-step schedule (lr 3e-4, warm-up 50) on the demo's text: torch
  AdamW against memfit AdamW at 8 and 4 bits, 4 bits with the tied embedding's state
  kept fp32 (``memfit.optim.keep_fp32``), and 4-bit activations on the middle blocks
  with fp32 state. Loss of the last 5 steps vs fp32.
* ``batch``: ``memfit.max_batch_size`` on GPT-2 (6 x 768, seq 256, AdamW) for a budget;
  the answer is measured (bar: <= budget) and the next size up estimated (bar: above
  budget x (1 - margin)).

Usage::

    python bench/plan.py                       # everything, updates docs/benchmarks.md ("plan")
    python bench/plan.py --quick               # tiny shapes, a smoke test (no docs update)
    python bench/plan.py --parts sweep,time --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

MARKER = "plan"
DOCS = C.REPO / "docs" / "benchmarks.md"
PARTS = ("sweep", "time", "floor", "fit", "fitlm", "fitloss", "statebits", "batch")
QUIET = Path("/tmp/memfit_quiet")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def wait_quiet() -> None:
    """The machine is shared: wait while /tmp/memfit_quiet exists (someone is timing)."""
    waited = False
    while QUIET.exists():
        if not waited:
            log("/tmp/memfit_quiet exists: waiting")
            waited = True
        time.sleep(60)
    if waited:
        log("quiet flag gone: going on")


def mb(n) -> str:
    return "—" if n is None else f"{n / 1e6:,.0f}"


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


# --------------------------------------------------------------------------- models


def gpt2(n_layer: int, n_embd: int, batch: int, seq: int, vocab: int = 50257):
    import transformers

    cfg = transformers.GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), n_positions=seq, vocab_size=vocab,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        bos_token_id=None if vocab < 50257 else 50256, eos_token_id=None if vocab < 50257 else 50256,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids}


def llama(tied: bool, quick: bool):
    import transformers

    if quick:
        cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=1024,
                                       num_attention_heads=4, tie_word_embeddings=tied, use_cache=False)
        b, s = 2, 32
    else:
        cfg = transformers.LlamaConfig(hidden_size=768, num_hidden_layers=12, intermediate_size=2048,
                                       vocab_size=32000, num_attention_heads=12, tie_word_embeddings=tied,
                                       use_cache=False)
        b, s = 2, 256
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids}, f"{b}x{s}"


def warmup_cosine(steps: int, warmup: int):
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then cosine down to 10%
    at ``steps`` (fitloss's schedule; statebits runs its first steps)."""

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    return factor


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def plan_desc(p) -> str:
    from collections import Counter

    counts = Counter(u.choice for u in p.units if u.plain_bytes > 0)
    acts = ", ".join(f"{n} {c}" for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    opt = f"{p.optimizer_name}-{p.state_bits}" + (" in-bwd" if p.optimizer_in_backward else "")
    return f"{opt}; {acts}"


# --------------------------------------------------------------------------- sweep + time


def part_sweep(args, state: dict) -> None:
    import memfit
    from memfit.plan import BudgetTooSmall, StepConfig, measure_peak

    wait_quiet()
    if args.quick:
        model, batch = gpt2(3, 64, 4, 64, vocab=1024)
        shape = "GPT-2 3 x 64, vocab 1024, batch 4 x 64"
    else:
        model, batch = gpt2(12, 768, 4, 256)
        shape = "GPT-2-small shape (12 x 768, vocab 50257), batch 4 x 256"
    blocks = tuple(f"transformer.h.{i}" for i in range(model.config.n_layer))
    log(f"sweep: {shape}, {n_params(model) / 1e6:.1f}M params")
    plain = measure_peak(model, batch, StepConfig())
    log(f"plain measured peak {mb(plain.peak_bytes)} MB ({plain.peak_phase})")
    ckpt = measure_peak(model, batch, StepConfig(checkpoint=blocks))
    log(f"full checkpointing measured peak {mb(ckpt.peak_bytes)} MB ({ckpt.peak_phase})")
    cache: dict = {}
    t0 = time.perf_counter()
    floor, floor_dom = None, None
    try:
        memfit.plan(model, batch, 1, cache=cache)
    except BudgetTooSmall as exc:
        floor, floor_dom = exc.min_peak_bytes, exc.dominant
    log(f"smallest reachable peak (estimated) {mb(floor)} MB, dominated by {floor_dom} "
        f"({time.perf_counter() - t0:.0f} s)")
    # The smallest budget the planner can meet: its smallest peak plus its 2% margin.
    lo, hi = floor / 0.98 * 1.01, plain.peak_bytes
    n = args.budgets
    budgets = [int(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
    rows = []
    for b in budgets:
        wait_quiet()
        t0 = time.perf_counter()
        try:
            p = memfit.plan(model, batch, b, cache=cache)
        except BudgetTooSmall as exc:
            rows.append({"budget": b, "error": str(exc), "min_peak": exc.min_peak_bytes})
            log(f"budget {mb(b)} MB: BudgetTooSmall ({exc})")
            continue
        secs = time.perf_counter() - t0
        m = measure_peak(model, batch, p.config)
        row = {
            "budget": b, "plan": plan_desc(p), "predicted": p.predicted_peak_bytes, "measured": m.peak_bytes,
            "measured_phase": m.peak_phase, "overhead": p.predicted_overhead, "plan_seconds": secs,
            "rounds": len(p.search.get("rounds", [])), "config": p.config.to_dict(), "plan_json": p.to_json(),
            "checkpoint_fits": ckpt.peak_bytes <= b,
        }
        row["fits"] = m.peak_bytes <= b
        row["used"] = m.peak_bytes / b
        row["pred_err"] = (p.predicted_peak_bytes - m.peak_bytes) / m.peak_bytes
        rows.append(row)
        log(f"budget {mb(b)} MB: {row['plan']}: predicted {mb(p.predicted_peak_bytes)}, measured "
            f"{mb(m.peak_bytes)} ({pct(row['used'])} of budget, error {pct(row['pred_err'])}), planned in {secs:.0f} s")
    quarter = plain.peak_bytes // 4
    state["sweep"] = {
        "shape": shape, "n_params": n_params(model), "plain_peak": plain.peak_bytes,
        "plain.peak_phase": plain.peak_phase, "plain_breakdown": plain.peak_breakdown,
        "ckpt_peak": ckpt.peak_bytes, "floor": floor, "floor_dominant": floor_dom, "rows": rows,
        "quarter": quarter, "quarter_fits": floor is not None and floor <= quarter,
        "machine": C.machine_info(),
    }
    state["_sweep_objects"] = (model, batch, blocks)


def part_time(args, state: dict) -> None:
    from memfit.plan import StepConfig, apply, make_optimizer, resolve_loss_fn, run_step

    sw = state.get("sweep")
    objs = state.get("_sweep_objects")
    if sw is None and args.sweep_from:
        # The plans of an earlier run's sweep, timed again (more rounds, a quieter
        # machine) without planning again: the model is rebuilt exactly as the sweep built it.
        sw = state["sweep"] = json.loads(Path(args.sweep_from).read_text())["sweep"]
        quick = sw["shape"].startswith("GPT-2 3 x 64")
        model, batch = gpt2(3, 64, 4, 64, vocab=1024) if quick else gpt2(12, 768, 4, 256)
        objs = (model, batch, tuple(f"transformer.h.{i}" for i in range(model.config.n_layer)))
        log(f"time: the sweep of {args.sweep_from}")
    if sw is None or objs is None:
        log("time: needs the sweep in the same run (or --sweep-from); skipped")
        return
    model, batch, blocks = objs
    fn = resolve_loss_fn(None)
    configs: dict[str, dict] = {}
    for row in sw["rows"]:
        if "error" in row or not row["checkpoint_fits"]:
            continue
        key = json.dumps(row["config"], sort_keys=True)
        configs.setdefault(key, row["config"])
    if not configs:
        log("time: no sweep budget that full checkpointing meets")
        state["time"] = {"rows": [], "rounds": args.rounds}
        return
    wait_quiet()
    stack = contextlib.ExitStack()
    steps = {}

    def make_step(cfg: StepConfig):
        m = copy.deepcopy(model)
        m.train()
        opt = make_optimizer(m, cfg)
        ctx = stack.enter_context(apply(m, cfg, opt))

        def step():
            run_step(m, batch, cfg, fn, opt, context=ctx)

        return step

    with stack:
        steps["checkpointing"] = make_step(StepConfig(checkpoint=blocks))
        names = {}
        for i, (key, cfgd) in enumerate(configs.items()):
            name = f"plan {i + 1}"
            names[key] = name
            steps[name] = make_step(StepConfig.from_dict(cfgd))
        log(f"time: {len(steps) - 1} distinct plan(s) vs checkpointing, {args.rounds} rounds")
        timings = C.interleaved_timing(steps, rounds=args.rounds, baseline="checkpointing", warmup=1, log=log)
    out = []
    for row in sw["rows"]:
        if "error" in row or not row["checkpoint_fits"]:
            continue
        t = timings[names[json.dumps(row["config"], sort_keys=True)]]
        out.append({"budget": row["budget"], "plan": row["plan"], "plan_s": t.median_s,
                    "ckpt_s": timings["checkpointing"].median_s, "ratio": t.median_ratio, "spread": t.spread,
                    "predicted_overhead": row["overhead"]})
    state["time"] = {"rows": out, "rounds": args.rounds, "machine": C.machine_info()}
    del steps
    gc.collect()


# --------------------------------------------------------------------------- floor


def part_floor(args, state: dict) -> None:
    import memfit
    from memfit.plan import BudgetTooSmall, StepConfig, measure_peak

    results = []
    for tied in (False, True):
        wait_quiet()
        model, batch, bshape = llama(tied, args.quick)
        label = f"LLaMA {'tied' if tied else 'untied'} ({n_params(model) / 1e6:.1f}M), batch {bshape}"
        plain = measure_peak(model, batch, StepConfig())
        log(f"floor: {label}: plain measured peak {mb(plain.peak_bytes)} MB ({plain.peak_phase}), "
            f"breakdown {({k: mb(v) for k, v in plain.peak_breakdown.items() if v})}")
        caches: dict = {}
        for frac in (0.6, 0.4):
            b = int(plain.peak_bytes * frac)
            # the model's own loss first; when that cannot fit, memfit.causal_lm_loss (as
            # BudgetTooSmall's message advises when the logits weigh on the floor)
            for loss_name, loss_fn in (("model's own", None), ("causal_lm_loss", memfit.causal_lm_loss())):
                wait_quiet()
                base = {"model": label, "frac": frac, "budget": b, "plain_peak": plain.peak_bytes, "loss": loss_name}
                t0 = time.perf_counter()
                try:
                    p = memfit.plan(model, batch, b, loss_fn=loss_fn, cache=caches.setdefault(loss_name, {}))
                except BudgetTooSmall as exc:
                    results.append({**base, "error": str(exc), "min_peak": exc.min_peak_bytes,
                                    "dominant": exc.dominant})
                    log(f"  {frac:.0%} ({loss_name} loss): BudgetTooSmall: {exc}")
                    continue
                secs = time.perf_counter() - t0
                m = measure_peak(model, batch, p.config, loss_fn=loss_fn)
                results.append({**base, "plan": plan_desc(p), "predicted": p.predicted_peak_bytes,
                                "measured": m.peak_bytes, "fits": m.peak_bytes <= b, "plan_seconds": secs,
                                "breakdown": m.peak_breakdown})
                log(f"  {frac:.0%} = {mb(b)} MB ({loss_name} loss): {plan_desc(p)}: predicted "
                    f"{mb(p.predicted_peak_bytes)}, measured {mb(m.peak_bytes)} "
                    f"({'fits' if m.peak_bytes <= b else 'OVER'}), planned in {secs:.0f} s")
                break
        del model
        gc.collect()
    state["floor"] = {"rows": results, "machine": C.machine_info()}


# --------------------------------------------------------------------------- fit


def part_fit(args, state: dict) -> None:
    from memfit import demo
    from memfit.data import ByteBatches, load_text_bytes

    wait_quiet()
    cfg = demo.DemoConfig.quick(steps=12) if args.quick else demo.DemoConfig()
    data = load_text_bytes(max_bytes=cfg.max_data_bytes)
    batches = ByteBatches(data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.steps, seed=cfg.seed)
    base = demo.build_model(cfg)
    log(f"fit: demo GPT-2 ({n_params(base) / 1e6:.2f}M params), {cfg.steps} steps")
    fp32 = demo.train_run(base, batches, cfg, "fp32", "plain", None)
    log(f"  fp32: final loss {fp32.final_loss:.4f}, peak {fp32.peak_bytes / 1e6:.1f} MB (step 1)")
    t0 = time.perf_counter()
    p, note = demo.make_demo_plan(base, batches, cfg, fp32.peak_bytes)
    secs = time.perf_counter() - t0
    if note:
        log(f"  {note}")
    run = demo.train_run(base, batches, cfg, "memfit.plan", "planned", None, plan=p)
    rel = (run.final_loss - fp32.final_loss) / fp32.final_loss
    log(f"  planned ({plan_desc(p)}): final loss {run.final_loss:.4f} ({rel:+.2%}), peak {run.peak_bytes / 1e6:.1f} MB "
        f"(step 1), budget {p.budget_bytes / 1e6:.1f} MB, planned in {secs:.0f} s")
    from memfit.plan import StepConfig, measure_peak

    x0 = next(iter(batches))
    steady_plain = measure_peak(base, {"input_ids": x0, "labels": x0}, StepConfig(max_grad_norm=cfg.grad_clip))
    steady = measure_peak(base, {"input_ids": x0, "labels": x0}, p.config)
    state["fit"] = {
        "n_params": n_params(base), "steps": cfg.steps, "fp32_loss": fp32.final_loss,
        "plan_loss": run.final_loss, "rel": rel, "plan": plan_desc(p), "budget": p.budget_bytes,
        "fp32_peak_step1": fp32.peak_bytes, "plan_peak_step1": run.peak_bytes,
        "fp32_peak_steady": steady_plain.peak_bytes, "plan_peak_steady": steady.peak_bytes,
        "note": note, "plan_seconds": secs, "quarter": fp32.peak_bytes // 4,
        "machine": C.machine_info(),
    }


def quarter_plan(state: dict, n_layer: int, n_embd: int, bsz: int, seq: int, vocab: int = 50257,
                 divisor: int = 4) -> dict:
    """GPT-2 of this shape, plain's measured peak and ``memfit.plan`` at a quarter of it
    (``divisor``: --quick's tiny models cannot reach a quarter) with ``causal_lm_loss``
    (``plan`` None, ``error`` set when it cannot fit); made once per run and shared by
    ``fitlm`` and ``fitloss``."""
    import memfit
    from memfit.plan import BudgetTooSmall, StepConfig, measure_peak

    key = (n_layer, n_embd, bsz, seq, vocab, divisor)
    made = state.setdefault("_quarter_plans", {})
    if key not in made:
        model, batch = gpt2(n_layer, n_embd, bsz, seq, vocab=vocab)
        plain = measure_peak(model, batch, StepConfig())
        budget = plain.peak_bytes // divisor
        log(f"  GPT-2 {n_layer} x {n_embd}, vocab {vocab}, batch {bsz} x {seq}: plain measured "
            f"{mb(plain.peak_bytes)} MB (in {plain.peak_phase}); budget {mb(budget)} MB")
        loss_fn = memfit.causal_lm_loss()
        t0 = time.perf_counter()
        try:
            p, error = memfit.plan(model, batch, budget, loss_fn=loss_fn, cache={}), None
        except BudgetTooSmall as exc:
            p, error = None, exc
        made[key] = {"model": model, "batch": batch, "plain": plain, "budget": budget, "loss_fn": loss_fn,
                     "plan": p, "error": error, "seconds": time.perf_counter() - t0}
    return made[key]


def part_fitlm(args, state: dict) -> None:
    import memfit
    from memfit.plan import BudgetTooSmall, measure_peak

    wait_quiet()
    shape = "GPT-2 3 x 64, vocab 1024, batch 4 x 256" if args.quick else \
        "GPT-2-small shape (12 x 768, vocab 50257), batch 4 x 1024"
    log(f"fitlm: {shape}")
    q = quarter_plan(state, 3, 64, 4, 256, vocab=1024) if args.quick else quarter_plan(state, 12, 768, 4, 1024)
    model, batch, plain, budget, loss_fn = q["model"], q["batch"], q["plain"], q["budget"], q["loss_fn"]
    row: dict = {"shape": shape, "n_params": n_params(model), "plain_peak": plain.peak_bytes,
                 "logits_bytes": batch["labels"].numel() * model.config.vocab_size * 4,
                 "plain.peak_phase": plain.peak_phase, "budget": budget, "machine": C.machine_info()}
    try:
        memfit.plan(model, batch, budget, cache={})
    except BudgetTooSmall as exc:
        row["own_loss_floor"] = exc.min_peak_bytes
        row["own_loss_dominant"] = exc.dominant
    p, secs = q["plan"], q["seconds"]
    if p is None:
        row.update(error=str(q["error"]), min_peak=q["error"].min_peak_bytes)
        log(f"  chunked loss: BudgetTooSmall {q['error']}")
        state["fitlm"] = row
        return
    m = measure_peak(model, batch, p.config, loss_fn=loss_fn)
    row.update(plan=plan_desc(p), predicted=p.predicted_peak_bytes, measured=m.peak_bytes, plan_seconds=secs,
               overhead=p.predicted_overhead)
    log(f"  plan ({plan_desc(p)}): predicted {mb(p.predicted_peak_bytes)} MB, measured {mb(m.peak_bytes)} MB "
        f"(planned in {secs:.0f} s)")
    state["fitlm"] = row


def part_fitloss(args, state: dict) -> None:
    """The fitlm plan trained: fp32 (torch AdamW, the model's own loss) against
    memfit.plan at a quarter of plain's peak (with causal_lm_loss), on the demo's
    text, for ``--fit-steps`` steps, the two runs stepping in turn.

    With ``--fit-dir`` the run is resumable: the plan, and every ``--fit-save-every``
    steps both runs' weights, optimizer and scheduler states, losses and the RNG
    state, are written there (atomically), and a later call with the same arguments
    goes on from the last save. A resumed planned run restarts the activation
    engine's stochastic-rounding stream from its seed: statistically the same run,
    not bit-for-bit.

    The fp32 run does not depend on the plan, so one fp32 run serves every plan of the
    same configuration: ``--fit-runs fp32`` (or ``memfit.plan``) trains only that run of
    a ``--fit-dir`` (the other's saved state is carried along untouched), and
    ``--fit-baseline DIR`` trains only the planned run and takes fp32's losses from
    DIR's run (read again at the end: DIR may be training alongside)."""
    import os

    import memfit
    from memfit.data import ByteBatches, load_text_bytes

    wait_quiet()
    steps = args.fit_steps
    bsz, seq = (int(v) for v in args.fit_batch.lower().split("x"))
    n_layer, n_embd, bsz, seq = (3, 64, 4, 256) if args.quick else (12, 768, bsz, seq)
    vocab = 1024 if args.quick else 50257
    warmup, lr = max(1, steps // 6), 3e-4
    config = {"n_layer": n_layer, "n_embd": n_embd, "vocab": vocab, "batch": bsz, "seq": seq, "steps": steps,
              "lr": lr, "warmup": warmup}
    log(f"fitloss: GPT-2 {n_layer} x {n_embd}, batch {bsz} x {seq}, {steps} steps")
    ckdir = Path(args.fit_dir) if args.fit_dir else None
    meta_path = ckdir / "meta.json" if ckdir else None
    names = [n.strip() for n in (args.fit_runs or "fp32,memfit.plan").split(",") if n.strip()]
    if not names or set(names) - {"fp32", "memfit.plan"}:
        raise SystemExit(f"--fit-runs takes fp32 and/or memfit.plan, not {args.fit_runs!r}")
    baseline = Path(args.fit_baseline) if args.fit_baseline else None
    if baseline is not None:
        if ckdir is None or baseline.resolve() == ckdir.resolve():
            raise SystemExit("--fit-baseline needs its own --fit-dir for the planned run")
        other = json.loads((baseline / "meta.json").read_text())["config"]
        if other != config:
            raise SystemExit(f"--fit-baseline {baseline} holds another configuration ({other}), not {config}")
        names = ["memfit.plan"]

    def baseline_run() -> dict:
        saved = torch.load(baseline / "state.pt", weights_only=False)["runs"]["fp32"]
        return {"losses": saved["losses"], "seconds": saved["seconds"]}
    given, given_plain_peak = None, None  # --fit-plan: a plan to train instead of planning (ablations)
    if args.fit_plan:
        given = json.loads(Path(args.fit_plan).read_text())
        if "units" not in given and "plan" in given:  # a fit dir's meta.json
            given, given_plain_peak = given["plan"], given.get("plain_peak")
        if "units" not in given:
            raise SystemExit(f"--fit-plan {args.fit_plan}: not a memfit plan (Plan.to_json) or a fit dir's meta.json")
    if meta_path is not None and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["config"] != config:
            raise SystemExit(f"{ckdir} holds another run ({meta['config']}), not this one ({config}): "
                             "use another --fit-dir or remove it")
        base, _ = gpt2(n_layer, n_embd, bsz, seq, vocab=vocab)
        plan_dict, budget, plain_peak = meta["plan"], meta["budget"], meta["plain_peak"]
        if given is not None and given != plan_dict:
            raise SystemExit(f"{ckdir} trains another plan than --fit-plan {args.fit_plan}: use another --fit-dir")
        loss_fn = memfit.causal_lm_loss()
        log(f"  resuming from {ckdir}")
    elif given is not None:
        base, _ = gpt2(n_layer, n_embd, bsz, seq, vocab=vocab)
        plain_peak = given_plain_peak or given.get("plain_peak_bytes", 0)
        plan_dict, budget, loss_fn = given, int(given["budget_bytes"]), memfit.causal_lm_loss()
        log(f"  training the plan in {args.fit_plan}, not one planned now")
        if ckdir is not None:
            ckdir.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps({"config": config, "plan": plan_dict, "budget": budget,
                                             "plain_peak": plain_peak, "given": str(args.fit_plan)}, indent=1))
    else:
        q = quarter_plan(state, n_layer, n_embd, bsz, seq, vocab=vocab, divisor=2 if args.quick else 4)
        if q["plan"] is None:
            log(f"  BudgetTooSmall at a quarter of plain's peak: {q['error']}; skipped")
            return
        base, budget, loss_fn = q["model"], q["budget"], q["loss_fn"]
        plan_dict, plain_peak = q["plan"].to_dict(), q["plain"].peak_bytes
        if ckdir is not None:
            ckdir.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps({"config": config, "plan": plan_dict, "budget": budget,
                                             "plain_peak": plain_peak}, indent=1))
    p = memfit.Plan.from_dict(plan_dict, base)
    data = load_text_bytes(max_bytes=4_000_000)
    batches = list(ByteBatches(data, seq_len=seq, batch_size=bsz, steps=steps, seed=0))
    log(f"  plan at {mb(budget)} MB of plain's {mb(plain_peak)} MB: {plan_desc(p)}")
    factor = warmup_cosine(steps, warmup)
    runs: dict = {}
    for name in names:
        model = copy.deepcopy(base).train()
        if name == "fp32":
            opt, ctx, fn = torch.optim.AdamW(model.parameters(), lr=lr), None, None
        else:
            bound = type(p).from_dict(plan_dict, model)
            opt, ctx, fn = bound.optimizer(lr=lr), bound, loss_fn
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        runs[name] = {"model": model, "opt": opt, "sched": sched, "ctx": ctx, "fn": fn, "losses": [], "seconds": []}
    del base
    state_path = ckdir / "state.pt" if ckdir else None
    done, resumes = 0, 0
    carried: dict = {}  # saved states of runs not trained this time
    if state_path is not None and state_path.exists():
        saved = torch.load(state_path, weights_only=False)
        for name, s in saved["runs"].items():
            if name not in runs:
                carried[name] = s
                continue
            r = runs[name]
            r["model"].load_state_dict(s["model"])
            r["opt"].load_state_dict(s["opt"])
            r["sched"].load_state_dict(s["sched"])
            r["losses"], r["seconds"] = s["losses"], s["seconds"]
        lengths = {len(r["losses"]) for r in runs.values()}
        if len(lengths) != 1:
            raise SystemExit(f"{ckdir}: the runs were saved at different steps "
                             f"({ {n: len(r['losses']) for n, r in runs.items()} }): train them one at a time "
                             "with --fit-runs")
        torch.set_rng_state(saved["rng"])
        done, resumes = lengths.pop(), saved.get("resumes", 0) + 1
        log(f"  resumed at step {done}/{steps}" + (f" ({', '.join(names)} only)" if carried else ""))
    reference = baseline_run()["losses"] if baseline is not None else []

    def save(step: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"step": step, "rng": torch.get_rng_state(), "resumes": resumes,
                    "runs": {**carried, **{name: {"model": r["model"].state_dict(), "opt": r["opt"].state_dict(),
                                                  "sched": r["sched"].state_dict(), "losses": r["losses"],
                                                  "seconds": r["seconds"]} for name, r in runs.items()}}}, tmp)
        os.replace(tmp, state_path)

    for i in range(done, steps):
        x = batches[i]
        b = {"input_ids": x, "labels": x}
        for name, r in runs.items():
            t1 = time.perf_counter()
            with r["ctx"] if r["ctx"] is not None else contextlib.nullcontext():
                loss = r["fn"](r["model"], b) if r["fn"] is not None else r["model"](**b).loss
            loss.backward()
            r["opt"].step()
            r["opt"].zero_grad(set_to_none=True)
            r["sched"].step()
            r["losses"].append(loss.item())
            r["seconds"].append(time.perf_counter() - t1)
            del loss
        if (i + 1) % 5 == 0 or i + 1 == steps:
            if baseline is not None and len(reference) <= i:
                reference = baseline_run()["losses"]
            ref = (f", fp32 (baseline) loss {reference[i]:.4f}, plan vs fp32 "
                   f"{100 * (runs['memfit.plan']['losses'][-1] / reference[i] - 1):+.2f}%"
                   if len(reference) > i else "")
            log(f"  step {i + 1}/{steps}: " + ", ".join(
                f"{name} loss {r['losses'][-1]:.4f} ({r['seconds'][-1]:.1f} s)" for name, r in runs.items()) + ref)
        if state_path is not None and ((i + 1) % args.fit_save_every == 0 or i + 1 == steps):
            save(i + 1)
    out = {name: {"losses": r["losses"], "seconds": r["seconds"]} for name, r in runs.items()}
    count = n_params(next(iter(runs.values()))["model"])
    del runs
    gc.collect()
    if "memfit.plan" not in out:
        log(f"  fp32 only: {len(out['fp32']['losses'])} steps in {ckdir}, the baseline for --fit-baseline {ckdir}")
        return
    if baseline is not None:
        out["fp32"] = baseline_run()
        if len(out["fp32"]["losses"]) < steps:
            log(f"  the baseline {baseline} has {len(out['fp32']['losses'])} of {steps} steps: not comparable yet")
    # the trained plan's own peak, measured as the sweep's are (MemTracker, second of two steps)
    from memfit.plan import measure_peak

    fresh, _ = gpt2(n_layer, n_embd, bsz, seq, vocab=vocab)
    x0 = batches[0]
    measured = measure_peak(fresh, {"input_ids": x0, "labels": x0}, p.config, loss_fn=loss_fn).peak_bytes
    log(f"  planned step measured {mb(measured)} MB (budget {mb(budget)} MB)")
    del fresh
    state["fitloss"] = {"shape": f"GPT-2 {n_layer} x {n_embd} (vocab {vocab}), batch {bsz} x {seq}",
                        "n_params": count,
                        "steps": steps, "lr": lr,
                        "warmup": warmup, "budget": budget, "plain_peak": plain_peak, "plan": plan_desc(p),
                        "predicted": p.predicted_peak_bytes, "measured": measured,
                        "runs": out, "resumes": resumes, "machine": C.machine_info(),
                        "baseline": str(baseline) if baseline is not None else None,
                        "given_plan": str(args.fit_plan) if args.fit_plan else None}


def part_statebits(args, state: dict) -> None:
    """Early-training loss of compressed optimizer state and activations against fp32
    (the evidence behind memfit.plan.planner.STATE_FIDELITY)."""
    import memfit
    from memfit.data import ByteBatches, load_text_bytes
    from memfit.plan import StepConfig
    from memfit.step import apply, make_optimizer, run_step

    wait_quiet()
    n_layer, n_embd, bsz, seq, n = (2, 64, 2, 64, 6) if args.quick else (4, 384, 4, 256, 40)
    vocab = 1024 if args.quick else 50257
    model, _ = gpt2(n_layer, n_embd, bsz, seq, vocab=vocab)
    data = load_text_bytes(max_bytes=4_000_000)
    batches = list(ByteBatches(data, seq_len=seq, batch_size=bsz, steps=n, seed=0))
    warmup, lr = 50, 3e-4
    factor = warmup_cosine(300, warmup)
    middle = {f"transformer.h.{i}": 4 for i in range(1, n_layer - 1)} or {"transformer.h.0": 4}
    variants = {
        "fp32 (torch AdamW)": StepConfig(),
        "8-bit state": StepConfig(state_bits=8),
        "4-bit state": StepConfig(state_bits=4),
        "4-bit state, embedding's fp32": StepConfig(state_bits=4),
        "4-bit activations (middle blocks)": StepConfig(policy={"": None, **middle}),
    }
    loss_fn = memfit.causal_lm_loss()
    log(f"statebits: GPT-2 {n_layer} x {n_embd}, vocab {vocab}, batch {bsz} x {seq}, {n} steps")
    runs = {}
    for name, cfg in variants.items():
        m = copy.deepcopy(model).train()
        if "embedding's fp32" in name:
            memfit.optim.keep_fp32(m.transformer.wte.weight)
        opt = make_optimizer(m, cfg, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        losses = []
        with apply(m, cfg, opt) as ctx:
            for x in batches:
                b = {"input_ids": x, "labels": x}
                losses.append(run_step(m, b, cfg, loss_fn, opt, context=ctx).item())
                sched.step()
        runs[name] = losses
        log(f"  {name}: loss step {n} {losses[-1]:.4f}")
        del m, opt
        gc.collect()
    state["statebits"] = {"shape": f"GPT-2 {n_layer} x {n_embd} (vocab {vocab}), batch {bsz} x {seq}",
                          "steps": n, "lr": lr, "warmup": warmup, "runs": runs, "machine": C.machine_info()}


# --------------------------------------------------------------------------- max batch size


def part_batch(args, state: dict) -> None:
    import memfit
    from memfit.plan import StepConfig, estimate, measure_peak

    wait_quiet()
    if args.quick:
        model, _ = gpt2(2, 64, 1, 64, vocab=1024)
        seq, vocab, budget = 64, 1024, "8MB"
    else:
        model, _ = gpt2(6, 768, 1, 256)
        seq, vocab, budget = 256, 50257, "2.5GB"

    def make(n):
        ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(n))
        return {"input_ids": ids, "labels": ids}

    margin = 0.05
    t0 = time.perf_counter()
    n = memfit.max_batch_size(model, make, budget, margin=margin)
    secs = time.perf_counter() - t0
    from memfit.plan import parse_budget

    b = parse_budget(budget)
    est_n = estimate(model, make(n)).peak_bytes
    est_next = estimate(model, make(n + 1)).peak_bytes
    meas = measure_peak(model, make(n), StepConfig()).peak_bytes
    log(f"batch: max_batch_size = {n} for {budget} ({secs:.0f} s): estimated {mb(est_n)}, measured {mb(meas)}; "
        f"n+1 estimated {mb(est_next)} (limit {mb(b * (1 - margin))})")
    state["batch"] = {
        "model": f"GPT-2 {model.config.n_layer} x {model.config.n_embd}, seq {seq}, AdamW", "budget": b,
        "budget_spec": budget, "margin": margin, "n": n, "est_n": est_n, "measured_n": meas,
        "est_next": est_next, "seconds": secs, "machine": C.machine_info(),
    }


# --------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(state: dict, args) -> tuple[str, list[tuple[str, bool, str]]]:
    lines: list[str] = []
    bars: list[tuple[str, bool, str]] = []
    info = None
    for part in PARTS:
        if part in state and state[part].get("machine"):
            info = state[part]["machine"]
            break
    lines.append("## memfit.plan: budgets met, measured")
    lines.append("")
    lines.append("`python bench/plan.py`: the planner's bars. Every peak is the peak of a whole training step "
                 "(forward, backward, optimizer step; the second of two steps, so the optimizer state is alive) of "
                 "live tensor bytes, measured on real tensors with torch's `MemTracker` "
                 "(`memfit.plan.measure_peak`); *predicted* is the plan's `predicted_peak_bytes` (memfit.plan.estimate "
                 "on fake tensors of the chosen configuration). MB = 10^6 bytes.")
    lines.append("")
    if info:
        lines += C.machine_lines(info)
        lines.append("")
        # A report merged from several runs (--report-only) says where each part came from.
        other = [(part, state[part]["machine"]) for part in PARTS
                 if part in state and state[part].get("machine")
                 and state[part]["machine"].get("command") != info.get("command")]
        if other:
            lines.append("Parts measured in other runs (same machine):")
            lines.append("")
            lines += [f"- **{part}:** {m.get('date')}, `{m.get('command')}`" for part, m in other]
            lines.append("")
    sw = state.get("sweep")
    if sw:
        lines.append(f"### Sweep: {sw['shape']}, AdamW ({sw['n_params'] / 1e6:.1f}M params)")
        lines.append("")
        lines.append(f"Plain PyTorch measured peak: **{mb(sw['plain_peak'])} MB** (in {sw['plain.peak_phase']}); full "
                     f"activation checkpointing (fp32 AdamW): {mb(sw['ckpt_peak'])} MB; smallest peak the planner "
                     f"reaches (estimated): {mb(sw['floor'])} MB, dominated by {sw['floor_dominant']}.")
        lines.append("")
        rows = []
        for r in sw["rows"]:
            if "error" in r:
                rows.append([mb(r["budget"]), "BudgetTooSmall", "—", "—", "—", "—", "—", "FAIL"])
                bars.append((f"sweep {mb(r['budget'])} MB", False, "BudgetTooSmall"))
                continue
            ok = r["fits"] and r["used"] >= 0.85 and abs(r["pred_err"]) <= 0.10
            rows.append([mb(r["budget"]), r["plan"], mb(r["predicted"]), mb(r["measured"]), pct(r["used"]),
                         f"{100 * r['pred_err']:+.1f}%", f"{100 * r['overhead']:+.1f}%", verdict(ok)])
            bars.append((f"sweep {mb(r['budget'])} MB", ok,
                         f"measured {mb(r['measured'])} MB = {pct(r['used'])} of budget, prediction error "
                         f"{100 * r['pred_err']:+.1f}%"))
        lines.append(C.markdown_table(
            ["budget MB", "plan (optimizer; units)", "predicted MB", "measured MB", "of budget",
             "pred. error", "pred. time", "bar"], rows))
        lines.append("")
        lines.append("Bar: measured <= budget, measured >= 85% of the budget, |predicted - measured| <= 10%. "
                     "*pred. time*: the plan's predicted step-time overhead. Units: the transformer blocks, the "
                     "embeddings, final norm, output layer and the root (loss); \"keep\" counts units that save "
                     "anything for backward.")
        lines.append("")
    tm = state.get("time")
    if tm:
        lines.append(f"### Step time vs full activation checkpointing (budgets checkpointing also meets; "
                     f"{tm['rounds']} interleaved rounds after a warm-up)")
        lines.append("")
        rows = []
        for r in tm["rows"]:
            ok = r["ratio"] <= 1.0
            lo, hi = r["spread"]
            rows.append([mb(r["budget"]), r["plan"], f"{r['plan_s']:.2f}", f"{r['ckpt_s']:.2f}",
                         f"{r['ratio']:.2f}x ({lo:.2f}-{hi:.2f})", verdict(ok)])
            bars.append((f"time {mb(r['budget'])} MB", ok, f"plan/checkpointing {r['ratio']:.2f}x"))
        if rows:
            lines.append(C.markdown_table(["budget MB", "plan", "plan s/step", "ckpt s/step",
                                           "plan / ckpt (min-max)", "bar"], rows))
        else:
            lines.append("No sweep budget is met by full checkpointing.")
        lines.append("")
        lines.append("Whole training steps (forward, backward, optimizer step), each contender on its own copy of "
                     "the model; checkpointing = `torch.utils.checkpoint` around every block with torch's AdamW.")
        lines.append("")
    fl = state.get("floor")
    if fl:
        lines.append("### Budget floor: LLaMA shape (hidden 768, 12 layers, intermediate 2048, vocab 32000), AdamW")
        lines.append("")
        rows = []
        for i, r in enumerate(fl["rows"]):
            loss = r.get("loss", "model's own")
            retried = i + 1 < len(fl["rows"]) and fl["rows"][i + 1]["budget"] == r["budget"] \
                and fl["rows"][i + 1]["model"] == r["model"]
            if "error" in r:
                rows.append([r["model"], f"{r['frac']:.0%} = {mb(r['budget'])}", mb(r["plain_peak"]), loss,
                             f"BudgetTooSmall: min {mb(r['min_peak'])} MB, {r['dominant']}", "—", "—",
                             "(next row)" if retried else "FAIL"])
                if not retried:
                    bars.append((f"floor {r['model']} {r['frac']:.0%}", False, "BudgetTooSmall"))
                continue
            rows.append([r["model"], f"{r['frac']:.0%} = {mb(r['budget'])}", mb(r["plain_peak"]), loss, r["plan"],
                         mb(r["predicted"]), mb(r["measured"]), verdict(r["fits"])])
            bars.append((f"floor {r['model']} {r['frac']:.0%}" + (" (causal_lm_loss)" if loss != "model's own" else ""),
                         r["fits"], f"measured {mb(r['measured'])} MB <= {mb(r['budget'])} MB"))
        lines.append(C.markdown_table(["model, batch", "budget (of plain) MB", "plain MB", "loss", "plan",
                                       "predicted MB", "measured MB", "bar"], rows))
        lines.append("")
        lines.append("Plain's peak is at the end of backward / the optimizer step (parameters, all gradients, "
                     "AdamW state); activations alone cannot bring it down, so the planner compresses the "
                     "optimizer state and, for the tighter budgets, steps the optimizer inside backward. With tied "
                     "embeddings, memfit's optimizer-in-backward sums the output layer's and the embedding's "
                     "gradients in place (autograd's own sum holds three embedding-sized tensors at once under a "
                     "dispatch mode such as MemTracker); what is left at the floor with the model's own loss is the "
                     "loss head (logits, their log-softmax and gradient: 3 x 65 MB at 2 x 256 x 32000), which "
                     "`memfit.causal_lm_loss()` computes in chunks. Plain's peak is always the model's own loss.")
        lines.append("")
    ft = state.get("fit")
    if ft:
        ok = abs(ft["rel"]) <= 0.01
        at_quarter = not ft["note"]
        bars.append(("fit: a quarter of fp32's peak reachable on the demo's GPT-2", at_quarter,
                     "planned at a quarter" if at_quarter else ft["note"]))
        bars.append(("fit: planned run's final loss within 1% of fp32", ok,
                     f"{100 * ft['rel']:+.2f}% at a budget of {ft['budget'] / 2**20:.1f} MiB "
                     f"({100 * ft['budget'] / ft['fp32_peak_step1']:.0f}% of fp32's step-1 peak)"))
        lines.append(f"### Fit: the demo's GPT-2 ({ft['n_params'] / 1e6:.2f}M params), {ft['steps']} steps")
        lines.append("")
        mib = 2**20
        rows = [
            ["fp32", f"{ft['fp32_peak_step1'] / mib:.1f}", f"{ft['fp32_peak_steady'] / mib:.1f}", "—",
             f"{ft['fp32_loss']:.4f}", "", ""],
            ["memfit.plan", f"{ft['plan_peak_step1'] / mib:.1f}", f"{ft['plan_peak_steady'] / mib:.1f}",
             f"{ft['budget'] / mib:.1f}", f"{ft['plan_loss']:.4f}", f"{100 * ft['rel']:+.2f}%", verdict(ok)],
        ]
        lines.append(C.markdown_table(["run", "peak MiB (step 1)", "peak MiB (steady)", "budget MiB", "final loss",
                                       "vs fp32", "bar (1%)"], rows))
        lines.append("")
        lines.append("As `memfit demo` runs it (MiB, as the demo prints; *step 1*: the demo's own measurement, "
                     "*steady*: `measure_peak`, second step). "
                     f"Plan: {ft['plan']}. " + (ft["note"] + "." if ft["note"] else
                                                "Budget: a quarter of the fp32 run's step-1 peak."))
        lines.append("")
    if sw:
        q = sw["quarter"]
        bars.append(("fit: a quarter of plain's peak reachable on GPT-2-small 4 x 256", bool(sw["quarter_fits"]),
                     f"quarter {mb(q)} MB, smallest reachable {mb(sw['floor'])} MB"))
        lines.append(f"GPT-2-small shape at a quarter of plain's measured peak ({mb(q)} MB): "
                     + ("reachable" if sw["quarter_fits"] else
                        f"not reachable: the smallest peak memfit reaches is {mb(sw['floor'])} MB, dominated by "
                        f"{sw['floor_dominant']}") + ".")
        lines.append("")
    fl2 = state.get("fitlm")
    if fl2:
        lines.append(f"### Fit, memory: {fl2['shape']}, AdamW ({fl2['n_params'] / 1e6:.1f}M params), a quarter of "
                     "plain's measured peak, with `memfit.causal_lm_loss()`")
        lines.append("")
        own = (f"With the model's own loss the planner cannot reach it: smallest peak {mb(fl2['own_loss_floor'])} MB, "
               f"dominated by {fl2['own_loss_dominant']} (the full logits: {mb(fl2['logits_bytes'])} MB each). "
               if "own_loss_floor" in fl2 else "")
        if "error" in fl2:
            ok = False
            lines.append(f"Plain measured {mb(fl2['plain_peak'])} MB; budget {mb(fl2['budget'])} MB. {own}"
                         f"With the chunked loss: BudgetTooSmall, smallest peak {mb(fl2['min_peak'])} MB.")
        else:
            ok = fl2["measured"] <= fl2["budget"]
            lines.append(C.markdown_table(
                ["run", "peak MB (measured)", "budget MB", "predicted MB", "plan", "bar"],
                [["plain PyTorch (model's own loss)", mb(fl2["plain_peak"]), "—", "—", "—", ""],
                 ["memfit.plan + causal_lm_loss", mb(fl2["measured"]), mb(fl2["budget"]), mb(fl2["predicted"]),
                  fl2["plan"], verdict(ok)]]))
            lines.append("")
            lines.append(own + f"Planned in {fl2['plan_seconds']:.0f} s; predicted step-time overhead "
                         f"{100 * fl2['overhead']:+.1f}%. Training GPT-2-small for the demo's 300 steps takes hours "
                         "on this machine: fitloss (below) trains a quarter-budget plan against fp32 and names "
                         "the plan it trained (an earlier run's may differ from this one's).")
        bars.append(("fit: GPT-2-small 4 x 1024 at a quarter of plain's peak (causal_lm_loss), measured", ok,
                     "BudgetTooSmall" if "error" in fl2 else f"{mb(fl2['measured'])} MB <= {mb(fl2['budget'])} MB"))
        lines.append("")
    fs = state.get("fitloss")
    if fs:
        from memfit.demo import DemoConfig

        # a run compared with a separately trained fp32 baseline (--fit-baseline) that
        # has not finished is compared over the steps both have
        common = min(len(fs["runs"][n]["losses"]) for n in ("fp32", "memfit.plan"))
        given = fs.get("given_plan")  # an ablation's plan is not what memfit.plan returns: never the bar
        full = common >= fs["steps"] >= DemoConfig().steps and not given
        # "final loss" as the demo defines it (DemoConfig.final_window: the mean of the last 20 steps), and over the
        # last fifth of the run as a steadier second view
        demo_window = min(DemoConfig().final_window, fs["steps"])
        fifth = max(1, fs["steps"] // 5)

        def tail_mean(name: str, k: int) -> float:
            tail = fs["runs"][name]["losses"][:common][-k:]
            return sum(tail) / len(tail)

        rel = {k: (tail_mean("memfit.plan", k) - tail_mean("fp32", k)) / tail_mean("fp32", k)
               for k in (demo_window, fifth)}
        lines.append(f"### Fit, loss{'' if full else ' (a given plan)' if given else ' (short run)'}: {fs['shape']} "
                     f"({fs['n_params'] / 1e6:.1f}M params), {fs['steps']} steps on the demo's text")
        lines.append("")
        rows = []
        for name in ("fp32", "memfit.plan"):
            r = fs["runs"][name]
            sec = statistics.median(r["seconds"][1:] or r["seconds"])  # step 1 warms up
            vs = ("", "") if name == "fp32" else (f"{100 * rel[demo_window]:+.2f}%", f"{100 * rel[fifth]:+.2f}%")
            rows.append([name, f"{r['losses'][0]:.4f}", f"{tail_mean(name, demo_window):.4f}", vs[0],
                         f"{tail_mean(name, fifth):.4f}", vs[1], f"{sec:.1f}"])
        lines.append(C.markdown_table(["run", "loss step 1", f"final loss (mean of last {demo_window}, as the demo)",
                                       "vs fp32", f"mean of last {fifth}", "vs fp32", "s/step (median)"], rows))
        lines.append("")
        lines.append(f"fp32: torch AdamW and the model's own loss; memfit.plan: "
                     + (f"a given plan (`--fit-plan {given}`, an ablation, not planned now) "
                        if given else "the plan for a quarter of plain's peak ")
                     + f"({mb(fs['budget'])} MB of {mb(fs['plain_peak'])}: {fs['plan']}) with "
                     f"`memfit.causal_lm_loss()`. Same initialisation and batches; lr {fs['lr']:g}, "
                     f"{fs['warmup']} warm-up steps, cosine to 10%, no clipping."
                     + (f" fp32 is the run of `{fs['baseline']}` (`--fit-baseline`: it does not depend on the "
                        "plan, so one fp32 run serves every plan), trained separately: compare losses, not step "
                        "times." if fs.get("baseline") else
                        " The two runs step in turn, so their step times share the machine alike.")
                     + (f" **Incomplete: compared over the {common} of {fs['steps']} steps both runs have.**"
                        if common < fs["steps"] else "")
                     + ("" if full or given else f" A short run, not the demo's {DemoConfig().steps} steps: it is evidence, "
                        "not the fit bar.")
                     + (f" The run was saved (`--fit-dir`) and resumed {fs['resumes']} time(s) from its last save; "
                        "each resume restarts the activation engine's stochastic-rounding stream, and its first, "
                        "cold step counts in the step times." if fs.get("resumes") else "")
                     + (f" Run {fs['machine'].get('date', '')}: `{fs['machine'].get('command', '')}`."
                        if fs.get("machine") else ""))
        lines.append("")
        if common >= 20:
            # the gap's course: early lags in the steep part of the curve say little about the end
            width = max(5, common // 10)
            heads, cells = [], []
            for lo in range(0, common - common % width, width):
                f32 = fs["runs"]["fp32"]["losses"][lo:lo + width]
                pl = fs["runs"]["memfit.plan"]["losses"][lo:lo + width]
                heads.append(f"{lo + 1}-{lo + width}")
                cells.append(f"{100 * (sum(pl) / sum(f32) - 1):+.2f}%")
            lines.append(f"Mean loss of memfit.plan against fp32's over each {width} steps:")
            lines.append("")
            lines.append(C.markdown_table(["steps"] + heads, [["memfit.plan vs fp32"] + cells]))
            lines.append("")
        if fs.get("measured") is not None:
            lines.append(f"The planned step's peak, measured (MemTracker, second of two steps): "
                         f"{mb(fs['measured'])} MB; predicted {mb(fs['predicted'])} MB; budget {mb(fs['budget'])} MB.")
            lines.append("")
            bars.append((f"fit: the trained {'given ' if given else ''}plan's measured peak within its budget "
                         f"({fs['shape']})",
                         fs["measured"] <= fs["budget"], f"{mb(fs['measured'])} MB <= {mb(fs['budget'])} MB"))
        if full:
            bars.append((f"fit: GPT-2-small ({fs['shape']}) at a quarter of plain's peak, the demo's "
                         f"{fs['steps']} steps: final loss within 1% of fp32", abs(rel[demo_window]) <= 0.01,
                         f"{100 * rel[demo_window]:+.2f}% (last {fifth}: {100 * rel[fifth]:+.2f}%)"))
        else:
            bars.append((f"fit ({'a given plan' if given else 'short run'}, {fs['steps']} steps, not the bar): "
                         "GPT-2-small planned loss within 1% "
                         "of fp32", abs(rel[demo_window]) <= 0.01, f"{100 * rel[demo_window]:+.2f}%"))
    sb = state.get("statebits")
    if sb:
        base = sb["runs"]["fp32 (torch AdamW)"]
        k = min(5, sb["steps"])
        ref = sum(base[-k:]) / k
        lines.append(f"### Optimizer-state and activation bits, early training: {sb['shape']}, "
                     f"first {sb['steps']} steps")
        lines.append("")
        rows = []
        for name, losses in sb["runs"].items():
            tail = sum(losses[-k:]) / k
            rows.append([name, f"{losses[0]:.4f}", f"{tail:.4f}", f"{100 * (tail - ref) / ref:+.2f}%"])
        lines.append(C.markdown_table(["run", "loss step 1", f"mean of last {k}", "vs fp32"], rows))
        lines.append("")
        lines.append(f"Same initialisation and batches (the demo's text), `memfit.causal_lm_loss()` for every "
                     f"run, lr {sb['lr']:g} with {sb['warmup']} warm-up steps of a 300-step cosine schedule "
                     "(fitloss's). The planner prices 4-bit state above recomputing every block "
                     "(`memfit.plan.planner.STATE_FIDELITY`) because of this table: it uses 4 bits only when the "
                     "budget needs them." + (f" Run {sb['machine'].get('date', '')}: "
                                             f"`{sb['machine'].get('command', '')}`." if sb.get("machine") else ""))
        lines.append("")
    bt = state.get("batch")
    if bt:
        ok1 = bt["measured_n"] <= bt["budget"]
        ok2 = bt["est_next"] > bt["budget"] * (1 - bt["margin"])
        bars.append(("max_batch_size: answer measured within budget", ok1,
                     f"{mb(bt['measured_n'])} MB <= {mb(bt['budget'])} MB"))
        bars.append(("max_batch_size: next size estimated over", ok2,
                     f"{mb(bt['est_next'])} MB > {mb(bt['budget'] * (1 - bt['margin']))} MB"))
        lines.append(f"### max_batch_size: {bt['model']}, budget {bt['budget_spec']}, margin {bt['margin']:.0%}")
        lines.append("")
        lines.append(C.markdown_table(
            ["answer", "estimated MB", "measured MB", "n+1 estimated MB", "limit MB", "search s", "bars"],
            [[bt["n"], mb(bt["est_n"]), mb(bt["measured_n"]), mb(bt["est_next"]),
              mb(bt["budget"] * (1 - bt["margin"])), f"{bt['seconds']:.0f}",
              f"{verdict(ok1)} / {verdict(ok2)}"]]))
        lines.append("")
    if bars:
        lines.append("### Bars")
        lines.append("")
        lines += [f"- {verdict(ok)}: {name} ({what})" for name, ok, what in bars]
        lines.append("")
    return "\n".join(lines), bars


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--budgets", type=int, default=None, help="sweep budgets (default 7; 4 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    ap.add_argument("--sweep-from", default=None, metavar="JSON",
                    help="time: time the plans of the sweep in this --json file instead of planning again")
    ap.add_argument("--fit-steps", type=int, default=30, help="fitloss: training steps (default 30)")
    ap.add_argument("--fit-batch", default="4x1024", help="fitloss: batch x sequence (default 4x1024)")
    ap.add_argument("--fit-dir", default=None,
                    help="fitloss: save both runs here and resume from them (hours-long runs)")
    ap.add_argument("--fit-runs", default=None,
                    help="fitloss with --fit-dir: train only these of fp32,memfit.plan (default both)")
    ap.add_argument("--fit-baseline", default=None, metavar="DIR",
                    help="fitloss: take fp32's losses from this --fit-dir of the same configuration and train "
                         "only the planned run")
    ap.add_argument("--fit-save-every", type=int, default=10, help="fitloss with --fit-dir: steps between saves")
    ap.add_argument("--fit-plan", default=None, metavar="JSON",
                    help="fitloss: train this plan (Plan.to_json, or a fit dir's meta.json, edited for an ablation) "
                         "instead of planning a quarter of plain's peak; use it with --fit-baseline")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test; implies --no-write")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOCS.relative_to(C.REPO)}")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--report-only", default=None, metavar="JSON",
                    help="run nothing: render the report (and update the docs) from a --json file")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = set(parts) - set(PARTS)
    if bad:
        ap.error(f"unknown part(s): {', '.join(sorted(bad))}")
    args.budgets = args.budgets or (4 if args.quick else 7)
    args.rounds = args.rounds or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")
    state: dict = {}
    t0 = time.perf_counter()
    if args.report_only:
        state = json.loads(Path(args.report_only).read_text())
        parts = []
    for part in PARTS:
        if part in parts:
            globals()[f"part_{part}"](args, state)
    for key in [k for k in state if k.startswith("_")]:  # live objects shared between parts
        del state[key]
    body, bars = report(state, args)
    print()
    print(body)
    print("\nBars:")
    for name, ok, what in bars:
        print(f"  {verdict(ok)}  {name}: {what}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json and not args.report_only:
        Path(args.json).write_text(json.dumps(state, indent=1, default=str))
    if args.quick or args.no_write:
        print("(docs not updated: " + ("--quick" if args.quick else "--no-write") + ")")
    else:
        C.update_markdown_section(DOCS, MARKER, body)
        print(f"updated {DOCS.relative_to(C.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
