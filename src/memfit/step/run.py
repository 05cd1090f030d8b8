"""Installing a :class:`~memfit.step.StepConfig` on a model and running one step.

This module owns :func:`apply` (checkpoint wrappers, the activation compressor, the
optimizer-in-backward hooks, all removed on exit), :class:`StepContext` (what
``apply`` installed), :func:`make_compressor`, :func:`autocast_context` (the
forward's autocast) and :func:`run_step` (forward, backward, clipping,
``optimizer.step()``, ``zero_grad``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..optim.in_backward import InBackwardOptimizer
from .config import AUTOCAST_DTYPES, StepConfig, autocast_name
from .loss import Loss, resolve_loss_fn
from .saved import SavedCounter

__all__ = ["StepContext", "apply", "autocast_context", "main_device", "make_compressor", "run_step"]


def main_device(model: torch.nn.Module) -> torch.device:
    """The device whose memory a tracker reports: that of the model's first parameter
    or buffer (CPU for a meta-device model, which the estimator fakes on CPU)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return torch.device("cpu") if t.device.type == "meta" else t.device
    return torch.device("cpu")


def autocast_context(model: torch.nn.Module, autocast: Any):
    """``torch.autocast`` in the dtype ``autocast`` names (see
    :attr:`StepConfig.autocast`) on the device type of ``model``
    (:func:`main_device`), or a context that does nothing when it is None."""
    name = autocast_name(autocast)
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=main_device(model).type, dtype=AUTOCAST_DTYPES[name])


class StepContext:
    """What :func:`apply` installed: ``forward()`` is the context to run each forward
    pass in (it enters the activation compressor or the saved-tensor counter, and
    ``config.autocast``'s autocast, so ``with plan:`` and the integrations get it too);
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
        hooks = self.compressor if self.compressor is not None else self.counter
        if self.config.autocast is None:
            return hooks if hooks is not None else contextlib.nullcontext()
        return _within(hooks, autocast_context(self.model, self.config.autocast))

    def host_bytes(self) -> int:
        """Bytes the latest forward offloaded to host memory (``"offload"`` policies)."""
        return self.compressor.stats.host_bytes if self.compressor is not None else 0

    def saved_bytes(self) -> dict[str, int]:
        if self.compressor is not None:
            return {k: v.stored_bytes for k, v in self.compressor.stats.by_module.items()}
        if self.counter is not None:
            return self.counter.stats_bytes()
        return {}


@contextlib.contextmanager
def _within(hooks, autocast) -> Iterator[Any]:
    """``hooks`` (the compressor or counter, or None) with ``autocast`` inside it."""
    with hooks if hooks is not None else contextlib.nullcontext() as entered, autocast:
        yield entered


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
    compressor=None,
) -> Iterator[StepContext]:
    """Install ``config`` on ``model`` for the duration of the block: checkpoint
    wrappers on the named modules' forwards, the activation compressor (entered per
    forward through ``ctx.forward()``), and, for optimizer-in-backward, the hooks of
    ``optimizer`` (an :class:`InBackwardOptimizer`). Everything is removed on exit.
    ``count_saved``: without a policy, count saved tensors per module anyway (a
    :class:`SavedCounter`, which changes nothing). ``compressor``: the
    ``memfit.activations`` compressor to use for ``config.policy`` instead of a new one;
    a training loop passes the same one every step, so that its stochastic-rounding
    stream runs on rather than restarting (a new compressor starts from its seed, and
    every step would then draw the same rounding noise)."""
    if config.optimizer_in_backward and optimizer is not None and not isinstance(optimizer, InBackwardOptimizer):
        raise TypeError("optimizer_in_backward needs the optimizer from make_optimizer(model, config)")
    targets = _check_checkpoint_names(model, config.checkpoint)
    if compressor is None:
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
    ``context.forward()``, with ``config.autocast``'s autocast) and backward, then clipping if configured,
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

