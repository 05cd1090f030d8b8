"""The optimizers a memfit callback hands a framework: :func:`build_optimizer` (the
optimizer a plan names, over the framework's param groups), :class:`DeferredOptimizer`
(what the framework holds until the plan exists), :func:`optimizer_family` (which
optimizers memfit can stand in for) and :func:`optimizer_for_tracking`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch

__all__ = ["DeferredOptimizer", "build_optimizer", "optimizer_family", "optimizer_for_tracking"]


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

