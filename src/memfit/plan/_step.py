"""One training step's mechanics, shared by the estimator, the profiler, the measurer
and the planner.

* :class:`StepConfig`: what a step does besides forward/backward: an activation
  policy (memfit compression), modules to recompute (checkpointing), the optimizer
  and its state bits, optimizer-in-backward, gradient accumulation and clipping.
* :func:`resolve_loss_fn`: the loss of a batch, ``model(**batch).loss`` by default,
  with clear errors for batches the model rejects and losses that are not scalars.
* :func:`make_optimizer`: the optimizer a :class:`StepConfig` names (torch's own at 32
  bits, :mod:`memfit.optim` at 8/4 bits, or one optimizer per parameter stepped from
  gradient hooks for ``optimizer_in_backward``).
* :func:`apply`: a context manager that installs a config on a model (checkpoint
  wrappers, the activation compressor, optimizer-in-backward hooks) and removes all
  of it on exit; :func:`run_step` runs one step (forward, backward, step, zero_grad).
* :func:`preserved_state`: a context manager that puts a model back as it was
  (parameter and buffer values, ``.grad``, training modes, hooks, forwards, RNG).
* :class:`SavedCounter`: counts what autograd saves for backward, per innermost
  module, kind and dtype, without changing anything.
* :func:`tracked_steps`: runs steps under ``MemTracker`` and reports the last step's
  peak, its phase and its breakdown (used for real and for fake tensors alike).
"""

from __future__ import annotations

import contextlib
import gc
import time
import warnings
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

Loss = Callable[[torch.nn.Module, Any], torch.Tensor]

OPTIMIZERS = ("adamw", "sgd", "lion")
STATE_BITS = (32, 8, 4)

# torch-like defaults per optimizer (lr), and SGD's momentum (0 would mean no state).
_DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2, "lion": 1e-4}


# --------------------------------------------------------------------------- config


@dataclass
class StepConfig:
    """How one training step runs, beyond forward and backward.

    Attributes:
        policy: memfit activation compression: None (plain autograd), a setting for
            every module (8, 4, 2 or ``"fp8"``, as ``memfit.activations(model, bits=...)``),
            or per-module rules ``{glob: setting}`` (modules no rule matches keep
            their tensors as they are; a ``""`` rule sets the root's default).
        checkpoint: qualified module names whose forward is recomputed in backward
            (``torch.utils.checkpoint``, non-reentrant), installed by wrapping each
            module's forward for the duration of :func:`apply`.
        optimizer: ``"adamw"``, ``"sgd"`` (momentum 0.9 unless ``optimizer_kwargs``
            says otherwise) or ``"lion"``.
        state_bits: 32 (torch's own ``torch.optim.AdamW``/``SGD``; Lion has no torch
            version: ``memfit.optim.Lion(state_bits=32)``), 8 or 4 (``memfit.optim.*``).
        optimizer_in_backward: update each parameter as soon as its gradient is
            accumulated (``register_post_accumulate_grad_hook``, one optimizer per
            parameter) and free that gradient at once, so all gradients never exist
            together. Incompatible with ``accumulation_steps > 1`` and
            ``max_grad_norm`` (both need every gradient before the update).
        accumulation_steps: micro-steps (forward + backward on the batch) per
            optimizer step; the loss is divided by it.
        max_grad_norm: clip the global gradient norm before the step (None: no clipping).
        optimizer_kwargs: extra keyword arguments for the optimizer (lr, betas, ...).
        activation_kwargs: extra keyword arguments for ``memfit.activations``
            (``head_bits``, ``min_bytes``, ``block_size``, ...).
    """

    policy: Any = None
    checkpoint: tuple[str, ...] = ()
    optimizer: str = "adamw"
    state_bits: int = 32
    optimizer_in_backward: bool = False
    accumulation_steps: int = 1
    max_grad_norm: float | None = None
    optimizer_kwargs: dict = field(default_factory=dict)
    activation_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.checkpoint, str):
            self.checkpoint = (self.checkpoint,)
        self.checkpoint = tuple(self.checkpoint)
        if not all(isinstance(n, str) for n in self.checkpoint):
            raise TypeError(f"checkpoint must be module names (strings), got {self.checkpoint!r}")
        opt = str(self.optimizer).lower()
        if opt not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        self.optimizer = opt
        if isinstance(self.state_bits, bool) or self.state_bits not in STATE_BITS:
            raise ValueError(f"state_bits must be 32, 8 or 4, got {self.state_bits!r}")
        if isinstance(self.accumulation_steps, bool) or not isinstance(self.accumulation_steps, int) \
                or self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive int, got {self.accumulation_steps!r}")
        if self.max_grad_norm is not None and not float(self.max_grad_norm) > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.optimizer_in_backward:
            if self.accumulation_steps > 1:
                raise ValueError(
                    "optimizer_in_backward cannot accumulate gradients (accumulation_steps="
                    f"{self.accumulation_steps}): each parameter is updated as soon as its gradient exists"
                )
            if self.max_grad_norm is not None:
                raise ValueError(
                    "optimizer_in_backward cannot clip the global gradient norm (max_grad_norm="
                    f"{self.max_grad_norm}): all gradients never exist at once"
                )
        if self.policy is not None and not isinstance(self.policy, Mapping):
            from ..activations.policy import resolve_setting

            resolve_setting(self.policy, block_size=256, rounding="nearest", where="policy")  # validates
        self.optimizer_kwargs = dict(self.optimizer_kwargs or {})
        self.activation_kwargs = dict(self.activation_kwargs or {})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint"] = list(self.checkpoint)
        if isinstance(self.policy, Mapping):
            d["policy"] = dict(self.policy)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "StepConfig":
        d = dict(d)
        d["checkpoint"] = tuple(d.get("checkpoint", ()))
        return cls(**d)

    def describe(self) -> str:
        """A short label, e.g. ``adamw-8 act=4 ckpt=12 in-bwd``."""
        parts = [f"{self.optimizer}-{self.state_bits}"]
        if self.policy is not None:
            if isinstance(self.policy, Mapping):
                parts.append("act={" + ", ".join(f"{k}:{v}" for k, v in self.policy.items()) + "}")
            else:
                parts.append(f"act={self.policy}")
        if self.checkpoint:
            parts.append(f"ckpt={len(self.checkpoint)}")
        if self.optimizer_in_backward:
            parts.append("in-bwd")
        if self.accumulation_steps > 1:
            parts.append(f"accum={self.accumulation_steps}")
        if self.max_grad_norm is not None:
            parts.append(f"clip={self.max_grad_norm:g}")
        return " ".join(parts)


def as_config(
    config: StepConfig | None = None,
    *,
    optimizer: str = "adamw",
    state_bits: int = 32,
    policy: Any = None,
    checkpoint: Sequence[str] = (),
    optimizer_in_backward: bool = False,
) -> StepConfig:
    """``config`` if given, else a StepConfig from the keyword arguments."""
    if config is not None:
        if not isinstance(config, StepConfig):
            raise TypeError(f"config must be a StepConfig, got {type(config).__name__}")
        return config
    return StepConfig(
        policy=policy, checkpoint=tuple(checkpoint), optimizer=optimizer, state_bits=state_bits,
        optimizer_in_backward=optimizer_in_backward,
    )


# --------------------------------------------------------------------------- loss


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"without a loss_fn the batch must be a dict of keyword arguments for the model "
            f"(the loss is model(**batch).loss), got {type(batch).__name__}; pass loss_fn=lambda model, batch: ..."
        )
    try:
        out = model(**batch)
    except Exception as exc:
        if _is_fake_limitation(exc):
            raise
        raise ValueError(f"model(**batch) failed: {type(exc).__name__}: {exc}") from exc
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError(
            f"model(**batch) returned a {type(out).__name__} without a .loss (no labels in the batch?); "
            f"add labels to the batch or pass loss_fn=lambda model, batch: ..."
        )
    return loss


def _is_fake_limitation(exc: BaseException) -> bool:
    try:
        from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (DataDependentOutputException, DynamicOutputShapeException))


def resolve_loss_fn(loss_fn: Loss | None) -> Loss:
    """The loss function a step uses, wrapped with checks.

    ``None`` means ``model(**batch).loss`` (the batch must be a dict; a model that
    rejects it raises ``ValueError("model(**batch) failed: ...")``; an output without
    ``.loss`` raises ``ValueError``). Otherwise ``loss_fn(model, batch)``. Either way the
    result must be a scalar tensor (``ValueError("loss_fn must return a scalar tensor,
    got shape ...")``) that requires grad.
    """
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    fn = _default_loss if loss_fn is None else loss_fn

    def checked(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = fn(model, batch)
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(
                "the loss does not require grad (no trainable parameters, or computed under torch.no_grad())"
            )
        return loss

    checked.__wrapped__ = fn  # type: ignore[attr-defined]
    return checked


# --------------------------------------------------------------------------- optimizers


def _optimizer_factory(config: StepConfig, lr: float | None, kw: dict) -> Callable[[list], torch.optim.Optimizer]:
    name, bits = config.optimizer, config.state_bits
    kwargs = {**config.optimizer_kwargs, **kw}
    if lr is not None:
        kwargs["lr"] = lr
    kwargs.setdefault("lr", _DEFAULT_LR[name])
    if name == "sgd":
        kwargs.setdefault("momentum", 0.9)
    from .. import optim as mopt

    if name == "adamw":
        if bits == 32:
            return lambda params: torch.optim.AdamW(params, **kwargs)
        return lambda params: mopt.AdamW(params, state_bits=bits, **kwargs)
    if name == "sgd":
        if bits == 32:
            return lambda params: torch.optim.SGD(params, **kwargs)
        return lambda params: mopt.SGD(params, state_bits=bits, **kwargs)
    return lambda params: mopt.Lion(params, state_bits=bits, **kwargs)


class InBackwardOptimizer(torch.optim.Optimizer):
    """Optimizer-in-backward: one optimizer per parameter, stepped from that
    parameter's post-accumulate-grad hook, after which its gradient is freed.

    ``step()`` and ``zero_grad()`` do nothing (the hooks do the work) so that a
    training loop written for an ordinary optimizer runs unchanged. :meth:`attach`
    installs the hooks (``apply`` does it), :meth:`detach` removes them.
    ``param_groups`` are the per-parameter optimizers' own groups (one per parameter),
    so LR schedulers work on it as on an ordinary optimizer.
    ``state_dict()`` holds the per-parameter optimizers' state dicts, in parameter
    order. :attr:`state` is the union of their states (so tools that read
    ``optimizer.state``, such as MemTracker, see all of it).

    Given ``model``, a parameter registered on several of its modules (tied weights,
    such as a language model's embedding and output layer) steps once per backward
    pass, at its end, from the sum of all its uses' gradients, summed in place (see
    :class:`_TiedGradients`): one weight-sized tensor fewer than autograd's own
    out-of-place sum.

    With ``refuse_accumulation``, a parameter whose gradient arrives a second time
    before ``step()`` (a second backward: gradient accumulation, which stepping
    inside backward cannot do) raises ``RuntimeError`` instead of silently taking
    two optimizer steps.
    """

    def __init__(self, params, factory: Callable[[list], torch.optim.Optimizer],
                 model: torch.nn.Module | None = None, refuse_accumulation: bool = False):
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("optimizer_in_backward: the model has no parameter that requires grad")
        self.optimizers: dict[torch.Tensor, torch.optim.Optimizer] = {p: factory([p]) for p in params}
        self._handles: list = []
        self.refuse_accumulation = refuse_accumulation
        self._stepped: set[torch.Tensor] = set()
        self._tied = _TiedGradients(model, params) if model is not None else None
        super().__init__(params, {})
        # share the inner optimizers' groups, so LR schedulers and manual lr changes reach them
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
        self.defaults = dict(next(iter(self.optimizers.values())).defaults)

    @property
    def state(self):  # type: ignore[override]
        merged: dict = {}
        for opt in self.optimizers.values():
            merged.update(opt.state)
        return merged

    @state.setter
    def state(self, value) -> None:  # set by Optimizer.__init__; the real state is per parameter
        pass

    def attach(self) -> None:
        """Install the post-accumulate-grad hooks (idempotent)."""
        if self._handles:
            return
        tied = self._tied.params if self._tied is not None else {}
        for p, opt in self.optimizers.items():
            if p in tied:
                self._handles.append(p.register_post_accumulate_grad_hook(self._tied.gather_accumulated))
            else:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(opt)))
        if tied:
            steppers = {p: self._hook(self.optimizers[p]) for p in tied}
            self._handles.extend(self._tied.attach(steppers))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, opt: torch.optim.Optimizer):
        def hook(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            if self.refuse_accumulation:
                if p in self._stepped:
                    raise RuntimeError(
                        "memfit plan: this plan steps the optimizer inside backward, so gradients cannot be "
                        "accumulated over several backward passes; call optimizer.step() after each backward, "
                        "or re-plan with grad_accumulation=N (memfit.plan(..., grad_accumulation=N))"
                    )
                self._stepped.add(p)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return hook

    def step(self, closure=None):  # type: ignore[override]
        """Ends the step: the hooks already updated every parameter. A method (not an
        instance attribute) so that LR schedulers can wrap it as they wrap torch's."""
        self._stepped.clear()
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict:  # type: ignore[override]
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        parts = state_dict.get("per_parameter") if isinstance(state_dict, Mapping) else None
        if parts is None or len(parts) != len(self.optimizers):
            raise ValueError("not a state dict of this InBackwardOptimizer (per_parameter list of matching length)")
        for opt, sd in zip(self.optimizers.values(), parts):
            opt.load_state_dict(sd)

    def inner_optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.optimizers.values())


# Under a dispatch mode (the estimator's fake tensors, MemTracker) autograd sums the
# gradients of a parameter used in several places out of place, and without one only
# when it can steal a buffer: for a tied embedding / output layer that is three
# vocabulary-sized tensors alive at once at the end of backward (the output layer's
# gradient, the embedding's and their sum). Under optimizer-in-backward nothing else
# is left alive then, so those tensors set the floor of the peak. Only these backward
# nodes return a gradient that nothing else references, so it may be summed into in
# place.
_FRESH_GRAD_NODES = frozenset({"EmbeddingBackward0", "MmBackward0", "AddmmBackward0"})


class _TiedGradients:
    """Gradients of tied parameters (one tensor registered on several modules, such
    as a language model's embedding and output layer) for optimizer-in-backward,
    summed with one tensor fewer than autograd's own sum.

    After each forward of a module owning a tied parameter, the backward node of that
    use is found (searching only the nodes that forward created) and given a hook
    that takes the gradient out of autograd's path into a per-parameter sum, adding
    in place into whichever tensor is memfit's to change. Uses not found this way
    (the weight read outside its modules) still reach ``.grad`` and are added from
    the post-accumulate-grad hook. The parameter steps once, at the end of that
    backward pass (``queue_callback``), from the whole sum.
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.Tensor]):
        # tensors hash by identity, so they key these dicts as they key InBackwardOptimizer's
        owners: dict[torch.Tensor, list[torch.nn.Module]] = {p: [] for p in params}
        for module in model.modules():
            for t in module._parameters.values():
                if t in owners:
                    owners[t].append(module)
        self.params = {p: ms for p, ms in owners.items() if len(ms) > 1}
        self._pending: dict[torch.Tensor, tuple[torch.Tensor, bool]] = {}  # p: (sum so far, ours to change)
        self._steppers: Mapping[torch.Tensor, Callable[[torch.Tensor], None]] = {}
        self._flush_queued = False

    def attach(self, steppers: Mapping[torch.Tensor, Callable[[torch.Tensor], None]]) -> list:
        """Install the module hooks; ``steppers[p](p)`` steps ``p`` from ``p.grad``.
        Returns the hook handles."""
        self._steppers = steppers
        handles = []
        for p, modules in self.params.items():
            for module in modules:
                marks: list[int] = []
                handles.append(module.register_forward_pre_hook(self._mark(marks)))
                handles.append(module.register_forward_hook(self._divert(p, marks), always_call=True))
        return handles

    @staticmethod
    def _next_sequence_nr() -> int:
        with torch.enable_grad():
            probe = torch.zeros((), requires_grad=True).view(())
        return probe.grad_fn._sequence_nr()

    def _mark(self, marks: list[int]):
        def hook(module, args):
            marks.append(self._next_sequence_nr() if torch.is_grad_enabled() else -1)

        return hook

    def _divert(self, p: torch.Tensor, marks: list[int]):
        def hook(module, args, output):
            start = marks.pop() if marks else -1
            if start < 0 or not torch.is_grad_enabled():
                return
            roots = [t.grad_fn for t in torch.utils._pytree.tree_flatten(output)[0]
                     if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            for node, index in self._uses(roots, p, start):
                node.register_hook(self._take(p, index, type(node).__name__ in _FRESH_GRAD_NODES))

        return hook

    @staticmethod
    def _uses(roots, p: torch.Tensor, start: int):
        """(node, input index) of every edge into ``p``'s AccumulateGrad among the
        nodes created at or after sequence number ``start``."""
        found, seen, stack = [], set(), list(roots)
        while stack:
            node = stack.pop()
            key = (type(node).__name__, node._sequence_nr())
            if key in seen:
                continue
            seen.add(key)
            if key[1] < start:
                continue
            for i, (nxt, _) in enumerate(node.next_functions):
                if nxt is None:
                    continue
                if type(nxt).__name__ == "AccumulateGrad":
                    if nxt.variable is p:
                        found.append((node, i))
                else:
                    stack.append(nxt)
        return found

    def _take(self, p: torch.Tensor, index: int, fresh: bool):
        def hook(grad_inputs, grad_outputs):
            g = grad_inputs[index]
            if g is None:
                return None
            self._add(p, g, ours=fresh and g.layout is torch.strided and not g._is_view())
            return tuple(None if i == index else x for i, x in enumerate(grad_inputs))

        return hook

    def gather_accumulated(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook of a tied parameter: a use that reached ``.grad``."""
        g = p.grad
        if g is None:
            return
        p.grad = None
        self._add(p, g, ours=g.layout is torch.strided)

    def _add(self, p: torch.Tensor, g: torch.Tensor, *, ours: bool) -> None:
        entry = self._pending.get(p)
        if entry is None:
            self._pending[p] = (g, ours)
            if not self._flush_queued:
                self._flush_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            return
        total, total_ours = entry
        same = g.shape == total.shape and g.dtype == total.dtype and g.layout is total.layout
        if total_ours and same:
            total.add_(g)
        elif ours and same:
            self._pending[p] = (g.add_(total), True)
        else:
            self._pending[p] = (total + g, True)

    def _flush(self) -> None:
        self._flush_queued = False
        while self._pending:
            p, (total, _) = self._pending.popitem()
            # the sum goes to .grad (copied if strided oddly) and is freed by the step
            p.grad = total if total.layout is not torch.strided or total.is_contiguous() else total.contiguous()
            del total
            self._steppers[p](p)


def make_optimizer(model: torch.nn.Module, config: StepConfig, lr: float | None = None, **kw) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``model``'s parameters that require grad.

    ``lr`` and ``kw`` override ``config.optimizer_kwargs``; defaults: lr 1e-3 (AdamW),
    1e-2 with momentum 0.9 (SGD), 1e-4 (Lion). With ``config.optimizer_in_backward``
    the result is an :class:`InBackwardOptimizer` (its hooks are installed by
    :func:`apply`).
    """
    factory = _optimizer_factory(config, lr, kw)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad")
    if config.optimizer_in_backward:
        return InBackwardOptimizer(params, factory, model)
    return factory(params)


def inner_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers that hold state: the per-parameter ones of an
    :class:`InBackwardOptimizer`, else ``[optimizer]``."""
    if isinstance(optimizer, InBackwardOptimizer):
        return optimizer.inner_optimizers()
    return [optimizer]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's state, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for opt in inner_optimizers(optimizer):
        for entry in opt.state.values():
            for v in entry.values():
                if isinstance(v, torch.Tensor):
                    st = v.untyped_storage()
                    if st._cdata not in seen:
                        seen.add(st._cdata)
                        total += st.nbytes()
    return total


# --------------------------------------------------------------------------- saved-tensor counting


@dataclass
class SavedModuleStats:
    """What autograd saved for backward while one module was innermost."""

    bytes: int = 0  # each storage counted once (as autograd keeps it)
    by_kind: Counter = field(default_factory=Counter)  # bytes by "float32", "bool", "int64", ...
    counts: Counter = field(default_factory=Counter)  # saved tensors: "new", "shared", "param", "other"


class SavedCounter:
    """Counts the tensors autograd saves inside it, per innermost module of ``model``,
    by dtype, each storage once; parameters and non-plain tensors count as zero bytes.
    Holds nothing extra: the pack hook returns the tensor itself.

    Enter it around a forward pass; ``stats`` then maps module names to
    :class:`SavedModuleStats`. ``stats_bytes()`` gives ``{name: bytes}``. Tensors in
    ``exclude`` (e.g. the batch: it is alive anyway) count as zero bytes too.
    """

    def __init__(self, model: torch.nn.Module, exclude: Sequence[torch.Tensor] = ()):
        self.model = model
        self.exclude = list(exclude)
        self.stats: dict[str, SavedModuleStats] = {}
        self._stack: list[str] = []
        self._handles: list = []
        self._hooks = None
        self._seen: dict[int, weakref.ref] = {}
        self._params: set[int] = set()

    def __enter__(self) -> "SavedCounter":
        self.stats = {}
        self._stack = []
        self._seen = {}
        self._params = {
            t.untyped_storage()._cdata
            for t in list(self.model.parameters()) + list(self.model.buffers()) + list(self.exclude)
        }
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter(name)))
            self._handles.append(module.register_forward_hook(self._exit(name), always_call=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._seen = {}
        hooks, self._hooks = self._hooks, None
        hooks.__exit__(*exc)

    def _enter(self, name: str):
        def hook(module, args):
            self._stack.append(name)

        return hook

    def _exit(self, name: str):
        def hook(module, args, output):
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            elif name in self._stack:
                del self._stack[self._stack.index(name):]

        return hook

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        name = self._stack[-1] if self._stack else ""
        m = self.stats.get(name)
        if m is None:
            m = self.stats[name] = SavedModuleStats()
        if t.layout is not torch.strided or t.is_nested or t.is_quantized:
            m.counts["other"] += 1
            return t
        st = t.untyped_storage()
        key = st._cdata
        if (t.requires_grad and t.is_leaf) or key in self._params:
            m.counts["param"] += 1
            return t
        seen = self._seen.get(key)
        if seen is not None and seen() is st:
            m.counts["shared"] += 1
            return t
        self._seen[key] = weakref.ref(st)
        m.counts["new"] += 1
        m.bytes += st.nbytes()
        m.by_kind[str(t.dtype).replace("torch.", "")] += st.nbytes()
        return t

    def stats_bytes(self) -> dict[str, int]:
        return {k: v.bytes for k, v in self.stats.items()}


# --------------------------------------------------------------------------- apply / run


class StepContext:
    """What :func:`apply` installed: ``forward()`` is the context to run each forward
    pass in (it enters the activation compressor or the saved-tensor counter);
    ``saved_bytes()`` gives the bytes held for backward per innermost module after
    the latest forward (compressed sizes under a policy); ``recompute_seconds`` sums,
    per checkpointed module, the time its forward took when recomputed in backward."""

    def __init__(self, model, config, compressor, counter, optimizer):
        self.model = model
        self.config = config
        self.compressor = compressor
        self.counter = counter
        self.optimizer = optimizer
        # seconds each checkpointed module spent recomputing its forward inside
        # backward, summed since the last reset (profile() clears it per step)
        self.recompute_seconds: dict[str, float] = {}

    def forward(self):
        if self.compressor is not None:
            return self.compressor
        if self.counter is not None:
            return self.counter
        return contextlib.nullcontext()

    def saved_bytes(self) -> dict[str, int]:
        if self.compressor is not None:
            return {k: v.stored_bytes for k, v in self.compressor.stats.by_module.items()}
        if self.counter is not None:
            return self.counter.stats_bytes()
        return {}


def _check_checkpoint_names(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        if n not in modules:
            import difflib

            close = difflib.get_close_matches(n, list(modules), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"checkpoint: {type(model).__name__} has no module named {n!r}{hint}")
        out[n] = modules[n]
    return out


# -1 outside a backward; private, so looked up once and timing is skipped without it
_in_backward = getattr(torch._C, "_current_graph_task_id", None)


def _wrap_checkpoint(module: torch.nn.Module, name: str, recompute_seconds: dict[str, float]) -> Callable[[], None]:
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    original = module.forward

    def inner(*args, **kwargs):
        # A call made while autograd runs a backward is the recomputation: timed here,
        # where it happens, because what it costs is not what the module's first
        # forward costs (on CPU it reuses memory the backward has just freed).
        if _in_backward is None or _in_backward() == -1:
            return original(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            recompute_seconds[name] = recompute_seconds.get(name, 0.0) + time.perf_counter() - t0

    def forward(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward

    def undo() -> None:
        if had:
            module.forward = old
        else:
            module.__dict__.pop("forward", None)

    return undo


def make_compressor(model: torch.nn.Module, config: StepConfig):
    """``memfit.activations(...)`` for ``config.policy`` (None when there is none)."""
    if config.policy is None:
        return None
    from ..activations import activations

    kw = dict(config.activation_kwargs)
    if isinstance(config.policy, Mapping):
        return activations(model, kw.pop("bits", None), policy=dict(config.policy), **kw)
    return activations(model, config.policy, **kw)


@contextlib.contextmanager
def apply(
    model: torch.nn.Module,
    config: StepConfig,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    count_saved: bool = False,
) -> Iterator[StepContext]:
    """Install ``config`` on ``model`` for the duration of the block: checkpoint
    wrappers on the named modules' forwards, the activation compressor (entered per
    forward through ``ctx.forward()``), and, for optimizer-in-backward, the hooks of
    ``optimizer`` (an :class:`InBackwardOptimizer`). Everything is removed on exit.
    ``count_saved``: without a policy, count saved tensors per module anyway (a
    :class:`SavedCounter`, which changes nothing)."""
    if config.optimizer_in_backward and optimizer is not None and not isinstance(optimizer, InBackwardOptimizer):
        raise TypeError("optimizer_in_backward needs the optimizer from make_optimizer(model, config)")
    targets = _check_checkpoint_names(model, config.checkpoint)
    compressor = make_compressor(model, config)
    counter = SavedCounter(model) if compressor is None and count_saved else None
    undo: list[Callable[[], None]] = []
    ctx = StepContext(model, config, compressor, counter, optimizer)
    try:
        for name, module in targets.items():
            undo.append(_wrap_checkpoint(module, name, ctx.recompute_seconds))
        if isinstance(optimizer, InBackwardOptimizer):
            optimizer.attach()
            undo.append(optimizer.detach)
        yield ctx
    finally:
        for fn in reversed(undo):
            fn()


def run_step(
    model: torch.nn.Module,
    batch: Any,
    config: StepConfig,
    loss_fn: Loss | None,
    optimizer: torch.optim.Optimizer,
    *,
    context: StepContext | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """One training step: ``config.accumulation_steps`` times forward (inside
    ``context.forward()``) and backward, then clipping if configured,
    ``optimizer.step()`` and ``optimizer.zero_grad(set_to_none=True)``. Returns the
    mean loss, detached.

    ``context`` is what :func:`apply` yielded; without it the config is applied for
    this step only. ``on_phase(name)`` is called as each phase starts: ``"forward"``,
    ``"backward"`` (forward done), ``"optimizer"`` (backward done), ``"done"``.
    ``loss_fn`` may be None (``model(**batch).loss``) or already resolved.
    """
    if context is None:
        with apply(model, config, optimizer) as ctx:
            return run_step(model, batch, config, loss_fn, optimizer, context=ctx, on_phase=on_phase)
    fn = loss_fn if getattr(loss_fn, "__wrapped__", None) is not None else resolve_loss_fn(loss_fn)
    phase = on_phase or (lambda name: None)
    k = config.accumulation_steps
    total = None
    for _ in range(k):
        phase("forward")
        with context.forward():
            loss = fn(model, batch)
        phase("backward")
        (loss / k if k > 1 else loss).backward()
        value = loss.detach()
        total = value if total is None else total + value
        del loss
    phase("optimizer")
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phase("done")
    return total / k if k > 1 else total


# --------------------------------------------------------------------------- preserved state

_HOOK_DICT_HINT = "hooks"


@contextlib.contextmanager
def preserved_state(
    model: torch.nn.Module, *, values: bool = True, rng: bool = True, clear_grads: bool = True
) -> Iterator[None]:
    """Put ``model`` back as it was when the block exits (also on errors):

    * which tensors are its parameters and buffers (swapped ones are put back), and,
      with ``values=True``, their values (a copy is kept meanwhile: real steps change
      them; pass ``values=False`` when nothing real runs, as in :func:`estimate`);
    * every parameter's ``.grad`` (the same tensor, unchanged: with ``clear_grads``,
      the default, grads are None inside the block, so steps run there start clean
      and cannot accumulate into the caller's gradients) and ``requires_grad``;
    * the training mode of every submodule;
    * hooks: module forward/backward (pre-)hooks and every other ``*hooks*`` dict of
      each module, parameters' tensor and post-accumulate-grad hooks: any added in the
      block are removed;
    * forwards set on module instances (checkpoint wrappers);
    * the CPU RNG state (dropout in real steps draws from it), with ``rng=True``.
    """
    modules = list(model.named_modules())
    training = [(m, m.training) for _, m in modules]
    tensors = []  # (dict, name, tensor)
    for _, m in modules:
        for d in (m._parameters, m._buffers):
            for n, t in d.items():
                tensors.append((d, n, t))
    params = list({id(p): p for p in model.parameters()}.values())
    grads = [(p, p.grad, p.requires_grad) for p in params]
    hook_keys = []
    for _, m in modules:
        for attr, d in m.__dict__.items():
            if _HOOK_DICT_HINT in attr and isinstance(d, dict):
                hook_keys.append((d, set(d.keys())))
    param_hooks = []
    for p in params:
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            d = getattr(p, attr, None)
            param_hooks.append((p, attr, d, set(d.keys()) if d is not None else None))
    forwards = [(m, "forward" in m.__dict__, m.__dict__.get("forward")) for _, m in modules]
    saved_values = None
    if values:
        with torch.no_grad():
            unique = {id(t): t for _, _, t in tensors if t is not None and not t.is_meta}  # tied weights once
            saved_values = [(t, t.detach().clone()) for t in unique.values()]
    rng_state = torch.get_rng_state() if rng else None
    try:
        if clear_grads:
            for p in params:
                p.grad = None
        yield
    finally:
        for d, n, t in tensors:
            d[n] = t
        for m, mode in training:
            m.training = mode
        for p, g, rg in grads:
            if p.requires_grad != rg:
                p.requires_grad_(rg)
            p.grad = g
        for d, keys in hook_keys:
            for k in [k for k in d if k not in keys]:
                del d[k]
        for p, attr, d_old, keys in param_hooks:
            d_now = getattr(p, attr, None)
            if d_now is None:
                continue
            if keys is None:
                if attr == "_backward_hooks":
                    for k in list(d_now):
                        del d_now[k]
                setattr(p, attr, None)
            else:
                for k in [k for k in d_now if k not in keys]:
                    del d_now[k]
        for m, had, fwd in forwards:
            if had:
                m.forward = fwd
            else:
                m.__dict__.pop("forward", None)
        if saved_values is not None:
            with torch.no_grad():
                for t, v in saved_values:
                    t.copy_(v)
        if rng_state is not None:
            torch.set_rng_state(rng_state)


# --------------------------------------------------------------------------- tracking

PHASES = ("forward", "backward", "optimizer")


def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class PhaseTracker(MemTracker):
        """MemTracker that also remembers the phase of its peak and the largest
        value each category reached."""

        def __init__(self, device: torch.device):
            super().__init__()
            self.device = device
            self.phase = "forward"
            self.peak_phase = "forward"
            self.phase_peaks: dict[str, int] = {}
            self.max_by_kind: Counter = Counter()
            self.marks: dict[str, int] = {}
            self._fast = all(hasattr(self, a) for a in ("_curr_mem_snap", "_peak_mem", "_peak_mem_snap"))

        def _update_peak_stats(self, peak_state) -> None:
            before = self._peak_mem.get(self.device, 0)
            if self._fast:
                # only the global peak: MemTracker's per-module peaks (a loop over every
                # module at each op) are not used here and dominate its overhead
                for dev, dev_snap in self._curr_mem_snap.items():
                    if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                        self._peak_mem[dev] = dev_snap["Total"]
                        self._peak_mem_snap[dev] = dict(dev_snap)
            else:  # pragma: no cover - MemTracker's internals changed
                super()._update_peak_stats(peak_state)
            snap = self._curr_mem_snap.get(self.device)
            if snap is None:
                return
            self._sample(snap)
            if self._peak_mem.get(self.device, 0) > before:
                self.peak_phase = self.phase
            total = snap.get("Total", 0)
            if total > self.phase_peaks.get(self.phase, 0):
                self.phase_peaks[self.phase] = total

        def _sample(self, snap) -> None:
            for k, v in snap.items():
                key = str(getattr(k, "name", k))
                if v > self.max_by_kind[key]:
                    self.max_by_kind[key] = v

        def current(self) -> dict[str, int]:
            snap = self._curr_mem_snap.get(self.device, {})
            return {str(getattr(k, "name", k)): int(v) for k, v in snap.items()}

        def peak(self) -> dict[str, int]:
            snap = self._peak_mem_snap.get(self.device, {})
            return {str(getattr(k, "name", k)): int(v) for k, v in snap.items()}

        def start_window(self) -> None:
            self.phase = "forward"
            self.peak_phase = "forward"
            self.phase_peaks = {}
            self.max_by_kind = Counter()
            self.marks = {}

        def on_phase(self, name: str) -> None:
            snap = self._curr_mem_snap.get(self.device)
            if snap is not None:
                self._sample(snap)
            total = self.current().get("Total", 0)
            self.marks.setdefault(f"start:{name}", total)
            if name == "backward":
                self.marks.setdefault("after_forward_saved", total)
            if name in PHASES:
                self.phase = name
                self.phase_peaks.setdefault(name, total)

    return PhaseTracker


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _storage_bytes(ts) -> int:
    seen, total = set(), 0
    for t in ts:
        st = t.untyped_storage()
        if st._cdata not in seen:
            seen.add(st._cdata)
            total += st.nbytes()
    return total


def tracked_steps(
    model: torch.nn.Module,
    batch: Any,
    config: StepConfig,
    loss_fn: Loss,
    optimizer: torch.optim.Optimizer,
    *,
    steps: int = 2,
    device: torch.device | str = "cpu",
    timer: Callable[[], float] | None = None,
) -> dict:
    """Run ``steps`` training steps under a MemTracker and describe the last one.

    Works the same on real tensors and under ``FakeTensorMode`` (enter the fake mode
    first). The batch's tensors are tracked as inputs. Python's garbage collector is
    paused during each step (and run between steps) so both see the same lifetimes.
    Returns a dict with ``peak``, ``peak_phase``, ``peak_breakdown`` (MemTracker's
    categories at the peak), ``phase_peaks``, ``max_by_kind``, ``start`` (live bytes by
    category when the last step starts), ``activation_bytes`` (live bytes added by the
    last step's first forward), ``saved_by_module``, ``optimizer_bytes``, ``seconds``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    tracker = _tracker_class()(device)
    tracker.track_external(model, optimizer, *_tensors_in(batch))
    seconds = []
    saved: dict[str, int] = {}
    start: dict[str, int] = {}
    was_enabled = gc.isenabled()
    with apply(model, config, optimizer, count_saved=True) as ctx, warnings.catch_warnings():
        if ctx.counter is not None:
            ctx.counter.exclude = _tensors_in(batch)
        # MemTracker's notes about hooks on modules/grads that are gone (checkpointed
        # modules, gradients freed by optimizer-in-backward): expected here
        warnings.filterwarnings("ignore", message="Module is None")
        warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
        try:
            for i in range(steps):
                last = i == steps - 1
                # objects made since the last collection are young (collection is off
                # during steps): a young-generation pass frees the previous step's cycles
                gc.collect(1)
                gc.disable()
                if last:
                    tracker.reset_mod_stats()
                    tracker.start_window()
                t0 = timer() if timer is not None else 0.0

                def on_phase(name: str, last: bool = last) -> None:
                    if name == "forward":
                        # MemTracker refuses a root module's second forward in one window
                        # (it takes it for the next iteration); gradient accumulation runs
                        # several. Its per-module stats are not used here.
                        tracker.reset_mod_stats()
                    if last:
                        tracker.on_phase(name)

                with tracker:
                    if last:
                        start = tracker.current()
                    run_step(model, batch, config, loss_fn, optimizer, context=ctx, on_phase=on_phase)
                if timer is not None:
                    seconds.append(timer() - t0)
                if last:
                    saved = ctx.saved_bytes()
                if was_enabled:
                    gc.enable()
        finally:
            if was_enabled:
                gc.enable()
    peak = tracker.peak()
    after_fwd = tracker.marks.get("after_forward_saved", 0)
    before_fwd = tracker.marks.get("start:forward", 0)
    return {
        "peak": int(peak.get("Total", 0)),
        "peak_phase": tracker.peak_phase,
        "peak_breakdown": peak,
        "phase_peaks": dict(tracker.phase_peaks),
        "max_by_kind": dict(tracker.max_by_kind),
        "start": start,
        "activation_bytes": max(0, after_fwd - before_fwd),
        "saved_by_module": saved,
        "optimizer_bytes": optimizer_state_bytes(optimizer),
        "largest_param_bytes": max((p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
                                   default=0),
        "seconds": seconds,
    }


def main_device(model: torch.nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return torch.device("cpu") if t.device.type == "meta" else t.device
    return torch.device("cpu")
