"""The planner's result: :class:`Plan` (a step configuration that fits a budget, with
its predictions), :class:`UnitChoice` (one unit's choice), their JSON form and
display, and :class:`BudgetTooSmall` (what to say when nothing fits).

This module owns the data a plan carries and what can be done with a plan once
made: bind it to a model, apply it (``with plan:``), build its optimizer, save and
load it. How a plan is found is :mod:`memfit.plan.planner`'s.
"""

from __future__ import annotations

import json
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .._units import format_bytes
from ..step import StepConfig, apply, make_compressor, make_optimizer
from . import solver as S

__all__ = ["BudgetTooSmall", "Plan", "UnitChoice", "choice_label", "dominant_part", "fingerprint", "policy_for"]

PLAN_FORMAT = 1


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
    choice: str  # "keep", "8-bit", "4-bit", "2-bit", "recompute" or "offload"
    plain_bytes: int  # saved for backward, plain
    planned_bytes: int  # held for backward under the plan (modelled)
    overhead: float  # its share of the predicted step-time overhead
    fidelity: float  # its fidelity cost

    @property
    def bits(self) -> int | None:
        return int(self.choice.split("-")[0]) if self.choice.endswith("-bit") else None


def choice_label(c) -> str:
    return f"{c}-bit" if isinstance(c, int) else str(c)


def _label_choice(s: str):
    return int(s.split("-")[0]) if s.endswith("-bit") else s


@dataclass
class Plan:
    """The outcome of :func:`memfit.plan`: a step configuration that fits the budget.

    ``with plan:`` around the forward applies the activation choices (compression
    policy and checkpoints) to the model it was made for, and the autocast it was
    planned with (``plan.autocast``, :func:`memfit.plan`'s ``autocast=``); ``plan.optimizer(lr=...)``
    builds the chosen optimizer.

    Frozen weights (``plan.weights``: module -> ``"int8"``, ``"nf4"`` or ``"int4"``,
    empty unless the model has frozen floating-point weights and the budget needs
    them compressed) are a one-time change of the model, not a per-step context:
    ``plan.compress_weights()`` stores them compressed (:mod:`memfit.weights`) and the
    first ``with plan:`` calls it if it was not called; they stay compressed after the
    block. ``plan.restore_weights()`` puts plain parameters back (with the decoded
    values: compression is lossy). Call ``plan.optimizer()`` either before or after:
    it only takes trainable parameters. ``plan.config`` is the
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
    weights: dict[str, str] = field(default_factory=dict)  # module -> frozen-weight format
    weight_bytes_saved: int = 0  # what storing them so saves (predicted)
    predicted_host_bytes: int = 0  # activations offloaded to pinned host memory
    predicted_reserved_bytes: int = 0  # what CUDA's caching allocator would reserve (memfit.plan.reserved)
    autocast: str | None = None  # the forward's autocast dtype ("bf16", "fp16"), as planned

    def __post_init__(self):
        self._model_ref: Callable[[], torch.nn.Module | None] | None = None
        self._active: list = []
        self._compressor = None  # made on first use, for the bound model; see compressor
        self._weight_handles: list = []  # memfit.weights handles, once compressed

    # -- frozen weights -----------------------------------------------------------

    @property
    def weights_compressed(self) -> bool:
        """Whether :meth:`compress_weights` has run on the bound model (and not been undone)."""
        return bool(self._weight_handles)

    def compress_weights(self) -> list:
        """Store the bound model's frozen weights compressed as ``plan.weights`` says
        (one :func:`memfit.weights` call per format). Once: a second call returns the
        same handles. Returns the :class:`~memfit.weights.CompressedWeights` handles
        (empty when the plan compresses nothing)."""
        if self.weights and not self._weight_handles:
            from .frozen import compress_frozen

            self._weight_handles = compress_frozen(self._require_model(), self.weights)
        return list(self._weight_handles)

    def restore_weights(self) -> None:
        """Undo :meth:`compress_weights`: plain frozen parameters again, holding the
        decoded values (the originals were freed when they were compressed)."""
        for h in reversed(self._weight_handles):
            h.remove()
        self._weight_handles = []

    # -- the configuration --------------------------------------------------------

    @property
    def choices(self) -> dict[str, str]:
        """Unit name -> ``"keep"``, ``"8-bit"``, ``"4-bit"``, ``"2-bit"`` or ``"recompute"``."""
        return {u.name: u.choice for u in self.units}

    @property
    def policy(self) -> dict[str, int | None] | None:
        """The activation policy (``{module glob: bits}``), None when nothing is compressed."""
        return policy_for({u.name: _label_choice(u.choice) for u in self.units})

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
            autocast=self.autocast,
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
        fp = fingerprint(model)
        compressed_here = bool(self._weight_handles) and self.model is model
        if self.model_fingerprint and fp != self.model_fingerprint and not compressed_here:
            warnings.warn(
                f"memfit plan: {type(model).__name__}'s parameters differ from those of the model the plan "
                f"was made for ({self.model_class}); its predictions do not apply",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.model is not model:
            self._compressor = None
        self._model_ref = weakref.ref(model)
        return self

    @property
    def compressor(self):
        """The :class:`memfit.ActivationCompressor` that ``with plan:`` enters for the
        bound model (None when the plan compresses nothing). It is made once and kept,
        so its stochastic-rounding stream runs on from step to step; save
        ``plan.compressor.state_dict()`` with a checkpoint and load it on resume for a
        bit-identical continuation."""
        if self._compressor is None and self.policy is not None:
            self._compressor = make_compressor(self._require_model(), self.config)
        return self._compressor

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
        if self.autocast is not None:
            rows.append(("autocast", f"the forward under torch.autocast in {self.autocast} (applied by `with plan:`)"))
        if self.weights:
            rows.append(("frozen weights", f"{self.weights_label()}, saving {format_bytes(self.weight_bytes_saved)}"))
        if self.predicted_host_bytes:
            rows.append(("offloaded to host memory", format_bytes(self.predicted_host_bytes)))
        if self.predicted_reserved_bytes:
            rows.append(("CUDA allocator would reserve", format_bytes(self.predicted_reserved_bytes)))
        parts = [(k, bd.get(k, 0)) for k in ("params", "grads", "optimizer", "activations", "temporaries")]
        rows.append(("at the peak", ", ".join(f"{k} {format_bytes(v)}" for k, v in parts if v)))
        return rows

    def weights_label(self) -> str:
        """The frozen-weight formats, e.g. ``nf4 x14, int8 x2`` (modules per format), or ``keep``."""
        if not self.weights:
            return "keep"
        counts = Counter(self.weights.values())
        return ", ".join(f"{f} x{n}" for f, n in sorted(counts.items()))

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
        for u in self.units:
            t.add_row(u.name or "<root: loss>", u.choice, format_bytes(u.plain_bytes),
                      format_bytes(u.planned_bytes), f"{100 * u.overhead:+.1f}%")
        t.add_section()
        for k, v in self._summary_rows():
            t.add_row(k, v, "", "", "")
        return t

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
            f"{dict(counts)}{', weights ' + self.weights_label() if self.weights else ''})"
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
            "weights": dict(self.weights),
            "weight_bytes_saved": self.weight_bytes_saved,
            "predicted_host_bytes": self.predicted_host_bytes,
            "predicted_reserved_bytes": self.predicted_reserved_bytes,
            "autocast": self.autocast,
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
            if choice not in ("keep", "recompute", "offload", "8-bit", "4-bit", "2-bit"):
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
            weights=_checked_weights(d.get("weights", {})),
            weight_bytes_saved=int(d.get("weight_bytes_saved", 0)),
            predicted_host_bytes=int(d.get("predicted_host_bytes", 0)),
            predicted_reserved_bytes=int(d.get("predicted_reserved_bytes", 0)),
            autocast=d.get("autocast"),
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


def _checked_weights(weights: Any) -> dict[str, str]:
    """A plan's ``weights`` read from JSON (absent in plans written before the lever)."""
    from .frozen import WEIGHT_FORMATS

    if not isinstance(weights, Mapping):
        raise ValueError(f"memfit plan: 'weights' must map module names to formats, got {weights!r}")
    for module, fmt in weights.items():
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"memfit plan: unknown frozen-weight format {fmt!r} for {module!r}; "
                             f"known: {', '.join(WEIGHT_FORMATS)}")
    return {str(k): str(v) for k, v in weights.items()}


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
        self.plan.compress_weights()  # once; kept after the block (see Plan)
        cfg = self.plan.config
        # The optimizer's hooks are the optimizer's business (plan.optimizer()).
        cfg.optimizer_in_backward = False
        cm = apply(self.model, cfg, compressor=self.plan.compressor)
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


def dominant_part(breakdown: Mapping[str, int]) -> str:
    """What dominates a peak, e.g. ``"parameters 378 MB"`` (for :class:`BudgetTooSmall`)."""
    names = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer state",
             "activations": "activations", "temporaries": "temporaries", "buffers": "buffers", "inputs": "inputs"}
    k, v = max(breakdown.items(), key=lambda kv: kv[1]) if breakdown else ("params", 0)
    return f"{names.get(k, k)} {format_bytes(v)}"



def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's parameter names, shapes and dtypes (what a plan is bound to)."""
    import hashlib

    h = hashlib.sha1()
    for n, p in model.named_parameters():
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:16]


def policy_for(choices: Mapping[str, Any]) -> dict[str, int | str | None] | None:
    """Per-unit rules for the activation engine. Every unit gets a rule (so nothing
    inherits a neighbour's by accident); the root's rule also covers the ancestors
    of the blocks and any module outside every unit. None when nothing is compressed
    or offloaded."""
    def rule(c):
        return c if isinstance(c, int) or c == S.OFFLOAD else None

    if not any(rule(c) is not None for c in choices.values()):
        return None
    rules: dict[str, int | str | None] = {}
    # The root first: fnmatch("", "") only matches the root itself.
    rules[""] = rule(choices.get("", S.KEEP))
    for name, c in choices.items():
        if name == "":
            continue
        rules[name] = rule(c)
    return rules

