"""memfit in training frameworks: Hugging Face ``Trainer`` and PyTorch Lightning.

* :mod:`memfit.integrations.transformers`: :class:`~memfit.integrations.transformers.MemfitCallback`
  and :class:`~memfit.integrations.transformers.MemfitTrainer` (needs ``transformers``
  and ``accelerate``).
* :mod:`memfit.integrations.lightning`: :class:`~memfit.integrations.lightning.MemfitCallback`
  (needs ``lightning``).

Both callbacks do the same three things, each only when asked:

* with ``budget=``: plan the training step on the first training batch
  (:func:`memfit.plan`), apply the plan's activation choices (compression per module,
  recomputed blocks) around every training step and supply the optimizer the plan
  chose (8/4-bit state, optimizer-in-backward when nothing rules it out);
* without a budget: ``bits=``/``policy=`` compress activations
  (:func:`memfit.activations`) around every training step, ``state_bits=`` puts the
  optimizer state in 8 or 4 bits (:mod:`memfit.optim`);
* with ``measure=True``: track the real peak of every training step after the first
  with ``MemTracker`` (slower steps) and report it against the budget.

Settings memfit cannot honour (DeepSpeed, FSDP, a budget under several processes,
an optimizer the user built while memfit is asked to choose one, ...) raise
:class:`IncompatibleSetup` before any step runs. This module holds the parts both
callbacks share and imports neither framework.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

__all__ = ["IncompatibleSetup", "MemfitSettings", "PeakMeter"]


class IncompatibleSetup(ValueError):
    """A training set-up that memfit cannot honour; raised before any step runs, with
    the reason and what to change."""


# --------------------------------------------------------------------------- settings

_OPTIMIZERS = ("adamw", "sgd", "lion")


def _as_widths(value, what: str, allowed: tuple[int, ...]) -> tuple[int, ...] | None:
    if value is None:
        return None
    widths = (value,) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    for w in widths:
        if isinstance(w, bool) or w not in allowed:
            raise ValueError(f"{what} must be among {allowed}, got {value!r}")
    return widths


class MemfitSettings:
    """What a memfit callback was asked to do, validated. Shared by both callbacks.

    ``budget``: bytes or a string (``"600MB"``, ``"2GiB"``, ``"40%"`` of the plain
    estimated peak); the planner then chooses activations and optimizer, ``bits`` and
    ``state_bits`` only restrict its choices (widths it may use). Without a budget,
    ``bits``/``policy``/``head_bits`` go to :func:`memfit.activations` and
    ``state_bits`` (8 or 4; 32 = torch's own) picks memfit's optimizer.
    """

    def __init__(
        self,
        budget=None,
        bits=None,
        policy: Mapping[str, Any] | None = None,
        state_bits=None,
        *,
        head_bits="auto",
        optimizer: str = "adamw",
        plan_kwargs: Mapping[str, Any] | None = None,
        activation_kwargs: Mapping[str, Any] | None = None,
        measure: bool = False,
    ):
        self.budget = budget
        self.optimizer = str(optimizer).lower()
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
        self.plan_kwargs = dict(plan_kwargs or {})
        self.activation_kwargs = dict(activation_kwargs or {})
        self.head_bits = head_bits
        self.measure = bool(measure)
        if budget is not None:
            if policy is not None:
                raise ValueError(
                    "policy= and budget= together: with a budget the planner chooses the per-module policy itself; "
                    "pass bits=(8, 4) to restrict the widths it may use, or drop the budget to apply your policy"
                )
            self._check_budget(budget)
            self.bits = _as_widths(bits, "bits (with a budget: the widths the planner may use)", (8, 4, 2))
            self.state_bits = _as_widths(state_bits, "state_bits (with a budget: the widths the planner may use)",
                                         (32, 8, 4))
            self.policy = None
            for k in ("bits", "state_bits", "optimizer", "loss_fn", "grad_accumulation", "clip_grad_norm"):
                if k in self.plan_kwargs:
                    raise ValueError(
                        f"plan_kwargs may not set {k!r}: it comes from the callback's own arguments "
                        "or from the training loop's settings (gradient accumulation, clipping)"
                    )
            if self.activation_kwargs or head_bits != "auto":
                raise ValueError("activation_kwargs= and head_bits= are for bits=/policy= without a budget; "
                                 "with a budget the planner sets them")
        else:
            if plan_kwargs:
                raise ValueError("plan_kwargs= is for the planner and needs budget=")
            if bits is None and policy is None and state_bits is None:
                raise ValueError(
                    "memfit callback with nothing to do: pass budget= (plan activations and optimizer to fit it), "
                    "bits=/policy= (compress activations) or state_bits= (8- or 4-bit optimizer state)"
                )
            if isinstance(bits, (list, tuple)):
                raise ValueError(f"bits must be one setting (8, 4, 2, 'fp8' or None) without a budget, got {bits!r}")
            self.bits = bits
            self.policy = dict(policy) if policy is not None else None
            if state_bits is not None and (isinstance(state_bits, bool) or state_bits not in (32, 8, 4)):
                raise ValueError(f"state_bits must be 32, 8 or 4, got {state_bits!r}")
            self.state_bits = state_bits
            if self.bits is not None or self.policy is not None:
                # validate now, not at the first step
                import memfit

                memfit.activations(None, self.bits if self.bits is not None else None,
                                   head_bits=head_bits, **self.activation_kwargs)

    @staticmethod
    def _check_budget(budget) -> None:
        from memfit.plan import parse_budget

        if isinstance(budget, str) and budget.strip().endswith("%"):
            parse_budget(budget, plain_peak_bytes=1 << 30)  # validates the number
        else:
            parse_budget(budget)

    # -- what is asked --------------------------------------------------------------

    @property
    def plans(self) -> bool:
        return self.budget is not None

    @property
    def compresses(self) -> bool:
        """Activations are compressed (or planned)."""
        return self.plans or self.bits is not None or self.policy is not None

    @property
    def supplies_optimizer(self) -> bool:
        return self.plans or self.state_bits is not None

    def budget_bytes(self, plain_peak_bytes: int | None = None) -> int | None:
        from memfit.plan import parse_budget

        if self.budget is None:
            return None
        return parse_budget(self.budget, plain_peak_bytes=plain_peak_bytes)

    def forced_in_backward(self) -> bool:
        return bool(self.plan_kwargs.get("optimizer_in_backward"))

    def describe(self) -> str:
        if self.plans:
            return f"budget={self.budget!r}"
        parts = []
        if self.bits is not None or self.policy is not None:
            parts.append(f"bits={self.bits!r}" + (f", policy={self.policy!r}" if self.policy else ""))
        if self.state_bits is not None:
            parts.append(f"state_bits={self.state_bits}")
        return ", ".join(parts)

    # -- pieces ----------------------------------------------------------------------

    def make_plan(self, model: torch.nn.Module, batch, loss_fn, *, grad_accumulation: int,
                  clip_grad_norm: float | None, log: Callable[[str], None] | None = None):
        """:func:`memfit.plan` for this model and batch, with the training loop's
        gradient accumulation and clipping (which rule optimizer-in-backward out)."""
        import memfit

        kwargs: dict[str, Any] = dict(self.plan_kwargs)
        if self.bits is not None:
            kwargs["bits"] = self.bits
        if self.state_bits is not None:
            kwargs["state_bits"] = self.state_bits if len(self.state_bits) > 1 else self.state_bits[0]
        return memfit.plan(model, batch, self.budget, optimizer=self.optimizer, loss_fn=loss_fn,
                           grad_accumulation=grad_accumulation, clip_grad_norm=clip_grad_norm, **kwargs)

    def make_compressor(self, model: torch.nn.Module):
        import memfit

        return memfit.activations(model, self.bits, policy=self.policy, head_bits=self.head_bits,
                                  **self.activation_kwargs)

    def check_in_backward(self, grad_accumulation: int, clip: float | None, where: str) -> None:
        """Refuse a forced optimizer-in-backward with accumulation or clipping."""
        if not self.forced_in_backward():
            return
        if grad_accumulation > 1 or clip is not None:
            why = (f"gradient accumulation ({grad_accumulation} steps)" if grad_accumulation > 1
                   else f"gradient clipping (max norm {clip:g})")
            raise IncompatibleSetup(
                f"memfit: plan_kwargs asks for optimizer_in_backward=True, but {where} uses {why}. Stepping "
                "inside backward applies and frees each gradient as soon as it exists, so gradients cannot be "
                "accumulated over micro-batches and there is no global norm to clip. Turn those off, or drop "
                "optimizer_in_backward and let the planner decide."
            )


# --------------------------------------------------------------------------- optimizers


def optimizer_family(opt: torch.optim.Optimizer) -> str | None:
    """``"adamw"``, ``"sgd"``, ``"lion"`` for the optimizers memfit can stand in for,
    else None. ``torch.optim.Adam`` without weight decay counts as AdamW (identical)."""
    from memfit import optim as mopt

    if isinstance(opt, (torch.optim.AdamW, mopt.AdamW)):
        return "adamw"
    if isinstance(opt, torch.optim.Adam):
        if all(float(g.get("weight_decay", 0.0)) == 0.0 for g in opt.param_groups):
            return "adamw"
        return None
    if isinstance(opt, (torch.optim.SGD, mopt.SGD)):
        return "sgd"
    if isinstance(opt, mopt.Lion):
        return "lion"
    return None


# Group keys that belong to one implementation (torch's kernels, flags memfit's
# optimizers read differently): dropped when state moves to another class.
_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay", "amsgrad")


def build_optimizer(name: str, state_bits: int, groups: list[dict], **defaults) -> torch.optim.Optimizer:
    """The optimizer a memfit plan names over ``groups`` (the same dict objects, so an
    LR scheduler bound to them keeps working): torch's AdamW/SGD at 32 bits, else
    :mod:`memfit.optim` (Lion always), as :func:`memfit.plan` estimates them. SGD
    gets momentum 0.9 unless a group or ``defaults`` says otherwise (the planner's
    default)."""
    from memfit import optim as mopt

    for g in groups:
        for k in _IMPL_KEYS:
            g.pop(k, None)
    if name == "adamw":
        keep = {k: v for k, v in defaults.items() if k in ("lr", "betas", "eps", "weight_decay")}
        if state_bits == 32:
            return torch.optim.AdamW(groups, **keep)
        return mopt.AdamW(groups, state_bits=state_bits, **keep)
    if name == "sgd":
        keep = {k: v for k, v in defaults.items() if k in ("lr", "momentum", "weight_decay", "dampening", "nesterov")}
        keep.setdefault("momentum", 0.9)
        if state_bits == 32:
            return torch.optim.SGD(groups, **keep)
        return mopt.SGD(groups, state_bits=state_bits, **keep)
    if name == "lion":
        keep = {k: v for k, v in defaults.items() if k in ("lr", "betas", "weight_decay")}
        return mopt.Lion(groups, state_bits=state_bits, **keep)
    raise ValueError(f"unknown optimizer {name!r}")


class DeferredOptimizer(torch.optim.Optimizer):
    """The optimizer a framework holds while memfit's plan does not exist yet.

    Frameworks build their optimizer (and the LR scheduler on top of it) before the
    first batch, but the plan, which chooses the optimizer's state bits and whether it
    steps inside backward, is made on the first batch. This object takes the real
    optimizer's place from the start: it owns the param groups (so the scheduler can
    bind to them), and :meth:`materialize` later builds the planned optimizer *over the
    same group dicts*, after which every call (``step``, ``zero_grad``, ``state``,
    ``state_dict``, ``param_groups``) goes to it. A state dict loaded before that
    (resuming from a checkpoint) is kept and loaded into the planned optimizer.

    With optimizer-in-backward the planned optimizer has one optimizer per parameter;
    :meth:`sync` copies each group's ``lr`` (and weight decay, betas) to them, so LR
    schedules still apply: ``step()`` calls it, and so should the code that runs
    backward (the callbacks do).
    """

    # Attributes are read with plain attribute access (never ``self.__dict__``), so
    # that wrappers delegating through ``__getattr__`` (Lightning's LightningOptimizer
    # subclasses the optimizer's class and forwards missing attributes) reach ours.

    def __init__(self, groups: list[dict], defaults: dict):
        self._inner = None
        self._pending_state = None
        self._in_backward = False
        self._own_groups: list = []
        self._own_state: dict = {}
        super().__init__(groups, defaults)

    # The groups and the state are the planned optimizer's once it exists.
    @property
    def param_groups(self):  # type: ignore[override]
        inner = self._inner
        if inner is not None and not self._in_backward:
            return inner.param_groups
        return self._own_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        inner = getattr(self, "_inner", None)
        if inner is not None and not self._in_backward:
            inner.param_groups = value
        else:
            self._own_groups = value

    @property
    def state(self):  # type: ignore[override]
        inner = self._inner
        return inner.state if inner is not None else self._own_state

    @state.setter
    def state(self, value) -> None:
        inner = getattr(self, "_inner", None)
        if inner is not None:
            inner.state = value
        else:
            self._own_state = value

    @property
    def inner(self) -> torch.optim.Optimizer | None:
        """The planned optimizer, once :meth:`materialize` has run."""
        return self._inner

    @property
    def materialized(self) -> bool:
        return self._inner is not None

    def materialize(self, build: Callable[[list[dict]], torch.optim.Optimizer], *, in_backward: bool = False) -> None:
        """Build the planned optimizer: ``build(groups)`` gets this object's group dicts
        (it must build over them, except for an in-backward optimizer, whose hooks
        then read their hyperparameters through :meth:`sync`)."""
        if self._inner is not None:
            raise RuntimeError("this memfit optimizer has already been built")
        groups = self._own_groups
        inner = build(groups)
        if not in_backward and (len(inner.param_groups) != len(groups)
                                or any(a is not b for a, b in zip(inner.param_groups, groups))):
            raise RuntimeError("memfit: the planned optimizer must be built over the given param groups")
        self._inner = inner
        self._in_backward = in_backward
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            try:
                inner.load_state_dict(pending)
            except Exception as exc:
                raise RuntimeError(
                    f"memfit: the optimizer state loaded from the checkpoint does not fit the planned optimizer "
                    f"({type(inner).__name__}): {exc}. The plan made when resuming differs from the one the "
                    "checkpoint was saved with (another budget or batch?)"
                ) from exc
        self.sync()

    def sync(self) -> None:
        """Optimizer-in-backward: give each parameter's optimizer its group's ``lr``,
        ``weight_decay`` and ``betas`` (what LR schedulers change)."""
        inner = self._inner
        if inner is None or not self._in_backward:
            return
        per_param = getattr(inner, "optimizers", None)
        if not isinstance(per_param, Mapping):
            return
        for g in self._own_groups:
            for p in g["params"]:
                opt = per_param.get(p)
                if opt is None:
                    continue
                for ig in opt.param_groups:
                    for k in ("lr", "weight_decay", "betas", "momentum"):
                        if k in g and k in ig:
                            ig[k] = g[k]

    def attach(self) -> None:
        """Optimizer-in-backward: (re)install the gradient hooks (idempotent)."""
        inner = self._inner
        if inner is not None and self._in_backward and hasattr(inner, "attach"):
            inner.attach()

    def detach(self) -> None:
        """Optimizer-in-backward: remove the gradient hooks (training over: the model
        must not keep updating itself in someone else's backward)."""
        inner = self._inner
        if inner is not None and self._in_backward and hasattr(inner, "detach"):
            inner.detach()

    def _require(self) -> torch.optim.Optimizer:
        inner = self._inner
        if inner is None:
            raise RuntimeError(
                "memfit: the optimizer was stepped before memfit made its plan (it is made on the first training "
                "batch); this happens when the training loop calls optimizer.step() outside the framework's "
                "training step"
            )
        return inner

    def step(self, closure=None):  # type: ignore[override]
        self._opt_called = True  # what torch's LR scheduler checks (it wrapped the original step)
        self.sync()
        return self._require().step(closure)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        inner = self._inner
        if inner is None:
            return super().zero_grad(set_to_none=set_to_none)
        return inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):  # type: ignore[override]
        inner = self._inner
        if inner is not None:
            return inner.state_dict()
        if self._pending_state is not None:
            return self._pending_state
        return super().state_dict()

    def load_state_dict(self, state_dict) -> None:  # type: ignore[override]
        inner = self._inner
        if inner is not None:
            inner.load_state_dict(state_dict)
            return
        # Before the plan: keep it whole for the planned optimizer (its format, e.g.
        # quantized state, is that optimizer's), but take the groups' learning rates.
        # An empty one (what frameworks round-trip to move state to a device) is not
        # kept: it says nothing the planned optimizer needs.
        if state_dict.get("state") or "per_parameter" in state_dict:
            self._pending_state = state_dict
        for g, sg in zip(self._own_groups, state_dict.get("param_groups", [])):
            for k in ("lr", "initial_lr"):
                if k in sg:
                    g[k] = sg[k]

    def add_param_group(self, param_group) -> None:  # type: ignore[override]
        inner = getattr(self, "_inner", None)
        if inner is not None:
            inner.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def __repr__(self) -> str:
        inner = self._inner
        if inner is None:
            return "DeferredOptimizer(not planned yet)"
        return f"DeferredOptimizer({type(inner).__module__}.{type(inner).__name__})"


def optimizer_for_tracking(opt) -> torch.optim.Optimizer | None:
    """The object holding the state: the planned optimizer inside a
    :class:`DeferredOptimizer`, else ``opt`` (unwrapping framework wrappers that keep
    the real one in ``.optimizer``)."""
    seen = 0
    while opt is not None and not isinstance(opt, torch.optim.Optimizer) and seen < 4:
        opt = getattr(opt, "optimizer", None)
        seen += 1
    if isinstance(opt, DeferredOptimizer):
        return opt.inner
    return opt if isinstance(opt, torch.optim.Optimizer) else None


# --------------------------------------------------------------------------- batches


def tensor_sizes(batch) -> list[tuple[int, ...]]:
    from torch.utils._pytree import tree_leaves

    return [tuple(t.shape) for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]


def batch_tensors(batch) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]


class BatchGuard:
    """Warns once when a training batch has more elements than the batch the plan was
    made on (dynamic padding, a bigger last batch): the budget holds for the planned size."""

    def __init__(self, planned) -> None:
        self.sizes = tensor_sizes(planned)
        self.numel = sum(math.prod(s) for s in self.sizes)
        self.warned = False

    def check(self, batch) -> None:
        if self.warned:
            return
        sizes = tensor_sizes(batch)
        numel = sum(math.prod(s) for s in sizes)
        if numel > self.numel or any(
            math.prod(a) > math.prod(b) for a, b in zip(sizes, self.sizes)
        ):
            self.warned = True
            warnings.warn(
                f"memfit: a training batch (tensor shapes {sizes}) is larger than the one the plan was made on "
                f"({self.sizes}); the budget is only guaranteed for the planned size. Pad to a fixed length "
                "(e.g. padding='max_length') and keep the batch size fixed (drop_last=True).",
                RuntimeWarning,
                stacklevel=3,
            )


# --------------------------------------------------------------------------- measuring


def _fast_tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class _GlobalPeakTracker(MemTracker):
        """MemTracker keeping only the global peak (its per-module peaks loop over every
        module at each op, the bulk of its overhead, and are not used here)."""

        _fast = None

        def _update_peak_stats(self, peak_state) -> None:
            if self._fast is None:
                self._fast = all(hasattr(self, a) for a in ("_curr_mem_snap", "_peak_mem", "_peak_mem_snap"))
            if not self._fast:  # pragma: no cover - MemTracker's internals changed
                return super()._update_peak_stats(peak_state)
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

    return _GlobalPeakTracker


class PeakMeter:
    """The real peak memory of training steps, measured with ``MemTracker``
    (``torch.distributed._tools.mem_tracker``: every tensor storage made through the
    dispatcher, on CPU as on GPU) from the start of each optimizer step to its end
    (forward, backward, clipping, optimizer step, zero_grad). Parameters, buffers,
    optimizer state and the batch are tracked as external tensors.

    ``peak_bytes`` is the highest over the measured steps, ``step_peaks`` one value
    per step and ``breakdown`` MemTracker's categories at the highest peak.
    """

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.step_peaks: list[int] = []
        self.breakdown: dict[str, int] = {}
        self._tracker = None
        self._device: torch.device | None = None
        self._tracked_optimizer = None
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def start(self, model: torch.nn.Module, optimizer=None, batch=None) -> None:
        if self._active:
            return
        if self._tracker is None:
            self._tracker = _fast_tracker_class()()
            self._tracker.track_external(model)
            self._device = _main_device(model)
        opt = optimizer_for_tracking(optimizer)
        if opt is not None and opt is not self._tracked_optimizer:
            self._tracker.track_external(opt)
            self._tracked_optimizer = opt
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        # MemTracker's notes about modules gone from its weak maps (checkpointed blocks,
        # gradients freed by optimizer-in-backward): expected here
        warnings.filterwarnings("ignore", message="Module is None")
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        self._tracker.reset_mod_stats()  # MemTracker refuses a module seen in an earlier window otherwise
        self._tracker.__enter__()
        self._active = True
        if batch is not None:
            self.track(batch)

    def track(self, batch) -> None:
        """Count the batch's tensors (made outside the tracker, by the data loader).
        Called at the start of each micro-batch: it also clears MemTracker's module
        stats, since MemTracker takes a root module's second forward in one window
        (gradient accumulation) for a new iteration and refuses it."""
        if self._active:
            self._tracker.reset_mod_stats()
            ts = batch_tensors(batch)
            if ts:
                self._tracker.track_external(*ts)

    def stop(self) -> None:
        if not self._active:
            return
        self._active = False
        try:
            snap = self._tracker.get_tracker_snapshot("peak").get(self._device, {})
        finally:
            self._tracker.__exit__(None, None, None)
            self._warnings.__exit__(None, None, None)
        total = int(snap.get("Total", 0))
        self.step_peaks.append(total)
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.breakdown = {str(getattr(k, "name", k)): int(v) for k, v in snap.items()}

    def abort(self) -> None:
        """Leave the tracker after an error, without recording the step."""
        if self._active:
            self._active = False
            with contextlib.suppress(Exception):
                self._tracker.__exit__(None, None, None)
            with contextlib.suppress(Exception):
                self._warnings.__exit__(None, None, None)


def _main_device(model: torch.nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def format_bytes(n) -> str:
    from memfit.plan.budget import format_bytes as fb

    return fb(n)


# --------------------------------------------------------------------------- the step


class StepApplier:
    """What both callbacks run around each training forward: the plan's activation
    choices (``plan.apply()``: compression policy and checkpoint wrappers) or the
    compressor, remembering the latest stats.

    The context is left before backward: while it is active the engine keeps a table
    of the encodings it made (to encode a storage saved twice only once), so leaving
    it lets backward free each encoding as soon as it has been used, as in memfit's
    own loop (forward inside, ``loss.backward()`` outside) and in the planner's
    estimates. Backward decodes through the saved-tensor hooks either way, and
    checkpointed blocks recompute with the forward they ran with.
    """

    def __init__(self) -> None:
        self.plan = None
        self.compressor = None
        self.stats = None  # memfit.ActivationStats of the latest forward that saved something
        self.steps = 0  # training forwards run under memfit
        self.compressed_steps = 0  # of which memfit held less than autograd would have
        self._ctx = None
        self._step_ctx = None

    def enter(self) -> None:
        if self._ctx is not None:
            return
        if self.plan is not None:
            ctx = self.plan.apply()
            self._step_ctx = ctx.__enter__()
            self._ctx = ctx
        elif self.compressor is not None:
            self.compressor.__enter__()
            self._ctx = self.compressor
            self._step_ctx = None
        else:
            self._ctx = contextlib.nullcontext()
            self._ctx.__enter__()

    def exit(self, exc: BaseException | None = None, *, count: bool = True) -> None:
        """Leave the context. ``count``: a forward ran inside (with a compressor, one is
        counted only if something was saved)."""
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        et = type(exc) if exc is not None else None
        ctx.__exit__(et, exc, None)
        compressor = self.compressor if self.plan is None else getattr(self._step_ctx, "compressor", None)
        self._step_ctx = None
        if exc is not None:
            return
        if compressor is not None:
            st = compressor.stats
            if not st.by_module:
                return  # nothing was saved in there (no forward)
            self.stats = st
            self.steps += 1
            if st.stored_bytes < st.original_bytes:
                self.compressed_steps += 1
        elif count:
            self.steps += 1

    @contextlib.contextmanager
    def forward(self):
        """The context for one training forward (exited before backward)."""
        self.enter()
        try:
            yield
        except BaseException as exc:
            self.exit(exc)
            raise
        self.exit()

    @property
    def active(self) -> bool:
        return self._ctx is not None


def summary(settings: MemfitSettings, applier: StepApplier, meter: PeakMeter | None,
            budget_bytes: int | None) -> str:
    """A few lines: the plan (or settings), saved-tensor stats, measured peak."""
    lines = []
    if applier.plan is not None:
        p = applier.plan
        lines.append(f"memfit: planned peak {format_bytes(p.predicted_peak_bytes)} for a budget of "
                     f"{format_bytes(p.budget_bytes)} ({p.optimizer_name}, {p.state_bits}-bit state"
                     + (", steps inside backward" if p.optimizer_in_backward else "") + ")")
    else:
        lines.append(f"memfit: {settings.describe()}")
    st = applier.stats
    if st is not None:
        lines.append(f"memfit: last step saved {format_bytes(st.original_bytes)} for backward, held "
                     f"{format_bytes(st.stored_bytes)} ({st.ratio:.1f}x less)")
    if meter is not None and meter.step_peaks:
        line = f"memfit: measured peak {format_bytes(meter.peak_bytes)} over {len(meter.step_peaks)} step(s)"
        if budget_bytes:
            verdict = "within" if meter.peak_bytes <= budget_bytes else "OVER"
            line += f", {verdict} the budget of {format_bytes(budget_bytes)} ({100 * meter.peak_bytes / budget_bytes:.0f}%)"
        lines.append(line)
    return "\n".join(lines)


class CallbackResults:
    """The read-only results both trainer callbacks expose. The callback sets
    ``settings``, ``meter``, ``_applier`` and ``_deferred``, and ``_supplied`` when it
    hands the trainer an optimizer built without a plan."""

    settings: MemfitSettings
    meter: PeakMeter | None
    _applier: StepApplier
    _deferred: DeferredOptimizer | None
    _supplied: torch.optim.Optimizer | None = None

    @property
    def plan(self):
        """The :class:`memfit.Plan` made on the first training batch (budget only)."""
        return self._applier.plan

    @property
    def stats(self):
        """:class:`memfit.ActivationStats` of the latest training step."""
        return self._applier.stats

    @property
    def compressed_steps(self) -> int:
        """Training micro-steps in which memfit compressed some activation."""
        return self._applier.compressed_steps

    @property
    def steps(self) -> int:
        """Training micro-steps run under memfit."""
        return self._applier.steps

    @property
    def measured_peak_bytes(self) -> int | None:
        """The highest real peak of the measured steps (``measure=True``)."""
        if self.meter is None or not self.meter.step_peaks:
            return None
        return self.meter.peak_bytes

    @property
    def budget_bytes(self) -> int | None:
        if self.plan is not None:
            return self.plan.budget_bytes
        if self.settings.budget is None or str(self.settings.budget).strip().endswith("%"):
            return None
        return self.settings.budget_bytes()

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer memfit supplied (the planned one once the plan exists)."""
        if self._deferred is not None:
            return self._deferred.inner
        return self._supplied

    def summary(self) -> str:
        return summary(self.settings, self._applier, self.meter, self.budget_bytes)


def as_float_or_none(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if x > 0 else None


def first_loss(out) -> torch.Tensor:
    """The loss in what a training step returned: a tensor, ``{"loss": ...}`` or an
    object with ``.loss``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    loss = getattr(out, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(out, Sequence) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(
        f"memfit: the training step returned {type(out).__name__}, without a loss to plan with; "
        "return the loss (or {'loss': loss}) or pass loss_fn=lambda module, batch: ..."
    )
