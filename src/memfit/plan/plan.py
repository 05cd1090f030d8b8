"""``memfit.plan``: choose, per module, how to keep activations, and how to run the
optimizer, so that a training step fits a memory budget at the least cost.

What is chosen:

* per *unit* (the blocks of the model's main ``nn.ModuleList``, the modules outside
  it such as embeddings, final norm and output layer, and the root, where the loss
  is computed): keep the activations, compress them at 8, 4 or 2 bits
  (:func:`memfit.activations` through a per-module policy), or recompute them in
  backward (``torch.utils.checkpoint``; blocks only);
* the optimizer's state bits (32, 8 or 4; :mod:`memfit.optim`);
* whether the optimizer steps inside backward (each parameter updated, and its
  gradient freed, as soon as the gradient exists: LOMO / PyTorch's "optimizer in
  backward"). All gradients then never exist together, which is what a model whose
  peak is at the optimizer step needs; it rules out gradient accumulation and
  clipping by the global norm, so the planner only uses it when neither is asked
  for (``grad_accumulation=``, ``clip_grad_norm=``).

How: one plain :func:`~memfit.plan.estimate` (fake tensors), one fake forward that
counts what each unit saves and how big its inputs and outputs are, a short real
:func:`~memfit.plan.profile` for forward times, and a probe of the codec's and the
optimizers' throughput on this machine give an analytic model of the peak
(:mod:`memfit.plan.solver`). The search picks the cheapest choices whose modelled
peak fits; the pick is then checked with a real ``estimate(...)`` of exactly that
configuration, the model's offsets are corrected from the difference, and the search
runs again, until an estimated peak fits. The cost is the predicted step-time
overhead (recomputing costs the unit's forward time; compressing costs its bytes at
the measured codec throughput; compressed optimizer state costs its slower step)
plus a fidelity cost (fewer bits cost more; the first and last layers and the loss
head cost 8x as much, so they stay precise unless the budget needs them; 4-bit
optimizer state costs more than recomputing every block, so it too is used only when
the budget needs it: ``python bench/plan.py --parts statebits`` has the measurement).
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..activations.policy import main_blocks
from . import solver as S
from ..step import Loss, StepConfig, apply, make_optimizer, preserved_state, resolve_loss_fn
from .budget import format_bytes, parse_budget
from .estimate import Estimate, estimate

__all__ = ["BudgetTooSmall", "Plan", "UnitChoice", "max_batch_size", "plan"]

PLAN_FORMAT = 1
# Fidelity costs of compressed optimizer state (the activation widths' are in
# solver.CostModel). Activation codes are rounded stochastically (unbiased) and their
# error lives for one step; the state is rounded to nearest and carried from step to
# step into every update of every parameter. So the plan leaves the optimizer alone
# unless compressing activations would cost more than ~7 blocks at 8 bits (8-bit
# state) or the budget needs it. 4-bit state is priced above recomputing every block
# (a slower step, same result): measured on GPT-2 (4 x 384, vocab 50257, AdamW lr 3e-4,
# 40 steps of warm-up on the demo's text), 8-bit state ended +0.08% over fp32 and 4-bit
# +11% (most of it the vocabulary-sized embedding/output matrix), while 4-bit
# activations in the middle blocks were within 0.01%. So 4 bits only when the budget
# needs them.
STATE_FIDELITY = {32: 0.0, 8: 0.05, 4: 1.0}
_MIN_BYTES = 32 * 1024  # memfit.activations' default: smaller storages are kept
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


class BudgetTooSmall(ValueError):
    """No plan meets the budget. ``min_peak_bytes`` is the smallest peak the planner
    can reach (estimated), ``dominant`` what dominates it (e.g. ``"parameters 378 MB"``)."""

    def __init__(self, message: str, *, budget_bytes: int, min_peak_bytes: int, dominant: str,
                 breakdown: Mapping[str, int] | None = None):
        super().__init__(message)
        self.budget_bytes = int(budget_bytes)
        self.min_peak_bytes = int(min_peak_bytes)
        self.dominant = dominant
        self.breakdown = dict(breakdown or {})


# --------------------------------------------------------------------------- the plan


@dataclass
class UnitChoice:
    """What the plan does with one unit (a module and everything under it)."""

    name: str  # qualified module name ("" = the root: the loss and loose code)
    role: str  # "block", "pre" (before the blocks), "post" (after them), "root", "other"
    choice: str  # "keep", "8-bit", "4-bit", "2-bit" or "recompute"
    plain_bytes: int  # saved for backward, plain
    planned_bytes: int  # held for backward under the plan (modelled)
    overhead: float  # its share of the predicted step-time overhead
    fidelity: float  # its fidelity cost

    @property
    def bits(self) -> int | None:
        return int(self.choice.split("-")[0]) if self.choice.endswith("-bit") else None


def _choice_label(c) -> str:
    return f"{c}-bit" if isinstance(c, int) else str(c)


def _label_choice(s: str):
    return int(s.split("-")[0]) if s.endswith("-bit") else s


@dataclass
class Plan:
    """The outcome of :func:`memfit.plan`: a step configuration that fits the budget.

    ``with plan:`` around the forward applies the activation choices (compression
    policy and checkpoints) to the model it was made for; ``plan.optimizer(lr=...)``
    builds the chosen optimizer. ``plan.config`` is the
    :class:`~memfit.plan.StepConfig` (for :func:`~memfit.plan.measure_peak`,
    :func:`~memfit.plan.run_step`).
    """

    units: list[UnitChoice]
    optimizer_name: str
    state_bits: int
    optimizer_in_backward: bool
    budget_bytes: int
    predicted_peak_bytes: int
    predicted_peak_phase: str
    predicted_breakdown: dict[str, int]
    predicted_overhead: float
    fidelity_cost: float
    plain_peak_bytes: int
    plain_breakdown: dict[str, int]
    grad_accumulation: int = 1
    clip_grad_norm: float | None = None
    notes: list[str] = field(default_factory=list)
    model_class: str = ""
    model_fingerprint: str = ""
    activation_kwargs: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)  # how the search went (rounds, estimates)

    def __post_init__(self):
        self._model_ref: Callable[[], torch.nn.Module | None] | None = None
        self._active: list = []

    # -- the configuration --------------------------------------------------------

    @property
    def choices(self) -> dict[str, str]:
        """Unit name -> ``"keep"``, ``"8-bit"``, ``"4-bit"``, ``"2-bit"`` or ``"recompute"``."""
        return {u.name: u.choice for u in self.units}

    @property
    def policy(self) -> dict[str, int | None] | None:
        """The activation policy (``{module glob: bits}``), None when nothing is compressed."""
        return _policy_for({u.name: _label_choice(u.choice) for u in self.units})

    @property
    def checkpoint(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.units if u.choice == S.RECOMPUTE)

    @property
    def config(self) -> StepConfig:
        return StepConfig(
            policy=self.policy,
            checkpoint=self.checkpoint,
            optimizer=self.optimizer_name,
            state_bits=self.state_bits,
            optimizer_in_backward=self.optimizer_in_backward,
            accumulation_steps=self.grad_accumulation,
            max_grad_norm=self.clip_grad_norm,
            activation_kwargs=dict(self.activation_kwargs),
        )

    # -- binding to a model -------------------------------------------------------

    @property
    def model(self) -> torch.nn.Module | None:
        return self._model_ref() if self._model_ref is not None else None

    def bind(self, model: torch.nn.Module) -> "Plan":
        """Attach the plan to ``model`` (a loaded plan must be bound before use). The
        model must have the plan's units; a different parameter layout warns."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        names = {n for n, _ in model.named_modules()}
        missing = [u.name for u in self.units if u.name not in names]
        if missing:
            raise ValueError(
                f"this plan was made for a {self.model_class or 'different model'} with module "
                f"{missing[0]!r}, which {type(model).__name__} does not have"
            )
        fp = _fingerprint(model)
        if self.model_fingerprint and fp != self.model_fingerprint:
            warnings.warn(
                f"memfit plan: {type(model).__name__}'s parameters differ from those of the model the plan "
                f"was made for ({self.model_class}); its predictions do not apply",
                RuntimeWarning,
                stacklevel=2,
            )
        self._model_ref = weakref.ref(model)
        return self

    def _require_model(self) -> torch.nn.Module:
        m = self.model
        if m is None:
            raise RuntimeError(
                "this plan is not bound to a model (loaded from JSON, or its model is gone): call plan.bind(model)"
            )
        return m

    # -- using it -------------------------------------------------------------------

    def optimizer(self, lr: float | None = None, **kwargs) -> torch.optim.Optimizer:
        """The chosen optimizer over the bound model's parameters (torch's at 32 bits,
        :mod:`memfit.optim` at 8/4). With ``optimizer_in_backward`` it steps from
        gradient hooks, installed now and kept until ``optimizer.detach()``: call
        ``backward()`` then ``optimizer.step()`` (a no-op that checks the step was
        taken) and ``optimizer.zero_grad()`` as usual. A second backward before
        ``step()`` (gradient accumulation) raises ``RuntimeError``."""
        model = self._require_model()
        cfg = self.config
        opt = make_optimizer(model, cfg, lr=lr, **kwargs)
        if cfg.optimizer_in_backward:
            opt.refuse_accumulation = True
            opt.attach()
        return opt

    def apply(self, model: torch.nn.Module | None = None):
        """A context manager applying the activation choices (``with plan.apply():``;
        ``with plan:`` is the same for the bound model)."""
        if model is not None:
            self.bind(model)
        return _PlanContext(self, self._require_model())

    def __enter__(self) -> "Plan":
        ctx = _PlanContext(self, self._require_model())
        ctx.__enter__()
        self._active.append(ctx)
        return self

    def __exit__(self, *exc) -> None:
        ctx = self._active.pop()
        ctx.__exit__(*exc)

    def clip_grad_norm_(self, max_norm: float, **kwargs) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the bound model, refused (ValueError)
        when the optimizer steps inside backward (no gradient is left to clip)."""
        if self.optimizer_in_backward:
            raise ValueError(
                "this plan steps the optimizer inside backward: gradients are applied and freed as they are "
                "produced, so there is no global gradient norm to clip. Re-plan with clip_grad_norm=... "
                "(memfit.plan(..., clip_grad_norm=1.0)) to get a plan without optimizer-in-backward."
            )
        model = self._require_model()
        return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                              max_norm, **kwargs)

    # -- display ----------------------------------------------------------------------

    def _summary_rows(self) -> list[tuple[str, str]]:
        bd = self.predicted_breakdown
        opt = f"{self.optimizer_name}, {self.state_bits}-bit state"
        if self.optimizer_in_backward:
            opt += ", steps inside backward"
        rows = [
            ("budget", format_bytes(self.budget_bytes)),
            ("predicted peak", f"{format_bytes(self.predicted_peak_bytes)} ({100 * self.predicted_peak_bytes / self.budget_bytes:.0f}% of budget, in {self.predicted_peak_phase})"),
            ("plain PyTorch peak", format_bytes(self.plain_peak_bytes)),
            ("predicted step-time overhead", f"{100 * self.predicted_overhead:+.1f}%"),
            ("optimizer", opt),
        ]
        if self.grad_accumulation > 1:
            rows.append(("gradient accumulation", f"{self.grad_accumulation} micro-batches per step "
                         "(the peak counts the gradients alive during the later ones)"))
        if self.clip_grad_norm is not None:
            rows.append(("gradient clipping", f"global norm {self.clip_grad_norm:g}"))
        parts = [(k, bd.get(k, 0)) for k in ("params", "grads", "optimizer", "activations", "temporaries")]
        rows.append(("at the peak", ", ".join(f"{k} {format_bytes(v)}" for k, v in parts if v)))
        return rows

    def table(self):
        """A ``rich.table.Table`` with one row per unit, then the summary and notes."""
        from rich.table import Table

        title = (
            f"memfit plan: {self.model_class} within {format_bytes(self.budget_bytes)}: predicted peak "
            f"{format_bytes(self.predicted_peak_bytes)}, step time {100 * self.predicted_overhead:+.1f}%"
        )
        t = Table(title=title, title_justify="left", caption="\n".join(self.notes) or None, caption_justify="left")
        t.add_column("module")
        t.add_column("choice")
        t.add_column("saved plain", justify="right")
        t.add_column("held (planned)", justify="right")
        t.add_column("time cost", justify="right")
        for u in self._display_units():
            t.add_row(u.name or "<root: loss>", u.choice, format_bytes(u.plain_bytes),
                      format_bytes(u.planned_bytes), f"{100 * u.overhead:+.1f}%")
        t.add_section()
        for k, v in self._summary_rows():
            t.add_row(k, v, "", "", "")
        return t

    def _display_units(self) -> list[UnitChoice]:
        return list(self.units)

    def __str__(self) -> str:
        lines = [f"memfit plan for {self.model_class}"]
        width = max(len(k) for k, _ in self._summary_rows())
        lines += [f"  {k:<{width}}  {v}" for k, v in self._summary_rows()]
        name_w = max([len("module")] + [len(u.name or "<root: loss>") for u in self.units])
        lines.append(f"  {'module':<{name_w}}  {'choice':<9}  {'saved plain':>11}  {'held':>9}")
        for u in self.units:
            lines.append(
                f"  {u.name or '<root: loss>':<{name_w}}  {u.choice:<9}  {format_bytes(u.plain_bytes):>11}  "
                f"{format_bytes(u.planned_bytes):>9}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        counts = Counter(u.choice for u in self.units)
        return (
            f"Plan({self.model_class}, budget={format_bytes(self.budget_bytes)}, "
            f"peak={format_bytes(self.predicted_peak_bytes)}, overhead={self.predicted_overhead:+.3f}, "
            f"{self.optimizer_name}-{self.state_bits}{' in-backward' if self.optimizer_in_backward else ''}, "
            f"{dict(counts)})"
        )

    # -- JSON -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "model_class": self.model_class,
            "model_fingerprint": self.model_fingerprint,
            "budget_bytes": self.budget_bytes,
            "optimizer": self.optimizer_name,
            "state_bits": self.state_bits,
            "optimizer_in_backward": self.optimizer_in_backward,
            "grad_accumulation": self.grad_accumulation,
            "clip_grad_norm": self.clip_grad_norm,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "predicted_peak_phase": self.predicted_peak_phase,
            "predicted_breakdown": dict(self.predicted_breakdown),
            "predicted_overhead": self.predicted_overhead,
            "fidelity_cost": self.fidelity_cost,
            "plain_peak_bytes": self.plain_peak_bytes,
            "plain_breakdown": dict(self.plain_breakdown),
            "activation_kwargs": dict(self.activation_kwargs),
            "units": [
                {"name": u.name, "role": u.role, "choice": u.choice, "plain_bytes": u.plain_bytes,
                 "planned_bytes": u.planned_bytes, "overhead": u.overhead, "fidelity": u.fidelity}
                for u in self.units
            ],
            "notes": list(self.notes),
            "search": dict(self.search),
            "config": self.config.to_dict(),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], model: torch.nn.Module | None = None) -> "Plan":
        if not isinstance(d, Mapping) or "units" not in d:
            raise ValueError("not a memfit plan (no 'units')")
        fmt = d.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise ValueError(f"memfit plan format {fmt!r} is not supported (this memfit reads {PLAN_FORMAT})")
        units = []
        for u in d["units"]:
            choice = u["choice"]
            if choice not in ("keep", "recompute", "8-bit", "4-bit", "2-bit"):
                raise ValueError(f"memfit plan: unknown choice {choice!r} for {u.get('name')!r}")
            units.append(UnitChoice(name=u["name"], role=u.get("role", "other"), choice=choice,
                                    plain_bytes=int(u.get("plain_bytes", 0)),
                                    planned_bytes=int(u.get("planned_bytes", 0)),
                                    overhead=float(u.get("overhead", 0.0)), fidelity=float(u.get("fidelity", 0.0))))
        p = cls(
            units=units,
            optimizer_name=d["optimizer"],
            state_bits=int(d["state_bits"]),
            optimizer_in_backward=bool(d["optimizer_in_backward"]),
            budget_bytes=int(d["budget_bytes"]),
            predicted_peak_bytes=int(d["predicted_peak_bytes"]),
            predicted_peak_phase=d.get("predicted_peak_phase", ""),
            predicted_breakdown={k: int(v) for k, v in d.get("predicted_breakdown", {}).items()},
            predicted_overhead=float(d.get("predicted_overhead", 0.0)),
            fidelity_cost=float(d.get("fidelity_cost", 0.0)),
            plain_peak_bytes=int(d.get("plain_peak_bytes", 0)),
            plain_breakdown={k: int(v) for k, v in d.get("plain_breakdown", {}).items()},
            grad_accumulation=int(d.get("grad_accumulation", 1)),
            clip_grad_norm=d.get("clip_grad_norm"),
            notes=list(d.get("notes", [])),
            model_class=d.get("model_class", ""),
            model_fingerprint=d.get("model_fingerprint", ""),
            activation_kwargs=dict(d.get("activation_kwargs", {})),
            search=dict(d.get("search", {})),
        )
        p.config  # validates (e.g. optimizer_in_backward with accumulation)
        if model is not None:
            p.bind(model)
        return p

    @classmethod
    def from_json(cls, s: str, model: torch.nn.Module | None = None) -> "Plan":
        """The plan ``to_json`` wrote; pass ``model`` (or call ``bind``) to use it."""
        try:
            d = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a memfit plan (invalid JSON: {exc})") from exc
        return cls.from_dict(d, model)


class _PlanContext:
    """``with plan:``: checkpoint wrappers and the activation compressor, for the
    forward(s) run inside. Backward may run after the block (as with
    ``memfit.activations``); checkpointed modules recompute with the forward they
    ran with."""

    def __init__(self, plan: Plan, model: torch.nn.Module):
        self.plan = plan
        self.model = model
        self._stack: list = []

    def __enter__(self):
        cfg = self.plan.config
        # The optimizer's hooks are the optimizer's business (plan.optimizer()).
        cfg.optimizer_in_backward = False
        cm = apply(self.model, cfg)
        ctx = cm.__enter__()
        self._stack.append(cm)
        try:
            fwd = ctx.forward()
            fwd.__enter__()
        except BaseException:
            self._stack.pop().__exit__(None, None, None)
            raise
        self._stack.append(fwd)
        return ctx

    def __exit__(self, *exc):
        fwd = self._stack.pop()
        cm = self._stack.pop()
        try:
            fwd.__exit__(*exc)
        finally:
            cm.__exit__(*exc)
        return False


# --------------------------------------------------------------------------- helpers


def _fingerprint(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha1()
    for n, p in model.named_parameters():
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:16]


def _policy_for(choices: Mapping[str, Any]) -> dict[str, int | None] | None:
    """Per-unit rules for the activation engine. Every unit gets a rule (so nothing
    inherits a neighbour's by accident); the root's rule also covers the ancestors
    of the blocks and any module outside every unit. None when nothing is compressed."""
    if not any(isinstance(c, int) for c in choices.values()):
        return None
    rules: dict[str, int | None] = {}
    # The root first: fnmatch("", "") only matches the root itself.
    root = choices.get("", S.KEEP)
    rules[""] = root if isinstance(root, int) else None
    for name, c in choices.items():
        if name == "":
            continue
        rules[name] = c if isinstance(c, int) else None
    return rules


@dataclass
class _UnitSpec:
    name: str
    role: str
    can_recompute: bool


def discover_units(model: torch.nn.Module) -> list[_UnitSpec]:
    """The units a plan decides for: the blocks of the main ``nn.ModuleList``
    (:func:`memfit.activations.policy.main_blocks`), the other children of the blocks'
    ancestors (embeddings, final norm, output layer, ...), and the root. Without a
    ModuleList of two or more modules: the root's children and the root."""
    units = [_UnitSpec("", "root", False)]
    found = main_blocks(model)
    modules = dict(model.named_modules())
    if found is None:
        for n, _ in model.named_children():
            units.append(_UnitSpec(n, "other", False))
        return units
    list_name, ml = found
    ancestors = [""]
    if list_name:
        parts = list_name.split(".")
        ancestors += [".".join(parts[: i + 1]) for i in range(len(parts) - 1)]
    for anc in ancestors:
        for child, _ in modules[anc].named_children():
            full = f"{anc}.{child}" if anc else child
            if full == list_name or full in ancestors:
                continue
            units.append(_UnitSpec(full, "other", False))
    prefix = f"{list_name}." if list_name else ""
    for i in range(len(ml)):
        units.append(_UnitSpec(f"{prefix}{i}", "block", True))
    return units


def _unit_of(module_name: str, unit_names: Sequence[str]) -> str:
    best = ""
    for u in unit_names:
        if u and (module_name == u or module_name.startswith(u + ".")) and len(u) > len(best):
            best = u
    return best


def _storage_nbytes(obj) -> int:
    from torch.utils._pytree import tree_leaves

    seen, total = set(), 0
    for t in tree_leaves(obj):
        if isinstance(t, torch.Tensor):
            try:
                st = t.untyped_storage()
            except Exception:
                continue
            if st._cdata not in seen:
                seen.add(st._cdata)
                total += st.nbytes()
    return total


@dataclass
class _Trace:
    order: dict[str, int]
    in_bytes: dict[str, int]
    out_bytes: dict[str, int]
    saved: dict[str, Counter]  # unit -> {"float": b, "mask": b, "other": b, "total": b}
    fw_peak: dict[str, int]  # live bytes, highest during the unit's forward
    bw_peak: dict[str, int]  # live bytes, highest during the unit's backward
    start_bytes: int  # live bytes before the forward (parameters, buffers, batch)
    fwd_peak: int  # highest live bytes in the forward
    bwd_peak: int  # highest live bytes in the backward (0 if below the forward's)


def trace_units(model: torch.nn.Module, batch: Any, loss_fn: Loss | None, names: Sequence[str],
                min_bytes: int = _MIN_BYTES) -> _Trace:
    """One plain forward and backward on fake tensors (nothing computed or allocated),
    under MemTracker: each unit's first-call order, input and output bytes, what
    autograd saves in it (compressible floats, bool masks, the rest; each storage
    once, parameters excluded), and the live-bytes peak during its forward and its
    backward. No optimizer: the planner adds the state itself."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState

    from .estimate import fake_model

    fn = resolve_loss_fn(loss_fn)
    order: dict[str, int] = {}
    in_b: dict[str, int] = {}
    out_b: dict[str, int] = {}
    saved: dict[str, Counter] = {n: Counter() for n in names}
    stack: list[str] = []
    handles = []
    modules = dict(model.named_modules())
    unit_set = set(names)
    device = torch.device("cpu")
    with preserved_state(model, values=False):
        model.train()
        fm = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_model(model, fm) as faker:
            fbatch = faker.batch(batch)
            params = {p.untyped_storage()._cdata for p in list(model.parameters()) + list(model.buffers())}
            seen: dict[int, Any] = {}

            def pre(name):
                def hook(module, args, kwargs):
                    stack.append(name)
                    if name in unit_set and name not in order:
                        order[name] = len(order)
                        in_b[name] = _storage_nbytes((args, kwargs))
                return hook

            def post(name):
                def hook(module, args, kwargs, output):
                    if stack and stack[-1] == name:
                        stack.pop()
                    elif name in stack:
                        del stack[stack.index(name):]
                    if name in unit_set and name not in out_b:
                        out_b[name] = _storage_nbytes(output)
                return hook

            def pack(t):
                unit = _unit_of(stack[-1] if stack else "", names)
                if t.layout is not torch.strided or t.is_nested or t.is_quantized:
                    return t
                st = t.untyped_storage()
                key = st._cdata
                if (t.requires_grad and t.is_leaf) or key in params:
                    return t
                old = seen.get(key)
                if old is not None and old() is st:
                    return t
                seen[key] = weakref.ref(st)  # never keep a saved tensor alive
                nb = st.nbytes()
                c = saved[unit]
                c["total"] += nb
                if t.dtype is torch.bool:
                    c["mask"] += nb
                elif t.dtype in _FLOAT and nb >= min_bytes:
                    c["float"] += nb
                else:
                    c["other"] += nb
                return t

            def total(snap) -> int:
                return int(snap.get(device, {}).get("Total", 0))

            try:
                for n, m in modules.items():
                    handles.append(m.register_forward_pre_hook(pre(n), with_kwargs=True))
                    handles.append(m.register_forward_hook(post(n), with_kwargs=True, always_call=True))
                with fm:
                    from torch.utils._pytree import tree_leaves

                    mt = MemTracker()
                    mt.track_external(model, *[t for t in tree_leaves(fbatch) if isinstance(t, torch.Tensor)])
                    with mt:
                        start = total(mt.get_tracker_snapshot("current"))
                        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                            loss = fn(model, fbatch)
                        fwd_peak = total(mt.get_tracker_snapshot("peak"))
                        loss.backward()
                        del loss
                        all_peak = total(mt.get_tracker_snapshot("peak"))
                    fw_peak: dict[str, int] = {}
                    bw_peak: dict[str, int] = {}
                    for n in names:
                        stats = mt.memory_tracking.get(modules[n]) if n in modules else None
                        if stats is None:
                            continue
                        fw = [total(s) for s in stats.snapshots.get(_ModState.PEAK_FW, [])]
                        bw = [total(s) for s in stats.snapshots.get(_ModState.PEAK_BW, [])]
                        if fw:
                            fw_peak[n] = max(fw)
                        if bw:
                            bw_peak[n] = max(bw)
                    for p in model.parameters():
                        p.grad = None
            finally:
                for h in handles:
                    h.remove()
                seen.clear()
    order.setdefault("", len(order))
    # The root runs first but its own work (the loss) comes last.
    order[""] = max(order.values()) + 1
    return _Trace(order, in_b, out_b, saved, fw_peak, bw_peak, start, fwd_peak,
                  all_peak if all_peak > fwd_peak else 0)


# --------------------------------------------------------------------------- probes

_PROBE_CACHE: dict = {}


def codec_seconds_per_byte(n_bytes: int = 32 * 2**20, reps: int = 5) -> dict[int, float]:
    """Seconds per uncompressed byte to encode (stochastic rounding) and decode, at
    8, 4 and 2 bits, on this machine (measured once per process, on ``n_bytes``).

    This is the codec alone, in a loop: :func:`plan` prices compression from the
    codec's time inside real steps instead (``Profile.codec_seconds``), and uses
    these figures only when it does not profile (``step_seconds`` given). Every
    width is warmed up twice before any is timed: the first decodes into fresh
    memory run at a third of the speed (page faults), which made whichever width
    came first look three times dearer than the others."""
    key = ("codec", torch.get_num_threads(), n_bytes)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    from ..codec import IntFormat, decode, encode

    x = torch.randn(n_bytes // 4)
    formats = {bits: IntFormat(bits=bits, block_size=256, rounding="stochastic") for bits in (8, 4, 2)}
    for _ in range(2):  # warm up: kernels, and the allocator's pages
        for fmt in formats.values():
            decode(encode(x, fmt, seed=1))
    out = {}
    for bits, fmt in formats.items():
        times = []
        for r in range(reps):
            t0 = time.perf_counter()
            enc = encode(x, fmt, seed=r)
            decode(enc)
            times.append(time.perf_counter() - t0)
        out[bits] = statistics.median(times) / x.nbytes
    _PROBE_CACHE[key] = out
    return out


def optimizer_seconds_per_param(optimizer: str, n: int = 2**20, reps: int = 3) -> dict[int, float]:
    """Seconds per parameter element of one optimizer step at 32, 8 and 4 state bits
    (:func:`~memfit.plan.make_optimizer`'s optimizers), measured once per process."""
    key = ("optim", optimizer, torch.get_num_threads())
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for bits in (32, 8, 4):
            probe = torch.nn.Module()
            probe.w = torch.nn.Parameter(torch.randn(n // 1024, 1024) * 0.02)
            cfg = StepConfig(optimizer=optimizer, state_bits=bits)
            opt = make_optimizer(probe, cfg)
            probe.w.grad = torch.randn_like(probe.w) * 1e-3
            opt.step()  # state, kernels
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
            out[bits] = statistics.median(times) / n
            del opt, probe
    _PROBE_CACHE[key] = out
    return out


# --------------------------------------------------------------------------- memory pieces


def _state_bytes(model: torch.nn.Module, optimizer: str, bits: int) -> int:
    """Optimizer state of ``make_optimizer``'s optimizer at ``bits`` (the layouts of
    torch's optimizers and of memfit.optim's block-wise states)."""
    n_states = 2 if optimizer == "adamw" else 1
    seen = set()
    total = 0
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        step = 4 if optimizer != "sgd" else 0
        if bits == 32 or n < 4096 or p.is_complex() or getattr(p, "_memfit_keep_fp32", False):
            total += n_states * n * 4 + step
            continue
        block = 256 if bits == 8 else 128
        nb = -(-n // block)
        total += n_states * (nb * block * bits // 8 + nb * 4) + step
    return total


def _param_ownership(model: torch.nn.Module, unit_names: Sequence[str], order: Mapping[str, int]):
    """Gradient bytes per unit (a parameter used by several units belongs to the one
    latest in forward order: its gradient appears first in backward) and the bytes of
    parameters shared across units (alive for the whole backward even when the
    optimizer steps inside it)."""
    users: dict[int, set[str]] = {}
    sizes: dict[int, int] = {}
    for mname, m in model.named_modules():
        unit = _unit_of(mname, unit_names)
        for _, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                users.setdefault(id(p), set()).add(unit)
                sizes[id(p)] = p.numel() * p.element_size()
    grads: Counter = Counter()
    span = 0
    for pid, us in users.items():
        last = max(us, key=lambda u: order.get(u, -1))
        grads[last] += sizes[pid]
        if len(us) > 1:
            span += sizes[pid]
    return grads, span


# --------------------------------------------------------------------------- planning


def _logits_hint(model: torch.nn.Module, batch: Any, loss_fn, min_peak: int) -> str:
    """A pointer to :func:`memfit.causal_lm_loss` when the model computes its own
    causal-LM loss on logits that are a large part of the smallest peak."""
    if loss_fn is not None or not isinstance(batch, Mapping) or not isinstance(batch.get("labels"), torch.Tensor):
        return ""
    from ..loss import _parts

    try:
        _, head = _parts(model)
    except Exception:  # not a model causal_lm_loss supports (or a custom accessor failed)
        return ""
    logits = batch["labels"].numel() * head.out_features * 4
    if logits < 0.1 * min_peak:
        return ""
    return (f"; the loss head's full logits ({format_bytes(logits)} each, two or three alive at once) are a large "
            "part of it: loss_fn=memfit.causal_lm_loss() computes the loss in chunks without them")


def _dominant(breakdown: Mapping[str, int]) -> str:
    names = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer state",
             "activations": "activations", "temporaries": "temporaries", "buffers": "buffers", "inputs": "inputs"}
    k, v = max(breakdown.items(), key=lambda kv: kv[1]) if breakdown else ("params", 0)
    return f"{names.get(k, k)} {format_bytes(v)}"


def _config_for(sol: S.Solution, optimizer: str, accumulation: int, clip, activation_kwargs) -> StepConfig:
    return StepConfig(
        policy=_policy_for(sol.choices),
        checkpoint=tuple(n for n, c in sol.choices.items() if c == S.RECOMPUTE),
        optimizer=optimizer,
        state_bits=sol.option.state_bits,
        optimizer_in_backward=sol.option.in_backward,
        accumulation_steps=accumulation,
        max_grad_norm=clip,
        activation_kwargs=dict(activation_kwargs),
    )


def _config_key(cfg: StepConfig) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


def plan(
    model: torch.nn.Module,
    batch: Any,
    budget: int | str,
    optimizer: str = "adamw",
    loss_fn: Loss | None = None,
    *,
    state_bits: int | Sequence[int] | None = None,
    optimizer_in_backward: bool | None = None,
    grad_accumulation: int = 1,
    clip_grad_norm: float | None = None,
    bits: Sequence[int] = (8, 4, 2),
    recompute: bool = True,
    fidelity_weight: float = 1.0,
    margin: float = 0.02,
    max_rounds: int = 6,
    profile_steps: int = 2,
    step_seconds: float | None = None,
    activation_kwargs: Mapping[str, Any] | None = None,
    cache: dict | None = None,
    verbose: bool = False,
) -> Plan:
    """Plan a training step of ``model`` on ``batch`` that fits ``budget``.

    The plan minimizes predicted time overhead (fractions of a plain step, from a
    short profile: recomputing costs a unit's forward, compressing the codec's time
    measured inside a compressed step) plus a fidelity cost (fewer bits cost more;
    the first and last layers and the loss head eight times more). Costs within 0.01
    of the cheapest are ties, broken toward the plan that keeps more: the larger
    peak, so the budget is used rather than left idle.

    Args:
        model, batch, loss_fn: as for :func:`memfit.estimate` (``loss_fn(model, batch)``,
            default ``model(**batch).loss``).
        budget: bytes (int) or a string: ``"6GiB"``, ``"600MB"``, ``"1.5 GiB"``, or
            ``"40%"`` of the plain estimated peak (every activation kept, fp32
            optimizer state, stepped after backward).
        optimizer: ``"adamw"``, ``"sgd"`` or ``"lion"``.
        state_bits: the optimizer state widths the plan may use (default 32, 8 and 4;
            an int fixes it).
        optimizer_in_backward: None (the planner decides), False (never) or True
            (always). Never with ``grad_accumulation > 1`` or ``clip_grad_norm``:
            asking for both raises ``ValueError``.
        grad_accumulation: micro-batches per optimizer step the training loop will use.
        clip_grad_norm: the global-norm clipping the training loop will use.
        bits: activation widths the plan may use; recompute: whether it may checkpoint.
        fidelity_weight: scales the fidelity costs against the time costs.
        margin: plan for a peak at most ``budget * (1 - margin)`` (the estimate is
            exact for the allocations it sees; allocator slack is not).
        max_rounds: verification rounds (each one ``estimate`` call). Those the search
            leaves check cheaper single-unit changes that the peak model puts just over
            the target (``plan.search["rounds"]`` entries with ``"polish"``).
        profile_steps: real steps timed by :func:`memfit.plan.profile` (forward times).
        step_seconds: skip the profile and use this plain step time (forward times are
            then spread over units by their saved bytes).
        activation_kwargs: passed to :func:`memfit.activations` (``seed``,
            ``min_bytes``, ``block_size``, ``rounding``).
        cache: a dict to keep the plain estimate, the traced step and the profile in,
            to plan the same model and batch for several budgets without measuring again.

    Returns:
        :class:`Plan`. Raises :class:`BudgetTooSmall` (a ``ValueError``) with the
        smallest reachable peak when nothing fits.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(grad_accumulation, bool) or not isinstance(grad_accumulation, int) or grad_accumulation < 1:
        raise ValueError(f"grad_accumulation must be a positive int, got {grad_accumulation!r}")
    if clip_grad_norm is not None and not float(clip_grad_norm) > 0:
        raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm!r}")
    needs_all_grads = grad_accumulation > 1 or clip_grad_norm is not None
    if optimizer_in_backward and needs_all_grads:
        why = (f"grad_accumulation={grad_accumulation}" if grad_accumulation > 1
               else f"clip_grad_norm={clip_grad_norm}")
        raise ValueError(
            f"optimizer_in_backward=True cannot be combined with {why}: stepping inside backward applies and "
            "frees each gradient as soon as it exists, so gradients are never accumulated over micro-batches "
            "and there is no global norm to clip"
        )
    optimizer = str(optimizer).lower()
    StepConfig(optimizer=optimizer)  # validates the name
    if state_bits is None:
        widths = (32, 8, 4)
    elif isinstance(state_bits, int):
        widths = (state_bits,)
    else:
        widths = tuple(state_bits)
    for w in widths:
        StepConfig(state_bits=w)  # validates
    bits = tuple(int(b) for b in bits)
    for b in bits:
        if b not in (8, 4, 2):
            raise ValueError(f"bits must be among 8, 4, 2; got {b!r}")
    if optimizer_in_backward is None:
        in_bwd_opts = (False,) if needs_all_grads else (False, True)
    else:
        in_bwd_opts = (bool(optimizer_in_backward),)
    log = print if verbose else (lambda *a, **k: None)
    t_start = time.perf_counter()
    activation_kwargs = dict(activation_kwargs or {})
    for k in ("bits", "policy", "head_bits"):
        if k in activation_kwargs:
            raise ValueError(f"activation_kwargs cannot set {k!r}: the plan chooses it")
    cache = {} if cache is None else cache
    ckey = (optimizer, id(loss_fn), _fingerprint(model))

    # 1. The plain step, on fake tensors.
    if ("plain",) + ckey not in cache:
        cache[("plain",) + ckey] = estimate(model, batch, optimizer, 32, None, loss_fn)
    plain = cache[("plain",) + ckey]
    budget_bytes = parse_budget(budget, plain_peak_bytes=plain.peak_bytes)
    target = budget_bytes * (1 - margin)
    log(f"plain estimate: peak {format_bytes(plain.peak_bytes)} in {plain.peak_phase}")

    # 2. Units and what they save, on fake tensors.
    specs = discover_units(model)
    names = [s.name for s in specs]
    min_bytes = int(activation_kwargs.get("min_bytes", _MIN_BYTES))
    if ("trace", min_bytes) + ckey not in cache:
        cache[("trace", min_bytes) + ckey] = trace_units(model, batch, loss_fn, names, min_bytes=min_bytes)
    trace = cache[("trace", min_bytes) + ckey]
    grads_by_unit, span = _param_ownership(model, names, trace.order)

    # 3. Times: a short real profile, and the codec/optimizer probes.
    tkey = ("times", step_seconds, profile_steps) + ckey
    if tkey not in cache:
        cache[tkey] = _unit_times(model, batch, loss_fn, names, trace, profile_steps, step_seconds, optimizer)
    fwd_seconds, base_seconds, opt32, compressed_seconds = cache[tkey]
    codec = _codec_costs(codec_seconds_per_byte(), compressed_seconds, trace)
    opt_speed = optimizer_seconds_per_param(optimizer)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    n_tensors = len({id(p) for p in model.parameters() if p.requires_grad})
    step32 = opt32 if opt32 else opt_speed[32] * n_params
    cost = S.CostModel(
        step_seconds=base_seconds + step32,
        encode_decode_seconds_per_byte=codec,
        fidelity_weight=fidelity_weight,
    )

    blocks = [s.name for s in specs if s.role == "block"]
    first_block = blocks[0] if blocks else None
    last_block = blocks[-1] if blocks else None
    units: list[S.Unit] = []
    role_of = {}
    block_order = [trace.order.get(b, 0) for b in blocks]
    for s in specs:
        sv = trace.saved.get(s.name, Counter())
        role = s.role
        if role == "other" and blocks:
            role = "pre" if trace.order.get(s.name, 0) < min(block_order) else "post"
        role_of[s.name] = role
        is_end = role in ("pre", "post", "root", "other") or s.name in (first_block, last_block)
        if role == "other":
            is_end = True
        units.append(
            S.Unit(
                name=s.name, role=role, order=trace.order.get(s.name, 0),
                act_bytes=int(sv["total"]), float_bytes=int(sv["float"]), mask_bytes=int(sv["mask"]),
                out_bytes=int(trace.out_bytes.get(s.name, 0)), in_bytes=int(trace.in_bytes.get(s.name, 0)),
                grad_bytes=int(grads_by_unit.get(s.name, 0)),
                recompute_seconds=float(fwd_seconds.get(s.name, 0.0)),  # priced at its forward time
                can_recompute=recompute and s.can_recompute and s.name in trace.order, is_end=is_end,
            )
        )
    # Units that never ran (unused modules) are dropped from the search.
    units = [u for u in units if u.name in trace.order]

    P = trace.start_bytes or (plain.param_bytes + plain.buffer_bytes + plain.input_bytes)
    G = sum(grads_by_unit.values()) or plain.grad_bytes
    largest = max((p.numel() * p.element_size() for p in model.parameters() if p.requires_grad), default=0)

    # 4. Optimizer options.
    plain_choices = {u.name: S.KEEP for u in units}
    c_opt32 = max(0.0, plain.phase_peaks.get("optimizer", 0) - (P + G + plain.optimizer_bytes))
    options: list[S.OptimizerOption] = []
    for w in widths:
        for ib in in_bwd_opts:
            sb = plain.optimizer_bytes if w == 32 else _state_bytes(model, optimizer, w)
            extra = step32 * (opt_speed[w] / opt_speed[32] - 1.0)
            if ib:
                extra += 30e-6 * n_tensors
            temp = min(c_opt32, 3 * largest) if (ib and w == 32) else 0
            options.append(S.OptimizerOption(
                state_bits=w, in_backward=ib, state_bytes=sb, temp_bytes=int(temp),
                seconds=max(0.0, extra), fidelity=STATE_FIDELITY[w] * fidelity_weight,
            ))

    # 5. Calibration: per-unit offsets, so that the model reproduces the traced plain
    # step unit by unit (the peak inside each unit's forward and backward).
    f0, b0 = S.unit_profiles(units, plain_choices, S.OptimizerOption(32, False, 0, 0, 0.0, 0.0),
                             grad_bytes=G, span_grad_bytes=span)
    start = trace.start_bytes
    df: dict[str, float] = {}
    db: dict[str, float] = {}
    top_fw = max((v for n, v in trace.fw_peak.items() if n), default=0)
    top_bw = max((v for n, v in trace.bw_peak.items() if n), default=0)
    for n, v in f0.items():
        real = trace.fw_peak.get(n) if n else (trace.fwd_peak if trace.fwd_peak > top_fw else None)
        df[n] = float(real - start - v) if real is not None else 0.0
    for n, v in b0.items():
        if n == "<end>":
            db[n] = 0.0
            continue
        real = trace.bw_peak.get(n) if n else (trace.bwd_peak if trace.bwd_peak > top_bw else None)
        db[n] = float(real - start - v) if real is not None else 0.0
    calib_fb = {ib: {"fwd": 0.0, "bwd": 0.0} for ib in (False, True)}
    calib_opt = {o.key: (c_opt32 if o.state_bits == 32 else 0.0) for o in options}
    stored_override: dict[tuple[str, Any], float] = {}

    def branches(choices, o):
        f, b = S.unit_profiles(units, choices, o, grad_bytes=G, span_grad_bytes=span, overrides=stored_override)
        F = max(v + df.get(n, 0.0) for n, v in f.items())
        B = max(v + db.get(n, 0.0) for n, v in b.items())
        base = P + o.state_bytes + (o.temp_bytes if o.in_backward else 0)
        return base + F, base + B, P + G + o.state_bytes

    def model_peak(choices, o):
        F, B, O = branches(choices, o)
        c = calib_fb[o.in_backward]
        F, B = F + c["fwd"], B + c["bwd"]
        fb, phase = (F, "forward") if F >= B else (B, "backward")
        if o.in_backward:
            return fb, phase
        O += calib_opt[o.key]
        return (O, "optimizer") if O > fb else (fb, phase)

    estimates: dict[str, Estimate] = cache.setdefault(("estimates",) + ckey, {})
    checked: set[str] = set()
    fitting: list[tuple[S.Solution, Estimate]] = []  # verified plans that fit
    lean_verified: tuple[S.Solution, Estimate] | None = None
    rounds = []

    def config_of(sol: S.Solution) -> StepConfig:
        return _config_for(sol, optimizer, grad_accumulation, clip_grad_norm, activation_kwargs)

    def verify(sol: S.Solution, cfg: StepConfig, key: str, label: str, **tags) -> tuple[Estimate, bool]:
        """One round: ``estimate()`` of ``cfg`` (cached by ``key``), recorded and logged."""
        checked.add(key)
        est = estimates.get(key)
        if est is None:
            est = estimates[key] = estimate(model, batch, config=cfg, loss_fn=loss_fn)
        fits = est.peak_bytes <= target
        rounds.append({"round": len(rounds), "modelled_peak": int(sol.peak), "estimated_peak": est.peak_bytes,
                       "phase": est.peak_phase, "fits": fits, "config": cfg.describe(), **tags})
        flag = " [leanest]" if tags.get("leanest") else " [over]" if tags.get("polish") and not fits else ""
        log(f"{label}: {cfg.describe()}: modelled {format_bytes(sol.peak)}, estimated "
            f"{format_bytes(est.peak_bytes)} ({est.peak_phase}){flag}")
        return est, fits

    for rnd in range(max_rounds):
        sol, lean = S.search(units, options, cost, target, bits, recompute, model_peak, stored_override)
        chosen = sol if sol is not None else lean
        cfg = config_of(chosen)
        key = _config_key(cfg)
        if key in checked:
            break  # the corrected model picks a configuration already checked
        est, fits = verify(chosen, cfg, key, f"round {rnd}", leanest=sol is None)
        if fits:
            fitting.append((chosen, est))
        if lean_verified is None or est.peak_bytes < lean_verified[1].peak_bytes:
            lean_verified = (chosen, est)
        # Learn: what each unit held under these choices, and the branch offsets.
        _learn(units, chosen.choices, est, stored_override)
        F, B, O = branches(chosen.choices, chosen.option)
        ph = est.phase_peaks
        c = calib_fb[chosen.option.in_backward]
        if "forward" in ph:
            c["fwd"] = ph["forward"] - F
        if "backward" in ph:
            c["bwd"] = ph["backward"] - B
        if not chosen.option.in_backward and "optimizer" in ph:
            calib_opt[chosen.option.key] = ph["optimizer"] - O
        if fits and abs(est.peak_bytes - chosen.peak) < 0.02 * budget_bytes:
            break  # the model agreed with the estimate: a new search would pick the same
    # The search's tie rule, over what was verified: the largest estimated peak
    # among the plans within cost.tie of the cheapest.
    best_verified = None
    if fitting:
        best_verified = S.break_ties(fitting, cost.tie, cost_of=lambda f: f[0].cost, peak_of=lambda f: f[1].peak_bytes)
    # Polish. The peak model agrees with estimate() to about 2% of the budget, and
    # refine() trusts it, so near the floor it rejects cheaper neighbours that would
    # fit (on the demo's GPT-2 one block at 4 bits instead of 2: +0.8% final loss
    # instead of +1.4%). The rounds the search left check the cheapest such near
    # misses with real estimates; the plan only ever gets cheaper and stays verified.
    if best_verified is not None:
        menus = {u.name: S.options_for(u, bits, recompute) for u in units}
        slack = 0.02 * budget_bytes
        while len(rounds) < max_rounds:
            move = _near_miss(units, best_verified[0], cost, menus, model_peak, target + slack,
                              stored_override, checked, lambda s: _config_key(config_of(s)))
            if move is None:
                break
            cfg = config_of(move)
            est, fits = verify(move, cfg, _config_key(cfg), "polish", leanest=False, polish=True)
            if fits:
                best_verified = (move, est)
                _learn(units, move.choices, est, stored_override)
    search = {"rounds": rounds, "seconds": round(time.perf_counter() - t_start, 2),
              "codec_seconds_per_byte": codec, "optimizer_seconds_per_param": opt_speed,
              "plain_step_seconds": cost.step_seconds}
    if best_verified is None:
        lean_sol, lean_est = lean_verified if lean_verified is not None else (None, None)
        if lean_est is None:
            cfg = config_of(lean)
            lean_est = estimate(model, batch, config=cfg, loss_fn=loss_fn)
        bd = lean_est.peak_breakdown
        dom = _dominant(bd)
        extra = ""
        if needs_all_grads and in_bwd_opts == (False,):
            extra = (" (optimizer-in-backward, which would free the gradients, is ruled out by "
                     + ("gradient accumulation" if grad_accumulation > 1 else "gradient clipping") + ")")
        raise BudgetTooSmall(
            f"no plan fits {format_bytes(budget_bytes)}: the smallest peak memfit can reach for "
            f"{type(model).__name__} on this batch is {format_bytes(lean_est.peak_bytes)} "
            f"(with every activation recomputed or at the fewest bits, {optimizer} state at "
            f"{min(widths)} bits), dominated by {dom}{extra}{_logits_hint(model, batch, loss_fn, lean_est.peak_bytes)}",
            budget_bytes=budget_bytes, min_peak_bytes=lean_est.peak_bytes, dominant=dom, breakdown=bd,
        )
    sol, est = best_verified
    return _make_plan(model, sol, est, plain, units, cost, budget_bytes, optimizer, grad_accumulation,
                      clip_grad_norm, role_of, search, activation_kwargs, stored_override)


def _near_miss(units, base: S.Solution, cost: S.CostModel, menus, model_peak, ceiling: float,
               overrides, checked: set, key_of) -> S.Solution | None:
    """The single-unit move from ``base`` to a cheaper choice that saves the most cost
    with a modelled peak at or under ``ceiling``, among configurations not yet
    ``checked``; None when there is none."""
    def stored(u, c):
        return overrides.get((u.name, c), u.stored(c))

    best = None
    for u in units:
        c0 = base.choices[u.name]
        for c in menus[u.name]:
            if cost.total(u, c) >= cost.total(u, c0) - 1e-12:
                continue
            trial = dict(base.choices)
            trial[u.name] = c
            peak, phase = model_peak(trial, base.option)
            if peak > ceiling:
                continue
            sol = S.as_solution(units, trial, base.option, peak, phase, cost, stored)
            if key_of(sol) in checked:
                continue
            if best is None or sol.cost < best.cost:
                best = sol
    return best


def _learn(units, choices, est: Estimate, overrides) -> None:
    """Remember what each unit actually held under its choice in ``est`` (memfit's
    stored bytes, attributed to units). Recomputed units are invisible to saved-tensor
    hooks (checkpoint's own); their held bytes stay modelled."""
    names = [u.name for u in units]
    held: Counter = Counter()
    for mod, b in est.activations_by_module.items():
        held[_unit_of(mod, names)] += b
    for u in units:
        c = choices[u.name]
        if c == S.RECOMPUTE:
            continue
        if c == S.KEEP and u.name in held:
            overrides[(u.name, c)] = float(held[u.name])
        elif isinstance(c, int) and u.name in held:
            overrides[(u.name, c)] = float(held[u.name])


def _unit_times(model, batch, loss_fn, names, trace: _Trace, steps: int, step_seconds: float | None, optimizer: str):
    """``(forward seconds per unit (inclusive), forward+backward seconds, optimizer-step
    seconds or None, what compressing every activation at 4 bits adds to
    forward+backward or None)`` from :func:`memfit.plan.profile` (real steps, fp32
    optimizer; then the same with ``policy=4``). With ``step_seconds`` given, no
    profile: forward ~ a third of it, spread over units by their saved bytes.

    On CPU the compression cost is the codec time measured inside the compressed
    steps (``Profile.codec_seconds``). Elsewhere the codec runs asynchronously, so it
    is the difference of the two profiles' step times, which is noisy: one step each
    by default, and a 5% swing of either step moves the planner's choice between
    compressed activations and compressed optimizer state."""
    if step_seconds is None:
        from .profile import profile as _profile

        prof = _profile(model, batch, loss_fn=loss_fn, steps=steps, config=StepConfig(optimizer=optimizer))
        fwd = {n: float(prof.modules[n].forward_seconds) for n in names if n in prof.modules}
        fb = float(prof.forward_seconds + prof.backward_seconds)
        if fb > 0:
            added = None
            if sum(c["float"] for c in trace.saved.values()) > 0:
                p4 = _profile(model, batch, loss_fn=loss_fn, steps=steps,
                              config=StepConfig(optimizer=optimizer, policy=4))
                on_cpu = all(p.device.type == "cpu" for p in model.parameters())
                if on_cpu and p4.codec_seconds > 0:
                    added = float(p4.codec_seconds)
                else:
                    added = max(0.0, float(p4.forward_seconds + p4.backward_seconds) - fb)
            return fwd, fb, float(prof.optimizer_seconds) or None, added
        step_seconds = float(prof.step_seconds) or 1.0
    total_saved = sum(c["total"] for c in trace.saved.values()) or 1
    fwd = {n: step_seconds / 3 * trace.saved.get(n, Counter())["total"] / total_saved for n in names}
    return fwd, step_seconds, None, None


def _codec_costs(probe: Mapping[int, float], compressed_seconds: float | None, trace: _Trace) -> dict[int, float]:
    """Seconds per compressible byte that compressing costs a step, per width: what
    compressing every activation at 4 bits added to a step (``_unit_times``), per
    compressible byte, for every width (the codec is memory-bound: in a step 8, 4 and
    2 bits cost the same per input byte to within the measurement's noise), at least
    2% of the codec-alone figure so that it is never free; the probe alone without a
    measurement."""
    floats = sum(c["float"] for c in trace.saved.values())
    if compressed_seconds is None or floats <= 0:
        return dict(probe)
    measured = compressed_seconds / floats
    return {b: max(measured, 0.02 * probe[b]) for b in probe}


def _make_plan(model, sol, est, plain, units, cost, budget_bytes, optimizer, accumulation, clip, role_of,
               search, activation_kwargs, overrides) -> Plan:
    rows = []
    for u in sorted(units, key=lambda u: u.order):
        c = sol.choices[u.name]
        t, f = cost.unit_cost(u, c)
        held = u.act_bytes if c == S.KEEP else overrides.get((u.name, c), u.stored(c))
        rows.append(UnitChoice(name=u.name, role=role_of.get(u.name, u.role), choice=_choice_label(c),
                               plain_bytes=int(u.act_bytes),
                               planned_bytes=int(held), overhead=t, fidelity=f))
    notes = []
    o = sol.option
    if o.in_backward:
        notes.append(
            "optimizer steps inside backward: each gradient is applied and freed as it is produced, so gradient "
            "accumulation and clipping by the global norm are not possible with this plan"
        )
    if o.state_bits != 32:
        notes.append(f"{optimizer} state in {o.state_bits} bits (memfit.optim): "
                     f"{100 * o.seconds / cost.step_seconds:+.1f}% step time")
    n_rec = sum(1 for c in sol.choices.values() if c == S.RECOMPUTE)
    if n_rec:
        notes.append(f"{n_rec} block(s) recomputed in backward (torch.utils.checkpoint)")
    p = Plan(
        units=rows,
        optimizer_name=optimizer,
        state_bits=o.state_bits,
        optimizer_in_backward=o.in_backward,
        budget_bytes=int(budget_bytes),
        predicted_peak_bytes=int(est.peak_bytes),
        predicted_peak_phase=est.peak_phase,
        predicted_breakdown=dict(est.peak_breakdown),
        predicted_overhead=float(sol.overhead),
        fidelity_cost=float(sol.fidelity),
        plain_peak_bytes=int(plain.peak_bytes),
        plain_breakdown=dict(plain.peak_breakdown),
        grad_accumulation=accumulation,
        clip_grad_norm=clip,
        notes=notes,
        model_class=type(model).__name__,
        model_fingerprint=_fingerprint(model),
        activation_kwargs=dict(activation_kwargs),
        search=search,
    )
    p._estimate = est
    p._plain = plain
    p.bind(model)
    return p


# --------------------------------------------------------------------------- max batch size


def max_batch_size(
    model: torch.nn.Module,
    make_batch: Callable[[int], Any],
    budget: int | str,
    margin: float = 0.05,
    loss_fn: Loss | None = None,
    *,
    limit: int = 1 << 16,
    plan: Plan | None = None,
    **estimate_kwargs,
) -> int:
    """The largest batch size whose *estimated* peak is at most ``budget * (1 - margin)``.

    ``make_batch(n)`` builds a batch of ``n`` samples. The search doubles the size
    until the estimate exceeds the limit, then bisects; each probe is one
    :func:`memfit.estimate` call (fake tensors: nothing runs out of memory).
    ``estimate_kwargs`` (``optimizer``, ``state_bits``, ``policy``, ``checkpoint``,
    ``optimizer_in_backward``) or ``plan=`` (its configuration) set the step.
    A percentage budget is of the plain estimated peak at batch size 1. Raises
    :class:`BudgetTooSmall` if even one sample does not fit.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    if plan is not None:
        if estimate_kwargs:
            raise ValueError("pass either plan= or estimate options, not both")
        estimate_kwargs = {"config": plan.config}
    cache: dict[int, Estimate] = {}

    def est(n: int) -> Estimate:
        if n not in cache:
            cache[n] = estimate(model, make_batch(n), loss_fn=loss_fn, **estimate_kwargs)
        return cache[n]

    first = est(1)
    budget_bytes = parse_budget(budget, plain_peak_bytes=first.peak_bytes)
    limit_bytes = budget_bytes * (1 - margin)
    if first.peak_bytes > limit_bytes:
        dom = _dominant(first.peak_breakdown)
        raise BudgetTooSmall(
            f"even a batch of 1 needs {format_bytes(first.peak_bytes)} (estimated), more than "
            f"{format_bytes(limit_bytes)} ({format_bytes(budget_bytes)} less a {margin:.0%} margin); "
            f"dominated by {dom}",
            budget_bytes=budget_bytes, min_peak_bytes=first.peak_bytes, dominant=dom,
            breakdown=first.peak_breakdown,
        )
    lo, hi = 1, 2
    while hi <= limit and est(hi).peak_bytes <= limit_bytes:
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if est(mid).peak_bytes <= limit_bytes:
            lo = mid
        else:
            hi = mid
    return lo
