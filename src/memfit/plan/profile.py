"""``profile``: per-module saved bytes and forward/backward times from a few real steps.

What the planner needs per module:

* **saved bytes**: what autograd saves for backward while the module is the innermost
  one running (``saved_bytes``, "self"), and over its whole subtree
  (``saved_inclusive_bytes``: what recomputing the module would free), by dtype;
* **forward time**: the wall time of the module's forward calls in a step
  (``forward_seconds``, inclusive of its children) and without its children
  (``forward_self_seconds``);
* **recompute time**: for a module checkpointed by ``config.checkpoint``, the wall
  time of its forward recomputed inside backward (``recompute_seconds``): what
  checkpointing it costs. It is timed, not taken to equal the forward time: on CPU a
  recomputation reuses memory the backward has just freed, and can cost well under
  the first forward, which pays for fresh pages;
* **backward time**: from the first gradient reaching any of its outputs to the last
  of its inputs' gradients or its parameters' gradient accumulations
  (``backward_seconds``, inclusive; ``backward_self_seconds`` without children).

Forward times come from module forward pre/post hooks; backward times from gradient
hooks on each module's outputs and inputs (``register_multi_grad_hook``) and on its
parameters (post-accumulate-grad hooks), which change nothing in the graph. Times are
medians over the steps after the first (a warm-up). Whole-step forward, backward and
optimizer times are medians too. The hooks' own overhead (a few microseconds per
module call) is included. The model is restored afterwards.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch

from .._units import MB
from ..step import (
    Loss,
    StepConfig,
    apply,
    make_optimizer,
    preserved_state,
    resolve_loss_fn,
    run_step,
    tensors_in,
)



@dataclass
class ModuleProfile:
    """One module's row of a :class:`Profile` (bytes per step; seconds: medians)."""

    name: str
    type: str
    depth: int
    calls: int = 0  # forward calls per step
    param_bytes: int = 0  # parameters of the subtree
    saved_bytes: int = 0  # saved for backward while this module is innermost ("self")
    saved_inclusive_bytes: int = 0  # saved by the module and its descendants
    held_bytes: int = 0  # what is held for saved_bytes (after compression under a policy)
    saved_by_dtype: dict[str, int] = field(default_factory=dict)  # self, by dtype
    saved_tensors: int = 0  # tensors saved while innermost (any kind, parameters included)
    forward_seconds: float = 0.0  # inclusive of children
    # its forward recomputed inside backward, when checkpointed (config.checkpoint):
    # what checkpointing it costs, which on CPU can be well under forward_seconds
    recompute_seconds: float = 0.0
    forward_self_seconds: float = 0.0
    backward_seconds: float = 0.0  # inclusive
    backward_self_seconds: float = 0.0


@dataclass
class Profile:
    """Per-module saved bytes and times, and whole-step times, from real steps.

    Attributes:
        modules: ``{qualified name: ModuleProfile}`` for every module (``""``: the root),
            in ``named_modules()`` order.
        forward_seconds / backward_seconds / optimizer_seconds: whole-step medians.
        step_seconds: median of whole steps (forward + backward + optimizer).
        codec_seconds: median per step of the time spent encoding and decoding saved
            activations (under a policy; 0 without one). Part of the forward and
            backward times, measured inside them (host time on CUDA).
        saved_bytes: total saved for backward in a step (each storage once).
        steps: steps timed (after one warm-up when more than one was run).
        config: the :class:`StepConfig` used, as a dict.
        threads: ``torch.get_num_threads()`` during the run.
    """

    modules: dict[str, ModuleProfile] = field(default_factory=dict)
    forward_seconds: float = 0.0
    backward_seconds: float = 0.0
    optimizer_seconds: float = 0.0
    step_seconds: float = 0.0
    codec_seconds: float = 0.0
    saved_bytes: int = 0
    steps: int = 0
    config: dict = field(default_factory=dict)
    threads: int = 0

    @property
    def by_module(self) -> dict[str, ModuleProfile]:
        return self.modules

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Profile":
        d = dict(d)
        d["modules"] = {k: ModuleProfile(**v) for k, v in d.get("modules", {}).items()}
        return cls(**d)

    def table(self, max_depth: int | None = None, top: int | None = None, min_share: float = 0.0):
        """A ``rich.table.Table``, one row per module (down to ``max_depth`` levels;
        ``top``: the modules with the most inclusive saved bytes; ``min_share``: hide
        modules under that share of the step's saved bytes)."""
        from rich.table import Table

        rows = [m for m in self.modules.values() if max_depth is None or m.depth <= max_depth]
        total = self.saved_bytes or 1
        rows = [m for m in rows if m.saved_inclusive_bytes >= min_share * total or m.name == ""]
        if top is not None:
            rows = sorted(rows, key=lambda m: -m.saved_inclusive_bytes)[:top]
        t = Table(
            title=(f"memfit profile: {self.steps} step(s), median step {self.step_seconds:.3f}s (forward "
                   f"{self.forward_seconds:.3f}s, backward {self.backward_seconds:.3f}s, optimizer "
                   f"{self.optimizer_seconds:.3f}s"
                   + (f"; codec {self.codec_seconds:.3f}s of them" if self.codec_seconds else "")
                   + f"), {self.saved_bytes / MB:,.1f} MB saved for backward"),
            title_justify="left",
        )
        recomputed = any(m.recompute_seconds for m in rows)  # a column only under checkpointing
        cols = ("module", "type", "calls", "saved MB (self)", "saved MB (incl.)", "by dtype (self)",
                "fwd ms (incl.)", "fwd ms (self)", "bwd ms (incl.)", "bwd ms (self)")
        for col in cols + (("recompute ms",) if recomputed else ()):
            # full qualified names, wrapped rather than cut: two "mlp" rows stay apart
            t.add_column(col, justify="left" if col in ("module", "type", "by dtype (self)") else "right",
                         overflow="fold" if col == "module" else "ellipsis")
        for m in rows:
            kinds = ", ".join(f"{k} {v / MB:.1f}" for k, v in sorted(m.saved_by_dtype.items(), key=lambda kv: -kv[1]))
            t.add_row(
                m.name or "<root>", m.type, str(m.calls),
                f"{m.saved_bytes / MB:,.2f}", f"{m.saved_inclusive_bytes / MB:,.2f}", kinds,
                f"{m.forward_seconds * 1e3:,.2f}", f"{m.forward_self_seconds * 1e3:,.2f}",
                f"{m.backward_seconds * 1e3:,.2f}", f"{m.backward_self_seconds * 1e3:,.2f}",
                *((f"{m.recompute_seconds * 1e3:,.2f}" if m.recompute_seconds else "",) if recomputed else ()),
            )
        return t

    def __str__(self) -> str:
        from io import StringIO

        from rich.console import Console

        buf = StringIO()
        Console(file=buf, width=200).print(self.table(max_depth=3))
        return buf.getvalue()


# --------------------------------------------------------------------------- timing hooks


class _StepTimer:
    """Per-module forward and backward wall times for one step."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.names: dict[int, str] = {}
        for name, m in model.named_modules():
            self.names.setdefault(id(m), name)
        self.ancestors: dict[str, list[str]] = {}
        for name in self.names.values():
            parts = name.split(".") if name else []
            self.ancestors[name] = [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [""]
        self.handles: list = []
        self.reset()

    def reset(self) -> None:
        self.fwd: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()
        self.bwd_start: dict[str, float] = {}
        self.bwd_end: dict[str, float] = {}
        self._starts: dict[str, list[float]] = defaultdict(list)
        self._grad_handles: list = []

    def install(self) -> None:
        for name, m in self.model.named_modules():
            if self.names.get(id(m)) != name:
                continue  # shared module: timed under its first name
            self.handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post(name), always_call=True))
        owners: dict[int, list[str]] = {}
        for name, m in self.model.named_modules():
            for p in m.parameters(recurse=False):
                owners.setdefault(id(p), self.ancestors.get(name, [name]))
        for p in self.model.parameters():
            if p.requires_grad and id(p) in owners:
                self.handles.append(p.register_post_accumulate_grad_hook(self._param_done(owners[id(p)])))

    def remove(self) -> None:
        for h in self.handles + self._grad_handles:
            h.remove()
        self.handles = []
        self._grad_handles = []

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            if torch.is_grad_enabled():
                ins = [t for t in tensors_in((args, kwargs)) if t.requires_grad]
                if ins:
                    self._grad_handles.append(
                        torch.autograd.graph.register_multi_grad_hook(ins, self._bwd_end(name), mode="all")
                    )
            self._starts[name].append(time.perf_counter())

        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            now = time.perf_counter()
            starts = self._starts[name]
            if starts:
                self.fwd[name] += now - starts.pop()
                self.calls[name] += 1
            if torch.is_grad_enabled():
                outs = [t for t in tensors_in(output) if t.requires_grad and t.grad_fn is not None]
                if outs:
                    self._grad_handles.append(
                        torch.autograd.graph.register_multi_grad_hook(outs, self._bwd_start(name), mode="any")
                    )

        return hook

    def _bwd_start(self, name: str):
        def hook(grad):
            now = time.perf_counter()
            if name not in self.bwd_start or now < self.bwd_start[name]:
                self.bwd_start[name] = now

        return hook

    def _bwd_end(self, name: str):
        def hook(grads):
            now = time.perf_counter()
            if now > self.bwd_end.get(name, 0.0):
                self.bwd_end[name] = now

        return hook

    def _param_done(self, names: list[str]):
        def hook(p):
            now = time.perf_counter()
            for n in names:
                if now > self.bwd_end.get(n, 0.0):
                    self.bwd_end[n] = now

        return hook

    def result(self) -> tuple[dict[str, float], dict[str, float], Counter]:
        bwd = {}
        for name, s in self.bwd_start.items():
            e = self.bwd_end.get(name)
            if e is not None and e >= s:
                bwd[name] = e - s
        return dict(self.fwd), bwd, Counter(self.calls)


# --------------------------------------------------------------------------- public


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def profile(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: Loss | None = None,
    steps: int = 3,
    *,
    config: StepConfig | None = None,
) -> Profile:
    """Profile ``steps`` real training steps of ``model`` on ``batch``.

    The first step is a warm-up (not timed) when ``steps > 1``; times are medians over
    the others. ``config`` (default ``StepConfig()``: plain autograd, torch AdamW) sets
    the optimizer and any policy or checkpointing; saved bytes are what autograd saves
    (``held_bytes``: after memfit compression, when ``config.policy`` is set). The
    model is restored afterwards (values, grads, modes, hooks, RNG state).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cfg = config if config is not None else StepConfig()
    fn = resolve_loss_fn(loss_fn)
    names = [n for n, _ in model.named_modules()]
    types = {n: type(m).__name__ for n, m in model.named_modules()}
    fwd_t: dict[str, list[float]] = defaultdict(list)
    bwd_t: dict[str, list[float]] = defaultdict(list)
    rec_t: dict[str, list[float]] = defaultdict(list)
    calls: Counter = Counter()
    phase_t: dict[str, list[float]] = defaultdict(list)
    saved: dict[str, Any] = {}
    held: dict[str, int] = {}
    with preserved_state(model, values=True):
        model.train()
        opt = make_optimizer(model, cfg)
        timer = _StepTimer(model)
        with apply(model, cfg, opt, count_saved=True) as ctx:
            if ctx.counter is not None:
                ctx.counter.exclude = tensors_in(batch)
            timer.install()
            try:
                for i in range(steps):
                    timed = steps == 1 or i > 0
                    timer.reset()
                    ctx.recompute_seconds.clear()
                    marks: dict[str, float] = {}

                    def on_phase(name, marks=marks):
                        marks.setdefault(name, time.perf_counter())

                    run_step(model, batch, cfg, fn, opt, context=ctx, on_phase=on_phase)
                    for h in timer._grad_handles:
                        h.remove()
                    timer._grad_handles = []
                    if i == steps - 1:
                        if ctx.counter is not None:
                            saved = dict(ctx.counter.stats)
                        elif ctx.compressor is not None:
                            saved = dict(ctx.compressor.stats.by_module)
                        held = ctx.saved_bytes()
                    if not timed:
                        continue
                    f, b, c = timer.result()
                    for n in names:
                        fwd_t[n].append(f.get(n, 0.0))
                        bwd_t[n].append(b.get(n, 0.0))
                    for n in cfg.checkpoint:
                        rec_t[n].append(ctx.recompute_seconds.get(n, 0.0))
                    calls = c
                    phase_t["forward"].append(marks["backward"] - marks["forward"])
                    phase_t["backward"].append(marks["optimizer"] - marks["backward"])
                    phase_t["optimizer"].append(marks["done"] - marks["optimizer"])
                    phase_t["step"].append(marks["done"] - marks["forward"])
                    if ctx.compressor is not None:
                        st = ctx.compressor.stats
                        phase_t["codec"].append(st.encode_seconds + st.decode_seconds)
            finally:
                timer.remove()
        del opt
    return _assemble(model, cfg, names, types, fwd_t, bwd_t, rec_t, calls, phase_t, saved, held,
                     steps - 1 if steps > 1 else 1)


def _assemble(model, cfg, names, types, fwd_t, bwd_t, rec_t, calls, phase_t, saved, held, n_timed) -> Profile:
    children: dict[str, list[str]] = defaultdict(list)
    for n in names:
        if n:
            children[n.rpartition(".")[0]].append(n)
    param_bytes = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in model.named_modules()}
    mods: dict[str, ModuleProfile] = {}
    for n in names:
        s = saved.get(n)
        if s is None:
            sb, kinds, count = 0, {}, 0
        elif hasattr(s, "by_kind"):  # SavedModuleStats
            sb, kinds, count = s.bytes, dict(s.by_kind), sum(s.counts.values())
        else:  # memfit ModuleStats (under a policy): dtype split unknown
            sb, kinds, count = s.original_bytes, {"compressed": s.original_bytes}, sum(s.counts.values())
        mods[n] = ModuleProfile(
            name=n, type=types[n], depth=n.count(".") + 1 if n else 0, calls=int(calls.get(n, 0)),
            param_bytes=int(param_bytes.get(n, 0)), saved_bytes=int(sb), held_bytes=int(held.get(n, sb)),
            saved_by_dtype={k: int(v) for k, v in kinds.items()}, saved_tensors=int(count),
            forward_seconds=_median(fwd_t.get(n, [])), backward_seconds=_median(bwd_t.get(n, [])),
            recompute_seconds=_median(rec_t.get(n, [])),
        )
    def called_children(n: str) -> list[str]:
        # a child that is never called itself (a ModuleList, a ModuleDict) stands for
        # its own children
        out = []
        for c in children[n]:
            out.extend([c] if mods[c].calls else called_children(c))
        return out

    for n in reversed(names):  # children before parents
        m = mods[n]
        m.saved_inclusive_bytes = m.saved_bytes + sum(mods[c].saved_inclusive_bytes for c in children[n])
        if not m.calls:
            continue
        kids = called_children(n)
        m.forward_self_seconds = max(0.0, m.forward_seconds - sum(mods[c].forward_seconds for c in kids))
        m.backward_self_seconds = max(0.0, m.backward_seconds - sum(mods[c].backward_seconds for c in kids))
    # what the root's hooks cannot see (tensors saved outside every module call)
    extra = sum(v.bytes if hasattr(v, "bytes") else v.original_bytes for k, v in saved.items() if k not in mods)
    return Profile(
        modules=mods,
        forward_seconds=_median(phase_t["forward"]),
        backward_seconds=_median(phase_t["backward"]),
        optimizer_seconds=_median(phase_t["optimizer"]),
        step_seconds=_median(phase_t["step"]),
        codec_seconds=_median(phase_t["codec"]),
        saved_bytes=int(mods[""].saved_inclusive_bytes + extra) if "" in mods else int(extra),
        steps=n_timed,
        config=cfg.to_dict(),
        threads=torch.get_num_threads(),
    )
