"""Shared helpers for the scripts in ``bench/``.

* :func:`start_bench` / :func:`end_bench`: threads, quiet transformers, the machine
  logged; the final load average and the JSON output.
* :func:`machine_info` / :func:`machine_lines`: what ran the bench (CPU, cores,
  threads, torch, memfit codec backend, date, exact command line).
* :func:`interleaved_timing`: round-robin timing (A B C A B C ...) after a warm-up,
  with the ratio to a baseline taken inside each round, then the median.
* :func:`measure_step_memory`: live bytes before/after forward and the peak of a
  whole step, from ``torch.distributed._tools.mem_tracker.MemTracker`` (works on CPU,
  where ``torch.cuda.max_memory_allocated`` is meaningless).
* :func:`markdown_table`, :func:`print_table`, :func:`update_markdown_section`,
  :func:`publish` (print a report, and write it into the docs unless told not to).
* :func:`demo_lm_setup`, :func:`train_demo_lm`: the demo's GPT task and training loop
  (LR schedule, clipping) for loss runs.

See /work/shared/measuring.md for why things are measured this way.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def memfit_backend(device: str = "cpu") -> str:
    """The codec backend memfit uses on ``device`` (``"eager"`` when the fused kernels
    are missing; the fallback warning is kept short and shown once)."""
    try:
        import memfit

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            name = memfit.codec.backend_name(device)
        for w in caught:
            msg = str(w.message).split(";")[0]
            print(f"note: {msg}", file=sys.stderr)
        return name
    except Exception as exc:  # pragma: no cover - reporting only
        return f"unknown ({type(exc).__name__})"


def command_line() -> str:
    """The exact command, with the environment variables that change what runs."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("MEMFIT_KERNELS", "OMP_NUM_THREADS")
           if k in os.environ]
    argv0 = os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(env + ["python", shlex.join([argv0] + sys.argv[1:])])


def machine_info() -> dict[str, str]:
    info = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import memfit

        info["memfit"] = memfit.__version__
    except ImportError:
        pass
    info["memfit codec backend (cpu)"] = memfit_backend("cpu")
    try:
        info["load average (1/5/15 min, at start)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    info["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["command"] = command_line()
    return info


def start_bench(threads: int, log: Callable[[str], None]) -> dict[str, str]:
    """The common start of a bench on transformers models: ``threads`` torch threads,
    transformers' FutureWarnings and logging quiet, the machine described (each line
    through ``log``). Returns :func:`machine_info`."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:
        pass
    info = machine_info()
    for k, v in info.items():
        log(f"{k}: {v}")
    return info


def end_bench(info: dict[str, str], json_path: str | None, payload: Mapping) -> None:
    """The common end of a bench: the load average now into ``info``, and ``payload``
    written as JSON to ``json_path`` when one is given."""
    import json

    try:
        info["load average (1/5/15 min, at end)"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    if json_path:
        Path(json_path).write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {json_path}")


def machine_lines(info: Mapping[str, str]) -> list[str]:
    """Markdown bullet lines describing the machine."""
    out = []
    for k, v in info.items():
        out.append(f"- **{k}:** `{v}`" if k == "command" else f"- **{k}:** {v}")
    return out


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    name: str
    seconds: list[float] = field(default_factory=list)  # one per round
    ratios: list[float] = field(default_factory=list)  # to the baseline, same round

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) of the per-round ratios."""
        return (min(self.ratios), max(self.ratios)) if self.ratios else (float("nan"),) * 2


def interleaved_timing(
    steps: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    baseline: str,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Time each callable ``rounds`` times, round-robin in the order given, after
    ``warmup`` untimed calls each. The ratio to ``baseline`` is taken within each
    round (so slow drifts of a shared machine cancel), then summarised by the median.
    """
    if baseline not in steps:
        raise ValueError(f"baseline {baseline!r} is not one of {list(steps)}")
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    out = {name: Timing(name) for name in steps}
    for r in range(rounds):
        this_round = {}
        for name, fn in steps.items():
            gc.collect()
            t0 = time.perf_counter()
            fn()
            this_round[name] = time.perf_counter() - t0
        base = this_round[baseline]
        for name, s in this_round.items():
            out[name].seconds.append(s)
            out[name].ratios.append(s / base)
        if log is not None:
            log(f"  round {r + 1}/{rounds}: " + "  ".join(f"{n} {s:.2f}s" for n, s in this_round.items()))
    return out


# --------------------------------------------------------------------------- memory

_TOTAL = "Total"


@dataclass
class StepMemory:
    before: int  # live tracked bytes before forward
    after_forward: int  # live tracked bytes once the loss exists, before backward
    peak: int  # highest live tracked bytes during forward + backward
    peak_breakdown: dict[str, int]

    @property
    def kept(self) -> int:
        """Bytes that forward left alive for backward (activations, saved or packed)."""
        return self.after_forward - self.before


def _current_total(mt, device: torch.device) -> int:
    return int(mt.get_tracker_snapshot("current").get(device, {}).get(_TOTAL, 0))


def measure_step_memory(
    forward: Callable[[], object],
    backward: Callable[[object], None],
    *track: object,
    device: torch.device | str = "cpu",
) -> StepMemory:
    """Run ``out = forward(); backward(out)`` under ``MemTracker``.

    ``track`` are the modules, optimizers and tensors made before the call (they are
    counted in ``before`` and ``peak``). The tracker sees every tensor storage created
    through the dispatcher, whatever its owner (autograd's saved tensors, a hook's
    packed codes, checkpoint's recompute), so every contender is measured the same way.
    It slows each op down: never time a step under it.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    device = torch.device(device)
    gc.collect()
    mt = MemTracker()
    mt.track_external(*track)
    with mt:
        gc.collect()
        before = _current_total(mt, device)
        out = forward()
        gc.collect()
        after = _current_total(mt, device)
        backward(out)
        del out
        gc.collect()
    peak_snap = mt.get_tracker_snapshot("peak").get(device, {})
    breakdown = {str(getattr(k, "value", k)): int(v) for k, v in peak_snap.items()}
    return StepMemory(before, after, int(peak_snap.get(_TOTAL, 0)), breakdown)


# --------------------------------------------------------------------------- tables


def mb(n: float | int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    rows = [[str(c) for c in r] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"\n{title}")
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        return
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        styled = [c.replace("PASS", "[green]PASS[/green]").replace("FAIL", "[red]FAIL[/red]")
                  for c in r]
        table.add_row(*styled)
    Console(width=max(180, Console().width)).print(table)


def update_markdown_section(path: Path | str, key: str, body: str, *, title: str = "# Benchmarks") -> None:
    """Replace what lies between ``<!-- bench:KEY:start -->`` and
    ``<!-- bench:KEY:end -->`` in ``path`` with ``body``; append the section if the
    markers are missing, create the file if it is. Everything else is kept."""
    path = Path(path)
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else f"{title}\n"
    i, j = text.find(start), text.find(end)
    if i != -1 and j != -1 and j > i:
        text = text[:i] + block + text[j + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def publish(text: str, path: Path | str, key: str, *, write: bool, log: Callable[[str], None]) -> None:
    """Print ``text``; when ``write``, also put it into ``path``'s section ``key``."""
    print(text)
    if write:
        update_markdown_section(path, key, text)
        log(f"wrote {path}")


# --------------------------------------------------------------------------- training


def demo_lm_setup(steps: int, quick: bool, seed: int, **overrides) -> tuple:
    """The demo's GPT task for loss runs: ``(config, batches, base model, parameter
    count, bytes of text)``; ``quick`` takes ``DemoConfig.quick``'s tiny model;
    ``overrides`` replace ``DemoConfig`` fields (``lr=...``)."""
    from memfit.data import ByteBatches, load_text_bytes
    from memfit.demo import DemoConfig, build_model

    cfg = DemoConfig.quick(steps=steps) if quick else DemoConfig(steps=steps)
    cfg = DemoConfig(**{**cfg.__dict__, "seed": seed, **overrides})
    data = load_text_bytes(max_bytes=cfg.max_data_bytes)
    batches = ByteBatches(data, seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.steps, seed=cfg.seed)
    base = build_model(cfg)
    return cfg, batches, base, sum(p.numel() for p in base.parameters()), data.numel()


def train_demo_lm(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, config) -> list[float]:
    """Train ``model`` on ``batches[0 .. config.steps)`` (token ids, their own labels) as
    ``memfit demo`` does: its warmup+cosine LR schedule over ``optimizer`` and, when
    ``config.grad_clip`` is set, global gradient-norm clipping. Returns each step's loss."""
    from memfit.demo import _lr_lambda

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    clip = getattr(config, "grad_clip", None)
    losses = []
    for i in range(config.steps):
        x = batches[i]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(float(loss.detach()))
    return losses
