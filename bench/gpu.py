"""memfit on one CUDA GPU, in one run (issue 18, item 5): activations, optimizers, the
codec, the estimator and the planner, checked against the issue's GPU bars.

    python bench/gpu.py                      # CUDA: the full run, written to docs/benchmarks.md
    python bench/gpu.py --quick --device cpu --no-write   # tiny shapes: a smoke test

Sections (``--only`` picks some):

* ``activations``: forward + backward of GPT-2-small (12 x 768) and a LLaMA shape in
  bf16, batch 8 x 1024: plain, activation checkpointing per block, memfit 8/4/2 bits,
  offload; and plain vs offload at sequence 4096. Peak = ``max_memory_allocated`` of a
  step (parameters included), step time = median of per-round ratios to plain over
  interleaved rounds after a warm-up (CUDA-synchronised).
* ``optim``: one optimizer step over ~100M fp32 parameters: memfit AdamW at 8 and 4
  bits vs ``torch.optim.AdamW(fused=True)``; bitsandbytes' and torchao's 8/4-bit AdamW
  when they are importable.
* ``codec``: encode + decode of a 256 MB fp32 tensor at 8/4/2 bits and fp8 against a
  device-to-device copy of the same bytes.
* ``estimate``: ``memfit.estimate`` (peak and the caching allocator's reserved bytes)
  against ``max_memory_allocated`` / ``max_memory_reserved`` of the second of two
  real training steps (AdamW), plain and at 4 bits.
* ``plan``: ``memfit.plan`` under two budgets, then the measured peak of the planned
  step against the budget.

Each section's failure is reported in its table and the run goes on. On CPU
(``--device cpu``) peaks come from MemTracker (``max_memory_allocated`` means nothing
there), reserved bytes are not measured, and nothing is compared with the GPU bars:
that mode exists to check the script.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    end_bench,
    interleaved_timing,
    machine_lines,
    markdown_table,
    measure_step_memory,
    print_table,
    publish,
    start_bench,
)

import memfit  # noqa: E402
from memfit._units import MB  # noqa: E402

SECTIONS = ("activations", "optim", "codec", "estimate", "plan")

# The bars on a GPU.
BAR_CODEC = 0.50  # encode+decode throughput, as a share of a device copy's
BAR_ACT4 = 1.10  # memfit 4-bit step time vs plain, GPT-2-small bf16 8 x 1024
BAR_ADAMW8 = 1.20  # memfit 8-bit AdamW step vs torch fused AdamW
BAR_OFFLOAD_PEAK = 0.30  # offload peak at least this far below plain, seq 4096
BAR_OFFLOAD_TIME = 1.10
BAR_ESTIMATE = 0.05  # estimate within this of max_memory_allocated


@dataclass
class Shapes:
    gpt2: dict
    llama: dict
    batch: int
    seq: int
    long_batch: int
    long_seq: int
    optim_params: int
    codec_bytes: int
    est_batch: int
    est_seq: int
    plan_model: dict
    plan_batch: int
    plan_seq: int
    plan_budgets: tuple[str, ...]
    rounds: int


FULL = Shapes(
    gpt2=dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=4096),
    llama=dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16,
               intermediate_size=2816, vocab_size=32000, max_position_embeddings=4096),
    batch=8, seq=1024, long_batch=2, long_seq=4096,
    optim_params=100 * 2**20, codec_bytes=256 * 2**20,
    est_batch=4, est_seq=512,
    plan_model=dict(n_layer=6, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    plan_batch=4, plan_seq=512, plan_budgets=("60%", "35%"), rounds=5,
)
QUICK = Shapes(
    gpt2=dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128),
    llama=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=128, vocab_size=256, max_position_embeddings=128),
    batch=2, seq=64, long_batch=1, long_seq=128,
    optim_params=2**18, codec_bytes=2**20,
    est_batch=2, est_seq=32,
    plan_model=dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64),
    plan_batch=2, plan_seq=32, plan_budgets=("95%", "80%"), rounds=2,
)


@dataclass
class Report:
    device: torch.device
    sections: dict[str, str] = field(default_factory=dict)  # name -> markdown
    bars: list[tuple[str, str, str, str]] = field(default_factory=list)  # bar, wanted, measured, PASS/FAIL
    payload: dict = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def bar(self, name: str, wanted: str, measured: str, ok: bool | None) -> None:
        verdict = "—" if ok is None or not self.on_gpu else ("PASS" if ok else "FAIL")
        self.bars.append((name, wanted, measured, verdict))


# --------------------------------------------------------------------------- device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    def run():
        fn()
        sync(device)
    return run


def step_peak(fn: Callable[[], object], device: torch.device, *track) -> tuple[int, int | None]:
    """(peak allocated bytes, peak reserved bytes or None) of one call of ``fn``, after
    one call that is not measured (kernel builds, one-time tables)."""
    fn()
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    mem = measure_step_memory(lambda: fn(), lambda _: None, *track, device=device)
    return mem.peak, None


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def section(report: Report, name: str, fn: Callable[[], str]) -> None:
    t0 = time.perf_counter()
    print(f"\n== {name}", flush=True)
    try:
        body = fn()
    except Exception as exc:  # one failed section must not lose the others' figures
        traceback.print_exc()
        body = f"**failed:** `{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}`"
    report.sections[name] = body + f"\n\n({time.perf_counter() - t0:.0f} s)"
    report.payload.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 1)


# --------------------------------------------------------------------------- models


def lm(kind: str, cfg: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(**cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(**cfg)
        model = transformers.LlamaForCausalLM(config)
    config._attn_implementation = "sdpa"
    return model.to(device=device, dtype=dtype).train()


def lm_batch(model: torch.nn.Module, batch: int, seq: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


# --------------------------------------------------------------------------- activations


def activation_steps(model, batch, kinds) -> dict[str, Callable[[], None]]:
    """One forward + backward per contender (gradients dropped after each)."""

    def plain():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def checkpointed():
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            model(**batch).loss.backward()
        finally:
            model.gradient_checkpointing_disable()
        model.zero_grad(set_to_none=True)

    def with_memfit(setting):
        mf = memfit.activations(model, setting)

        def run():
            with mf:
                loss = model(**batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    table = {"plain": plain, "checkpointing": checkpointed, "memfit 8-bit": with_memfit(8),
             "memfit 4-bit": with_memfit(4), "memfit 2-bit": with_memfit(2), "offload": with_memfit("offload"),
             "offload + 4-bit": with_memfit("offload:4")}
    return {k: table[k] for k in kinds}


def run_activations(report: Report, shapes: Shapes) -> str:
    device, dtype = report.device, torch.bfloat16
    headers = ["contender", "peak MB", "vs plain peak", "reserved MB", "step time vs plain", "(min-max)"]
    out = []
    cases = [
        ("GPT-2-small shape", "gpt2", shapes.gpt2, shapes.batch, shapes.seq,
         ["plain", "checkpointing", "memfit 8-bit", "memfit 4-bit", "memfit 2-bit", "offload", "offload + 4-bit"]),
        ("LLaMA shape", "llama", shapes.llama, shapes.batch, shapes.seq,
         ["plain", "checkpointing", "memfit 8-bit", "memfit 4-bit", "memfit 2-bit", "offload"]),
        ("GPT-2-small shape, long sequence", "gpt2", shapes.gpt2, shapes.long_batch, shapes.long_seq,
         ["plain", "offload", "offload + 4-bit", "memfit 4-bit"]),
    ]
    results = {}
    for title, kind, cfg, b, s, kinds in cases:
        model = lm(kind, cfg, device, dtype)
        batch = lm_batch(model, b, s, device)
        steps = activation_steps(model, batch, kinds)
        peaks = {k: step_peak(fn, device, model) for k, fn in steps.items()}
        timing = interleaved_timing({k: synced(fn, device) for k, fn in steps.items()}, rounds=shapes.rounds,
                                    baseline="plain", warmup=1)
        rows = []
        for k in kinds:
            peak, reserved = peaks[k]
            lo, hi = timing[k].spread
            rows.append([k, f"{peak / MB:,.0f}", f"{peak / peaks['plain'][0]:.2f}",
                         "—" if reserved is None else f"{reserved / MB:,.0f}",
                         f"{timing[k].median_ratio:.2f}x", f"{lo:.2f}-{hi:.2f}"])
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        head = f"### {title}: {n_params:.0f}M params, bf16, batch {b} x {s}"
        print_table(head[4:], headers, rows)
        out += [head, "", markdown_table(headers, rows), ""]
        results[title] = {k: {"peak": peaks[k][0], "reserved": peaks[k][1], "time_ratio": timing[k].median_ratio}
                          for k in kinds}
        del model, batch, steps
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.payload["activations"] = results
    gpt = results["GPT-2-small shape"]
    report.bar(f"memfit 4-bit activations, GPT-2-small bf16 {shapes.batch} x {shapes.seq}",
               f"<= {BAR_ACT4:.2f}x plain step time", f"{gpt['memfit 4-bit']['time_ratio']:.2f}x",
               gpt["memfit 4-bit"]["time_ratio"] <= BAR_ACT4)
    long = results["GPT-2-small shape, long sequence"]
    cut = 1 - long["offload"]["peak"] / long["plain"]["peak"]
    ratio = long["offload"]["time_ratio"]
    report.bar(f"offload at sequence {shapes.long_seq}", f"peak >= {BAR_OFFLOAD_PEAK:.0%} below plain at "
               f"<= {BAR_OFFLOAD_TIME:.2f}x", f"{cut:.0%} below, {ratio:.2f}x",
               cut >= BAR_OFFLOAD_PEAK and ratio <= BAR_OFFLOAD_TIME)
    return "\n".join(out)


# --------------------------------------------------------------------------- optimizers


def optimizer_makers(device: torch.device) -> dict[str, Callable]:
    makers = {
        "torch AdamW (fused)" if device.type == "cuda" else "torch AdamW": lambda ps: torch.optim.AdamW(
            ps, lr=1e-4, fused=device.type == "cuda"),
        "memfit AdamW 8-bit": lambda ps: memfit.optim.AdamW(ps, lr=1e-4, state_bits=8),
        "memfit AdamW 4-bit": lambda ps: memfit.optim.AdamW(ps, lr=1e-4, state_bits=4),
    }
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb

            makers["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)
        except Exception:  # not installed or no CUDA build
            pass
        try:
            from torchao.optim import AdamW4bit, AdamW8bit

            makers["torchao AdamW8bit"] = lambda ps: AdamW8bit(ps, lr=1e-4)
            makers["torchao AdamW4bit"] = lambda ps: AdamW4bit(ps, lr=1e-4)
        except Exception:
            pass
    return makers


def run_optim(report: Report, shapes: Shapes) -> str:
    device = report.device
    n_tensors = 24
    rows_each = max(1, shapes.optim_params // (n_tensors * 1024))
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(rows_each, 1024, generator=g) for _ in range(n_tensors)]
    grads = [torch.randn(rows_each, 1024, generator=g) * 1e-3 for _ in range(n_tensors)]
    makers = optimizer_makers(device)
    params, optims = {}, {}
    for name, make in makers.items():
        ps = [torch.nn.Parameter(t.to(device)) for t in base]
        for p, gr in zip(ps, grads):
            p.grad = gr.to(device)
        params[name], optims[name] = ps, make(ps)
        optims[name].step()  # state exists from here on
    state_mb = {}
    for name, opt in optims.items():
        total = 0
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
        state_mb[name] = total / MB
    baseline = next(iter(makers))
    timing = interleaved_timing({k: synced(o.step, device) for k, o in optims.items()}, rounds=max(3, 2 * shapes.rounds),
                                baseline=baseline, warmup=2)
    n = sum(t.numel() for t in base)
    headers = ["optimizer", "state MB", "bytes/param", "step time vs " + baseline, "(min-max)", "ms/step"]
    rows = []
    for name in makers:
        lo, hi = timing[name].spread
        rows.append([name, f"{state_mb[name]:,.0f}", f"{state_mb[name] * MB / n:.2f}",
                     f"{timing[name].median_ratio:.2f}x", f"{lo:.2f}-{hi:.2f}", f"{1000 * timing[name].median_s:.2f}"])
    head = f"### One AdamW step over {n / 1e6:.0f}M fp32 parameters ({n_tensors} tensors)"
    print_table(head[4:], headers, rows)
    missing = [p for p in ("bitsandbytes", "torchao") if not any(k.startswith(p) for k in makers)]
    note = f"\n\nNot importable here, so not run: {', '.join(missing)}." if missing else ""
    report.payload["optim"] = {k: {"state_mb": state_mb[k], "time_ratio": timing[k].median_ratio} for k in makers}
    r8 = timing["memfit AdamW 8-bit"].median_ratio
    report.bar("memfit 8-bit AdamW step", f"<= {BAR_ADAMW8:.2f}x torch fused AdamW", f"{r8:.2f}x", r8 <= BAR_ADAMW8)
    return "\n".join([head, "", markdown_table(headers, rows)]) + note


# --------------------------------------------------------------------------- codec


def run_codec(report: Report, shapes: Shapes) -> str:
    from memfit.codec import FP8Format, IntFormat, decode, encode

    device = report.device
    x = torch.randn(shapes.codec_bytes // 4, device=device)
    y = torch.empty_like(x)
    reps = 10 if device.type == "cuda" else 3
    copy_s = median_seconds(lambda: y.copy_(x), device, reps)
    formats = {"8-bit, stochastic": IntFormat(8), "8-bit, nearest": IntFormat(8, rounding="nearest"),
               "4-bit, stochastic": IntFormat(4), "2-bit, stochastic": IntFormat(2), "fp8 e4m3": FP8Format()}
    headers = ["format", "encode+decode GB/s", "vs device copy", "encode ms", "decode ms"]
    rows, worst = [], float("inf")
    for label, fmt in formats.items():
        enc = encode(x, fmt, seed=1)
        enc_s = median_seconds(lambda: encode(x, fmt, seed=1), device, reps)
        dec_s = median_seconds(lambda: decode(enc), device, reps)
        share = copy_s / (enc_s + dec_s)
        worst = min(worst, share)
        rows.append([label, f"{x.nbytes / (enc_s + dec_s) / 1e9:,.1f}", f"{share:.0%}", f"{1000 * enc_s:.2f}",
                     f"{1000 * dec_s:.2f}"])
    rows.append(["device copy (reference)", f"{x.nbytes / copy_s / 1e9:,.1f}", "100%", "", ""])
    head = (f"### {x.nbytes / MB:,.0f} MB fp32 tensor, backend "
            f"`{memfit.codec.backend_name(device)}`, median of {reps}")
    print_table(head[4:], headers, rows)
    report.payload["codec"] = {r[0]: r[1:] for r in rows}
    report.bar("codec encode+decode (every format)", f">= {BAR_CODEC:.0%} of a device copy's throughput",
               f"{worst:.0%} (slowest format)", worst >= BAR_CODEC)
    return "\n".join([head, "", markdown_table(headers, rows)])


# --------------------------------------------------------------------------- estimate


def measured_step(model, batch, config, device) -> tuple[int, int | None]:
    """Peak allocated (and reserved, on CUDA) of the second of two real steps."""
    from memfit.step import apply, make_optimizer, resolve_loss_fn, run_step

    fn = resolve_loss_fn(None)
    opt = make_optimizer(model, config)
    if device.type != "cuda":
        res = memfit.plan.measure_peak(model, batch, config, optimizer=opt)
        return res.peak_bytes, None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    with apply(model, config, opt) as ctx:
        for i in range(2):
            if i == 1:
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
            run_step(model, batch, config, fn, opt, context=ctx)
    sync(device)
    out = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    del opt
    model.zero_grad(set_to_none=True)
    return out


def run_estimate(report: Report, shapes: Shapes) -> str:
    device = report.device
    model = lm("gpt2", shapes.gpt2, device, torch.bfloat16)
    batch = lm_batch(model, shapes.est_batch, shapes.est_seq, device)
    headers = ["config", "estimated peak MB", "measured peak MB", "error", "estimated reserved MB",
               "measured reserved MB", "error", "host MB (offload)"]
    rows, worst = [], 0.0
    for label, cfg in (("plain AdamW", memfit.StepConfig()),
                       ("memfit 4-bit, AdamW 8-bit", memfit.StepConfig(policy=4, state_bits=8)),
                       ("offload, AdamW", memfit.StepConfig(policy="offload"))):
        est = memfit.estimate(model, batch, config=cfg)
        peak, reserved = measured_step(model, batch, cfg, device)
        err = est.peak_bytes / peak - 1
        worst = max(worst, abs(err))
        r_err = "—" if reserved is None else f"{est.reserved_bytes / reserved - 1:+.1%}"
        rows.append([label, f"{est.peak_bytes / MB:,.0f}", f"{peak / MB:,.0f}", f"{err:+.1%}",
                     f"{est.reserved_bytes / MB:,.0f}", "—" if reserved is None else f"{reserved / MB:,.0f}", r_err,
                     f"{est.host_bytes / MB:,.0f}"])
    head = f"### GPT-2-small shape, bf16, batch {shapes.est_batch} x {shapes.est_seq}: second of two steps"
    print_table(head[4:], headers, rows)
    report.payload["estimate"] = rows
    report.bar("estimate vs max_memory_allocated", f"within {BAR_ESTIMATE:.0%}", f"{worst:.1%} (worst config)",
               worst <= BAR_ESTIMATE)
    return "\n".join([head, "", markdown_table(headers, rows)])


# --------------------------------------------------------------------------- plan


def run_plan(report: Report, shapes: Shapes) -> str:
    device = report.device
    model = lm("gpt2", shapes.plan_model, device, torch.bfloat16)
    batch = lm_batch(model, shapes.plan_batch, shapes.plan_seq, device)
    cache: dict = {}
    headers = ["budget", "budget MB", "predicted peak MB", "measured peak MB", "under budget", "choices",
               "host MB", "predicted reserved MB", "measured reserved MB"]
    rows, all_under = [], True
    for budget in shapes.plan_budgets:
        p = memfit.plan(model, batch, budget, cache=cache, max_rounds=3,
                        step_seconds=None if device.type == "cuda" else 0.05)
        peak, reserved = measured_step(model, batch, p.config, device)
        under = peak <= p.budget_bytes
        all_under &= under
        choices = ", ".join(f"{c} x{n}" for c, n in sorted(_count(u.choice for u in p.units).items()))
        rows.append([budget, f"{p.budget_bytes / MB:,.0f}", f"{p.predicted_peak_bytes / MB:,.0f}",
                     f"{peak / MB:,.0f}", "yes" if under else "NO", choices, f"{p.predicted_host_bytes / MB:,.0f}",
                     f"{p.predicted_reserved_bytes / MB:,.0f}", "—" if reserved is None else f"{reserved / MB:,.0f}"])
        print(p)
    n_params = sum(q.numel() for q in model.parameters()) / 1e6
    head = (f"### GPT-2 {shapes.plan_model['n_layer']} x {shapes.plan_model['n_embd']} ({n_params:.0f}M params), "
            f"bf16, batch {shapes.plan_batch} x {shapes.plan_seq}; budgets are shares of the plain estimate")
    print_table(head[4:], headers, rows)
    report.payload["plan"] = rows
    report.bar("plans under budget (measured)", "every budget", f"{sum(r[4] == 'yes' for r in rows)}/{len(rows)}",
               all_under)
    return "\n".join([head, "", markdown_table(headers, rows)])


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


# --------------------------------------------------------------------------- main


RUNNERS = {"activations": run_activations, "optim": run_optim, "codec": run_codec, "estimate": run_estimate,
           "plan": run_plan}


def main(argv=None) -> Report:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: a smoke test)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few rounds")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here; use --quick --device cpu --no-write to check the script")
    if device.type == "cpu" and not args.quick:
        ap.error("the full run is for a GPU; on CPU use --quick (tiny shapes)")
    shapes = QUICK if args.quick else FULL
    info = start_bench(torch.get_num_threads(), print)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["memfit codec backend (cuda)"] = memfit.codec.backend_name(device)
        info["memfit optimizer backend (cuda)"] = memfit.optim.backend_name(device)
    report = Report(device)
    t0 = time.perf_counter()
    for name in args.only:
        section(report, name, lambda name=name: RUNNERS[name](report, shapes))
    info["total seconds"] = f"{time.perf_counter() - t0:.0f}"
    bars = markdown_table(["bar (issue 18)", "wanted", "measured", "PASS/FAIL"], report.bars)
    print_table("Bars", ["bar (issue 18)", "wanted", "measured", "PASS/FAIL"], report.bars)
    where = info.get("gpu", f"{device.type} (quick check of the script: no bar is judged)")
    text = "\n".join(
        [f"## memfit on one GPU: {where} (`bench/gpu.py`)", ""] + machine_lines(info) + ["", "### Bars", "", bars, ""]
        + [report.sections[n] + "\n" for n in args.only if n in report.sections]
    )
    end_bench(info, args.json, {"info": info, "bars": report.bars, **report.payload})
    publish(text, REPO / "docs" / "benchmarks.md", "gpu", write=not args.no_write and not args.quick, log=print)
    return report


if __name__ == "__main__":
    main()
