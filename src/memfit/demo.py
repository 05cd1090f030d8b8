"""``memfit demo``: train one small GPT five ways and compare memory, speed and loss.

The runs share everything but how activations are kept for backward: the same random
init (one model, deep-copied), the same batches in the same order (:mod:`memfit.data`,
seeded), the same AdamW, learning-rate schedule (warmup, cosine decay) and gradient-norm
clipping. The learning rate is modest and gradients are clipped on purpose: in an
unstable regime, two runs that differ by any tiny perturbation (even just memfit's
rounding seed) drift several percent apart in loss, which would drown the comparison.

* ``fp32``: plain PyTorch, every activation kept as is;
* ``memfit N-bit``: the forward runs inside ``memfit.activations(model, bits=N)``,
  the library's defaults: the transformer blocks at N bits, the loss head (final norm,
  output layer, the loss; see ``head_bits`` in :func:`memfit.activations`) at 8 bits.
  ``bits_everywhere=True`` (``--bits-everywhere``) passes ``head_bits=N`` instead, to
  show what the head costs in fidelity when it is quantized too;
* ``checkpointing``: ``torch.utils.checkpoint`` around every transformer block
  (non-reentrant), recomputing activations during backward;
* ``planned``: :func:`memfit.plan` at a budget of one quarter of the fp32 run's peak
  (``plan_fraction``): the planner picks, per module, keep / 8 / 4 / 2 bits /
  recompute and the optimizer's state bits (gradient clipping rules out stepping
  inside backward), and the run trains with ``with plan:`` and ``plan.optimizer()``.
  Its fidelity bar is 1% of the fp32 final loss.

Memory is measured the same way for every run, on the first training step, with
``torch.distributed._tools.mem_tracker.MemTracker`` (a dispatch mode that follows every
tensor storage alive on the device):

* *saved for backward*: live bytes right after the forward minus live bytes right
  before it, i.e. everything the forward leaves alive for backward (activations, or
  memfit's encodings of them, or checkpointing's block inputs; plus the loss);
* *peak*: the highest live total during the whole step (forward, backward and the
  optimizer update), including parameters, gradients and optimizer state.

Speed is the median wall time of a step over the steps after the first (the measured
one). "Final loss" is the mean training loss over the last ``final_window`` steps
(default 20), because single-step losses are noisy; the last step's loss is shown too.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .activations import activations
from .data import VOCAB_SIZE, ByteBatches, load_text_bytes

MB = 2**20

# The fidelity bar: |final loss / fp32 final loss - 1| at most this, per bit width.
FIDELITY_BAR = {8: 0.005, 4: 0.01, 2: 0.03}
PLANNED_FIDELITY_BAR = 0.01  # the planned run (memfit.plan at a quarter of fp32's peak)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DemoConfig:
    """What to train and how. The defaults take about 3 minutes on 2 CPU cores."""

    steps: int = 300
    seed: int = 0
    bits: tuple[int, ...] = (8, 4, 2)
    checkpointing: bool = True
    planned: bool = True  # a memfit.plan run at plan_fraction of the fp32 run's peak
    plan_fraction: float = 0.25
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0  # clip the global gradient norm (None: no clipping)
    min_bytes: int = 32 * 1024
    policy: Mapping[str, int | None] | None = None  # memfit per-module rules
    bits_everywhere: bool = False  # quantize the loss head at the run's bits too
    final_window: int = 20
    max_data_bytes: int | None = None

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A tiny configuration for tests and smoke runs (seconds, not minutes)."""
        base = dict(
            steps=12, n_layer=2, n_embd=64, n_head=2, seq_len=64, batch_size=4,
            warmup=2, final_window=4, max_data_bytes=1_000_000, planned=False,
        )
        base.update(overrides)
        return cls(**base)

    def __post_init__(self):
        if self.steps < 2:
            raise ValueError(f"steps must be at least 2, got {self.steps}")
        for b in self.bits:
            if b not in FIDELITY_BAR:
                raise ValueError(f"bits must be among 8, 4, 2; got {b!r}")
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be divisible by n_head")
        if self.final_window < 1:
            raise ValueError("final_window must be at least 1")
        if not 0 < self.plan_fraction <= 1:
            raise ValueError(f"plan_fraction must be in (0, 1], got {self.plan_fraction!r}")


# --------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """One training run: its loss curve, step times and measured memory."""

    name: str
    kind: str  # "plain", "memfit" or "checkpoint"
    bits: int | None
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    saved_bytes: int = 0  # measured: live bytes after forward minus before (step 1)
    peak_bytes: int = 0  # measured: peak live bytes during step 1
    counted_original_bytes: int | None = None  # memfit's own count (memfit runs)
    counted_stored_bytes: int | None = None
    final_window: int = 20
    budget_bytes: int | None = None  # planned run: the budget it was planned for
    plan_summary: str | None = None  # planned run: what the plan chose

    @property
    def final_loss(self) -> float:
        tail = self.losses[-self.final_window :]
        return sum(tail) / len(tail)

    @property
    def last_loss(self) -> float:
        return self.losses[-1]

    @property
    def seconds_per_step(self) -> float:
        times = self.step_seconds[1:] or self.step_seconds  # step 1 runs under the tracker
        return statistics.median(times)

    @property
    def compression_ratio(self) -> float | None:
        if self.counted_original_bytes is None or not self.counted_stored_bytes:
            return None
        return self.counted_original_bytes / self.counted_stored_bytes


@dataclass
class DemoResult:
    config: DemoConfig
    runs: list[RunResult]
    data_bytes: int
    n_params: int
    backend: str
    wall_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> RunResult:
        return self.runs[0]

    def rel_diff(self, run: RunResult) -> float:
        """Relative difference of ``run``'s final loss vs the fp32 run's."""
        base = self.baseline.final_loss
        return (run.final_loss - base) / base

    def meets_bar(self, run: RunResult) -> bool | None:
        """Whether a memfit run's final loss is within the issue's bar; None otherwise."""
        if run.kind == "planned":
            return abs(self.rel_diff(run)) <= PLANNED_FIDELITY_BAR
        if run.kind != "memfit":
            return None
        return abs(self.rel_diff(run)) <= FIDELITY_BAR[run.bits]

    def to_dict(self) -> dict:
        runs = []
        for r in self.runs:
            runs.append(
                dict(
                    name=r.name, kind=r.kind, bits=r.bits, losses=r.losses,
                    step_seconds=r.step_seconds, saved_bytes=r.saved_bytes,
                    peak_bytes=r.peak_bytes, counted_original_bytes=r.counted_original_bytes,
                    counted_stored_bytes=r.counted_stored_bytes,
                    compression_ratio=r.compression_ratio, final_loss=r.final_loss,
                    budget_bytes=r.budget_bytes, plan_summary=r.plan_summary,
                    last_loss=r.last_loss, seconds_per_step=r.seconds_per_step,
                    rel_diff_vs_fp32=self.rel_diff(r), meets_fidelity_bar=self.meets_bar(r),
                )
            )
        cfg = asdict(self.config)
        cfg["bits"] = list(self.config.bits)
        return dict(
            config=cfg, runs=runs, data_bytes=self.data_bytes, n_params=self.n_params,
            backend=self.backend, wall_seconds=self.wall_seconds, notes=list(self.notes),
            fidelity_bar=FIDELITY_BAR,
        )


# --------------------------------------------------------------------------- training


def build_model(config: DemoConfig) -> torch.nn.Module:
    """A randomly initialised GPT-2 with a byte vocabulary, seeded by ``config.seed``."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("memfit demo needs transformers: pip install 'memfit[hf]'") from exc
    gpt_config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=config.seq_len,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        # No dropout: the runs then differ only in how activations are kept.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        use_cache=False,
        loss_type="ForCausalLM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GPT2LMHeadModel(gpt_config)
    # transformers 5 reads the loss type from the model and warns when it is unset.
    model.loss_type = "ForCausalLM"
    return model


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant ``torch.utils.checkpoint`` around every transformer block."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def plan_runs(config: DemoConfig) -> list[tuple[str, str, int | None]]:
    """(name, kind, bits) of every run, fp32 first."""
    runs: list[tuple[str, str, int | None]] = [("fp32", "plain", None)]
    runs += [(f"memfit {b}-bit", "memfit", b) for b in config.bits]
    if config.checkpointing:
        runs.append(("checkpointing", "checkpoint", None))
    if config.planned:
        runs.append(("memfit.plan", "planned", None))
    return runs


def _lr_lambda(config: DemoConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _cpu_total(snapshot: dict) -> int:
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    dev = snapshot.get(torch.device("cpu"))
    return int(dev[_TOTAL_KEY]) if dev else 0


def train_run(
    base_model: torch.nn.Module,
    batches: ByteBatches,
    config: DemoConfig,
    name: str,
    kind: str,
    bits: int | None,
    on_step: Callable[[int, float], None] | None = None,
    *,
    plan=None,
) -> RunResult:
    """Train a copy of ``base_model`` for ``len(batches)`` steps; measure step 1.

    ``kind="planned"`` trains with ``plan`` (a :class:`memfit.plan.Plan` made for
    ``base_model``; see :func:`make_demo_plan`): its activation choices and optimizer."""
    from torch.distributed._tools.mem_tracker import MemTracker

    model = copy.deepcopy(base_model)
    model.train()
    if kind == "checkpoint":
        enable_checkpointing(model)
    the_plan = None
    if kind == "planned":
        if plan is None:
            raise ValueError("a planned run needs a plan (make_demo_plan)")
        the_plan = type(plan).from_dict(plan.to_dict(), model)  # the same plan, bound to this copy
        optimizer = the_plan.optimizer(lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    compressor = (
        activations(
            model,
            bits=bits,
            policy=config.policy,
            min_bytes=config.min_bytes,
            seed=config.seed,
            head_bits=bits if config.bits_everywhere else "auto",
        )
        if kind == "memfit"
        else None
    )
    result = RunResult(name=name, kind=kind, bits=bits, final_window=config.final_window)
    if the_plan is not None:
        result.budget_bytes = int(the_plan.budget_bytes)
        result.plan_summary = _plan_summary(the_plan)
    context = compressor if compressor is not None else the_plan

    def step(x: torch.Tensor, tracker: MemTracker | None) -> float:
        before = _cpu_total(tracker.get_tracker_snapshot()) if tracker else 0
        with context if context is not None else contextlib.nullcontext():
            loss = model(input_ids=x, labels=x).loss
        if tracker is not None:
            result.saved_bytes = _cpu_total(tracker.get_tracker_snapshot()) - before
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss.item()

    for i, x in enumerate(batches):
        t0 = time.perf_counter()
        if i == 0:
            tracker = MemTracker()
            tracker.track_external(model, optimizer, x)
            with tracker:
                loss = step(x, tracker)
            result.peak_bytes = _cpu_total(tracker.get_tracker_snapshot("peak"))
            if compressor is not None:
                result.counted_original_bytes = compressor.stats.original_bytes
                result.counted_stored_bytes = compressor.stats.stored_bytes
        else:
            loss = step(x, None)
        result.step_seconds.append(time.perf_counter() - t0)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{name}: loss became {loss} at step {i + 1}")
        result.losses.append(loss)
        if on_step is not None:
            on_step(i, loss)
    return result


def _plan_summary(p) -> str:
    """``"blocks 0-1 4-bit, 2-3 keep; adamw 8-bit"``-style: what a plan chose."""
    from collections import Counter

    counts = Counter(u.choice for u in p.units if u.plain_bytes > 0)
    acts = ", ".join(f"{n}x {c}" for c, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    opt = f"{p.optimizer_name} {p.state_bits}-bit state"
    return f"{acts}; {opt}"


def make_demo_plan(base_model: torch.nn.Module, batches: ByteBatches, config: DemoConfig,
                   plain_peak_bytes: int) -> tuple[object, str | None]:
    """:func:`memfit.plan` for the planned run at ``config.plan_fraction`` of plain
    PyTorch's peak (the fp32 run's), planned on the first batch, with the run's
    gradient clipping. When that budget is below the smallest peak the planner can
    reach (:class:`~memfit.plan.BudgetTooSmall`), plans at that smallest peak + 5%
    instead and says so (the returned note)."""
    from .plan import BudgetTooSmall
    from .plan import plan as make_plan

    x0 = next(iter(batches))
    batch = {"input_ids": x0, "labels": x0}
    kw = dict(clip_grad_norm=config.grad_clip, activation_kwargs={"min_bytes": config.min_bytes, "seed": config.seed},
              cache={})
    budget = int(plain_peak_bytes * config.plan_fraction)
    try:
        return make_plan(base_model, batch, budget, **kw), None
    except BudgetTooSmall as exc:
        fallback = int(exc.min_peak_bytes * 1.05)
        what, size = max(exc.breakdown.items(), key=lambda kv: kv[1]) if exc.breakdown else ("?", 0)
        what = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer state"}.get(what, what)
        note = (
            f"planned run: {config.plan_fraction:g} of fp32's peak ({budget / MB:.1f} MB) is below the smallest "
            f"peak memfit.plan reaches on this model ({exc.min_peak_bytes / MB:.1f} MB, dominated by "
            f"{what} {size / MB:.1f} MB); planned at {fallback / MB:.1f} MB instead"
        )
        return make_plan(base_model, batch, fallback, **kw), note


def run_demo(
    config: DemoConfig,
    *,
    on_run_start: Callable[[str], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_run_end: Callable[[RunResult], None] | None = None,
) -> DemoResult:
    """Train every run of ``config`` and return the measurements (no printing)."""
    from .codec import backend_name

    t0 = time.perf_counter()
    backend = backend_name("cpu")  # loads (or JIT-builds) the codec kernels before any timing
    data = load_text_bytes(max_bytes=config.max_data_bytes)
    batches = ByteBatches(
        data, seq_len=config.seq_len, batch_size=config.batch_size, steps=config.steps, seed=config.seed
    )
    base = build_model(config)
    from .plan import BudgetTooSmall

    runs: list[RunResult] = []
    notes: list[str] = []
    for name, kind, bits in plan_runs(config):
        if on_run_start is not None:
            on_run_start(name)
        the_plan = None
        if kind == "planned":  # a fraction of plain PyTorch's peak (the fp32 run, first)
            plain = next((r for r in runs if r.kind == "plain"), None)
            if plain is None:
                raise ValueError("the planned run needs the fp32 run's peak")
            try:
                the_plan, note = make_demo_plan(base, batches, config, plain.peak_bytes)
            except BudgetTooSmall as exc:  # not even the fallback: report why it did not run
                notes.append(f"{name}: not run: {exc}")
                continue
            if note:
                notes.append(note)
        runs.append(train_run(base, batches, config, name, kind, bits, on_step, plan=the_plan))
        if on_run_end is not None:
            on_run_end(runs[-1])
    return DemoResult(
        config=config,
        runs=runs,
        data_bytes=int(data.numel()),
        n_params=sum(p.numel() for p in base.parameters()),
        backend=backend,
        wall_seconds=time.perf_counter() - t0,
        notes=notes,
    )


# --------------------------------------------------------------------------- report


def _verdict(result: DemoResult, run: RunResult) -> str:
    ok = result.meets_bar(run)
    if ok is None:
        return ""
    bar = (PLANNED_FIDELITY_BAR if run.kind == "planned" else FIDELITY_BAR[run.bits]) * 100
    return f"[green]✓ ≤{bar:g}%[/]" if ok else f"[red]✗ >{bar:g}%[/]"


def render_table(result: DemoResult):
    """The results as one ``rich.table.Table``."""
    from rich.table import Table

    cfg = result.config
    base = result.baseline
    table = Table(
        title=(
            f"memfit demo: GPT-2 ({result.n_params / 1e6:.2f}M params, {cfg.n_layer} layers, "
            f"n_embd {cfg.n_embd}), batch {cfg.batch_size}×{cfg.seq_len} bytes of Python stdlib, "
            f"{cfg.steps} steps, seed {cfg.seed}"
        ),
        caption=(
            f"saved for bwd / peak: measured on step 1 with torch MemTracker (live bytes after "
            f"forward − before; peak of the whole step incl. params, grads, AdamW state). "
            f"ratio: memfit's own count, bytes autograd saved ÷ bytes memfit held "
            f"(min_bytes={cfg.min_bytes}). s/step: median. final loss: mean of the last "
            f"{min(cfg.final_window, cfg.steps)} steps. bar: the fidelity bar (8-bit 0.5%, 4-bit 1%, "
            f"2-bit 3%; planned run 1%). codec kernels: {result.backend}."
            + "".join(
                f"\n{r.name}: budget {r.budget_bytes / MB:.1f} MB; memfit.plan chose {r.plan_summary}."
                for r in result.runs if r.kind == "planned" and r.budget_bytes
            )
            + "".join(f"\n{n}" for n in result.notes)
        ),
    )
    table.add_column("run")
    table.add_column("saved for bwd MB", justify="right")
    table.add_column("vs fp32", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("peak MB", justify="right")
    table.add_column("s/step", justify="right")
    table.add_column("final loss", justify="right")
    table.add_column("last loss", justify="right")
    table.add_column("Δ vs fp32", justify="right")
    table.add_column("bar", justify="center")
    for run in result.runs:
        ratio = run.compression_ratio
        is_base = run is base
        table.add_row(
            run.name,
            f"{run.saved_bytes / MB:.2f}",
            "1.00×" if is_base else f"{base.saved_bytes / run.saved_bytes:.2f}× less" if run.saved_bytes else "–",
            f"{ratio:.2f}×" if ratio is not None else "–",
            f"{run.peak_bytes / MB:.1f}" + (f" (budget {run.budget_bytes / MB:.1f})" if run.budget_bytes else ""),
            f"{run.seconds_per_step:.3f}",
            f"{run.final_loss:.4f}",
            f"{run.last_loss:.4f}",
            "–" if is_base else f"{result.rel_diff(run) * 100:+.2f}%",
            _verdict(result, run),
        )
    return table


def save_plot(result: DemoResult, path: str | Path, *, smooth: int = 10) -> Path:
    """Loss curves (left) and measured memory (right) as a PNG at ``path``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("memfit demo needs matplotlib: pip install 'memfit[plot]'") from exc

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(13, 6), dpi=110)
    FigureCanvasAgg(fig)  # draw with Agg; the global pyplot backend is left alone
    grid = fig.add_gridspec(2, 2, width_ratios=[3, 2], height_ratios=[3, 1])
    ax_loss = fig.add_subplot(grid[0, 0])
    ax_diff = fig.add_subplot(grid[1, 0], sharex=ax_loss)
    ax_mem = fig.add_subplot(grid[:, 1])
    colors = {"plain": "black", "checkpoint": "tab:gray", "planned": "tab:green"}
    bit_colors = {8: "tab:blue", 4: "tab:orange", 2: "tab:red"}

    def running_mean(values: list[float]) -> list[float]:
        k = max(1, min(smooth, len(values)))
        out, acc = [], 0.0
        for i, v in enumerate(values):
            acc += v
            if i >= k:
                acc -= values[i - k]
            out.append(acc / min(i + 1, k))
        return out

    base = running_mean(result.baseline.losses)
    for run in result.runs:
        color = bit_colors.get(run.bits, colors.get(run.kind, None))
        steps = list(range(1, len(run.losses) + 1))
        smoothed = running_mean(run.losses)
        style = "--" if run.kind == "checkpoint" else "-"
        ax_loss.plot(steps, run.losses, color=color, alpha=0.12, linewidth=0.8)
        ax_loss.plot(steps, smoothed, style, color=color, linewidth=1.4,
                     label=f"{run.name} (final {run.final_loss:.3f})")
        if run is not result.baseline:
            rel = [100 * (a - b) / b for a, b in zip(smoothed, base)]
            ax_diff.plot(steps, rel, style, color=color, linewidth=1.2)
    ax_loss.set_ylabel("training loss (nats/byte)")
    ax_loss.set_title(f"training loss (faint: per step; lines: {smooth}-step running mean)")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    ax_loss.tick_params(labelbottom=False)
    ax_diff.axhline(0.0, color="black", linewidth=0.8)
    ax_diff.set_xlabel("step")
    ax_diff.set_ylabel("vs fp32 (%)")
    ax_diff.grid(alpha=0.3)

    names = [r.name for r in result.runs]
    xs = list(range(len(names)))
    width = 0.38
    saved = [r.saved_bytes / MB for r in result.runs]
    peak = [r.peak_bytes / MB for r in result.runs]
    b1 = ax_mem.bar([x - width / 2 for x in xs], saved, width, label="saved for backward", color="tab:blue")
    b2 = ax_mem.bar([x + width / 2 for x in xs], peak, width, label="peak of a step", color="tab:gray")
    ax_mem.bar_label(b1, fmt="%.1f", fontsize=7)
    ax_mem.bar_label(b2, fmt="%.1f", fontsize=7)
    ax_mem.set_xticks(xs)
    ax_mem.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax_mem.set_ylabel("MB (MemTracker, step 1)")
    ax_mem.set_title("memory")
    ax_mem.legend(fontsize=8)
    ax_mem.grid(axis="y", alpha=0.3)

    fig.suptitle(
        f"memfit demo: {result.n_params / 1e6:.2f}M-param GPT-2 on Python stdlib bytes, "
        f"{result.config.steps} steps, seed {result.config.seed}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    return path


def main(
    config: DemoConfig,
    *,
    out: str | Path | None = "memfit-demo.png",
    json_path: str | Path | None = None,
    console=None,
    progress: bool = True,
) -> DemoResult:
    """Run the demo with a progress bar, print the table, write the PNG (and JSON)."""
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    if not console.is_terminal and console.width < 140:
        console.width = 140  # a pipe or a file: room for the whole table
    runs = plan_runs(config)
    total = config.steps * len(runs)
    bar = Progress(
        TextColumn("[bold]{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not progress,
    )
    with bar:
        task = bar.add_task("preparing", total=total, loss="–")

        def on_run_start(name: str) -> None:
            bar.update(task, description=name)

        def on_step(i: int, loss: float) -> None:
            bar.update(task, advance=1, loss=f"{loss:.3f}")

        def on_run_end(run: RunResult) -> None:
            bar.console.print(
                f"{run.name}: {len(run.losses)} steps, {run.seconds_per_step:.3f} s/step, "
                f"final loss {run.final_loss:.4f}"
            )

        result = run_demo(config, on_run_start=on_run_start, on_step=on_step, on_run_end=on_run_end)

    console.print(render_table(result))
    if out is not None:
        path = save_plot(result, out)
        console.print(f"wrote {path}")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result.to_dict(), indent=1))
        console.print(f"wrote {json_path}")
    console.print(f"total time {result.wall_seconds:.0f} s")
    return result


def parse_bits(text: str) -> tuple[int, ...]:
    """``"8,4,2"`` -> ``(8, 4, 2)``; an empty string means no memfit runs."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        value = int(part)
        if value not in FIDELITY_BAR:
            raise ValueError(f"bits must be among 8, 4, 2; got {value}")
        out.append(value)
    return tuple(out)


__all__: Sequence[str] = [
    "DemoConfig",
    "DemoResult",
    "FIDELITY_BAR",
    "RunResult",
    "build_model",
    "main",
    "parse_bits",
    "plan_runs",
    "render_table",
    "run_demo",
    "save_plot",
    "make_demo_plan",
    "train_run",
]
