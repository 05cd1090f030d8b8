"""memfit for PyTorch Lightning: fit a memory budget, or compress what you ask.

Usage::

    import lightning as L
    from memfit.integrations.lightning import MemfitCallback

    trainer = L.Trainer(max_steps=1000, callbacks=[MemfitCallback(budget="600MB")])
    trainer.fit(module, dataloader)

How it hooks in
---------------
* ``setup`` (stage ``"fit"``): checks the set-up and, when memfit supplies the optimizer
  (``budget=`` or ``state_bits=``), wraps *this module instance's*
  ``configure_optimizers``: your method still runs (learning rate, betas, weight decay,
  param groups and LR schedulers stay yours), and the optimizer it returns is replaced
  by a :class:`~memfit.integrations.DeferredOptimizer` holding copies of its param
  groups; your schedulers are re-bound to it. With ``state_bits=`` it becomes memfit's
  optimizer of the same family at once (:class:`memfit.optim.AdamW`, ``SGD``,
  ``Lion``); with a budget, once the plan exists. The original method is put back in
  ``teardown``.
* ``on_train_batch_start``: the first one plans (budget only) on that very batch
  (:func:`memfit.plan`; the loss is your ``training_step``'s, run with logging
  silenced and under the precision plugin's autocast, or ``loss_fn(module, batch)``),
  builds the planned optimizer, then every one enters the plan's activation context
  (``plan.apply()``: per-module compression, recomputed blocks) or
  ``memfit.activations(...)``, for the forward: ``training_step`` runs inside it.
* also there, with a budget and automatic optimization, at the first batch of each
  accumulation window: the previous step's gradients are freed (``p.grad = None``).
  Lightning's own ``zero_grad`` runs after ``training_step``, so a model's worth of
  already-applied gradients would otherwise stay alive through the forward, memory the
  plan (made for memfit's loop, which zero-grads after the step, like the HF Trainer)
  does not count.
* ``on_before_backward`` leaves the context (backward decodes what was compressed and
  recomputes checkpointed blocks without it, and frees each encoding as soon as it is
  used), ``on_after_backward`` enters it again (manual optimization may run another
  forward), ``on_train_batch_end`` leaves it, and so does ``on_exception`` on errors.
  Validation and the sanity check run outside it.
* ``measure=True``: ``MemTracker`` brackets each batch (``on_train_batch_start`` to
  ``on_train_batch_end``: forward, backward, optimizer step), from the second optimizer
  step on: the real peak of each batch.

Several processes (``strategy="ddp"``/``"ddp_spawn"``, or ``ModelParallelStrategy``
with ``fully_shard`` (FSDP2) in ``configure_model``): the budget is per rank. Each rank
plans on its own batch and parameters or shards (under DDP within the budget less DDP's
gradient buckets) and the ranks agree on one plan that fits every rank, through the
same code as the HF Trainer callback (:func:`memfit.integrations.distributed.plan_per_rank`);
never with the optimizer inside backward. :attr:`MemfitCallback.ranks` and the summary
give each rank's budget and peaks (measured ones gathered at ``on_train_end``).

What it refuses (``IncompatibleSetup``, at ``setup``)
-----------------------------------------------------
* the DeepSpeed strategy (it owns the optimizer and activation memory), the FSDP1
  strategy (``FSDPStrategy``: flat parameters hide the modules memfit's policy names)
  and XLA; with a budget and several processes, any strategy but DDP and
  ``ModelParallelStrategy``;
* with a budget: manual optimization (``training_step`` runs backward and the optimizer
  itself, so there is no loss to plan with, and clipping or accumulation done by hand
  would be invisible), gradient checkpointing already enabled on a submodule;
* when memfit supplies the optimizer: more than one optimizer, an optimizer memfit has
  no stand-in for (memfit has AdamW, SGD, Lion; ``torch.optim.Adam`` without weight
  decay counts as AdamW), ``amsgrad``, or another family than ``optimizer=``;
* ``plan_kwargs={"optimizer_in_backward": True}`` with ``accumulate_grad_batches > 1``
  or ``gradient_clip_val``. Unforced, the planner is told about both and never picks
  optimizer-in-backward then.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping

import torch

from . import (
    BatchGuard,
    CallbackResults,
    DeferredOptimizer,
    IncompatibleSetup,
    MemfitSettings,
    PeakMeter,
    StepApplier,
    as_float_or_none,
    build_optimizer,
    first_loss,
    optimizer_family,
)
from .distributed import plan_per_rank, world

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError("memfit.integrations.lightning needs lightning: pip install 'memfit[lightning]'") from exc

__all__ = ["IncompatibleSetup", "MemfitCallback"]

_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov")


class MemfitCallback(CallbackResults, pl.Callback):
    """Fit a Lightning run into a memory budget, or compress what you ask.

    Args:
        budget: bytes or a string (``"600MB"``, ``"2GiB"``, ``"40%"`` of the plain
            estimated peak): memfit plans the training step on the first training batch
            (:func:`memfit.plan`), applies it around every training batch and replaces
            your optimizer by the planned one (same hyperparameters and schedulers).
        bits: without a budget, the activation setting for :func:`memfit.activations`
            (8, 4, 2, ``"fp8"``); with a budget, the widths the planner may use.
        policy: without a budget, per-module rules ``{glob: bits}``.
        state_bits: without a budget, 8 or 4: your optimizer becomes memfit's of the
            same family with that state; with a budget, the widths the planner may use.
        head_bits, activation_kwargs: passed to :func:`memfit.activations` (no budget).
        optimizer: ``"adamw"``, ``"sgd"`` or ``"lion"``; None (default): the family of
            the optimizer ``configure_optimizers`` returns.
        loss_fn: ``loss_fn(module, batch) -> loss`` for planning, instead of running
            ``training_step`` (whose output must then hold the loss).
        plan_kwargs: more :func:`memfit.plan` options (``margin``, ``recompute``,
            ``optimizer_in_backward``, ``step_seconds``, ...).
        measure: measure the real peak of each batch from the second optimizer step on
            (``MemTracker``; slower steps): :attr:`measured_peak_bytes`.
        verbose: print the plan and, at the end of training, a summary.
    """

    def __init__(
        self,
        budget: int | str | None = None,
        bits=None,
        policy: Mapping[str, Any] | None = None,
        state_bits=None,
        *,
        head_bits="auto",
        activation_kwargs: Mapping[str, Any] | None = None,
        optimizer: str | None = None,
        loss_fn: Callable | None = None,
        plan_kwargs: Mapping[str, Any] | None = None,
        measure: bool = False,
        verbose: bool = True,
        log: Callable[[str], None] = print,
    ):
        self.settings = MemfitSettings(
            budget, bits, policy, state_bits, head_bits=head_bits, optimizer=optimizer or "adamw",
            plan_kwargs=plan_kwargs, activation_kwargs=activation_kwargs, measure=measure,
        )
        self._optimizer_asked = optimizer is not None
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(module, batch), got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.verbose = verbose
        self._log = log
        self._applier = StepApplier()
        self.meter = PeakMeter() if measure else None
        self._guard: BatchGuard | None = None
        self._deferred: DeferredOptimizer | None = None
        self._hyper: dict = {}
        self._module = None
        self._had_configure = False
        self._original_configure = None
        self._replaced = False
        self._in_batch = False

    # ------------------------------------------------------------------ checks

    @staticmethod
    def _clip(trainer) -> float | None:
        return as_float_or_none(getattr(trainer, "gradient_clip_val", None))

    def _check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        s = self.settings
        strategy = trainer.strategy
        names = [c.__name__ for c in type(strategy).__mro__]
        if any("DeepSpeed" in n for n in names):
            raise IncompatibleSetup(
                f"memfit: the {type(strategy).__name__} strategy: DeepSpeed builds and owns the optimizer, "
                "partitions its state and manages activation memory itself, so memfit can neither supply the "
                "optimizer nor honour a budget. Use memfit without DeepSpeed, or DeepSpeed without memfit."
            )
        if any(n in ("FSDPStrategy", "XLAStrategy", "SingleDeviceXLAStrategy") for n in names):
            raise IncompatibleSetup(
                f"memfit: the {type(strategy).__name__} strategy is not supported by memfit's Lightning callback "
                "(FSDP1 wraps the modules memfit's per-module policy names into flat parameters, and XLA runs no "
                "eager autograd for memfit's hooks). For sharded training use ModelParallelStrategy (FSDP2, "
                "fully_shard in configure_model); memfit.optim also works with FSDP2 in your own loop."
            )
        world_size = int(getattr(trainer, "world_size", 1) or 1)
        if s.plans and world_size > 1 and not any(n in ("DDPStrategy", "ModelParallelStrategy") for n in names):
            raise IncompatibleSetup(
                f"memfit: a budget with {world_size} processes under the {type(strategy).__name__} strategy: a "
                "per-rank budget is planned under DDP (strategy='ddp' or 'ddp_spawn') and FSDP2 "
                "(ModelParallelStrategy) only. Use bits=/state_bits= without a budget otherwise."
            )
        if s.plans and not pl_module.automatic_optimization:
            raise IncompatibleSetup(
                "memfit: a budget with manual optimization (automatic_optimization = False): your training_step "
                "runs backward and the optimizer itself, so memfit cannot plan it (clipping or accumulation done "
                "by hand would be invisible to the plan). Use bits=/state_bits= without a budget, or "
                "memfit.plan(...) in your own loop."
            )
        if s.plans:
            for name, m in pl_module.named_modules():
                if _checkpointing_on(m):
                    raise IncompatibleSetup(
                        f"memfit: gradient checkpointing is already on ({name or type(pl_module).__name__}) together "
                        "with a budget: memfit's plan decides per block whether to keep, compress or recompute "
                        "activations, and tensors inside someone else's checkpoint are invisible to it. Turn it "
                        "off; the plan recomputes blocks itself when the budget needs it."
                    )
            s.check_in_backward(int(trainer.accumulate_grad_batches), self._clip(trainer),
                                "the Trainer (accumulate_grad_batches / gradient_clip_val)")

    # ------------------------------------------------------------------ optimizer

    def _wrap_configure(self, pl_module: "pl.LightningModule") -> None:
        self._module = pl_module
        self._had_configure = "configure_optimizers" in pl_module.__dict__
        self._original_configure = pl_module.__dict__.get("configure_optimizers")
        original = pl_module.configure_optimizers

        def configure_optimizers():
            return self._replace_optimizer(original())

        pl_module.configure_optimizers = configure_optimizers

    def _unwrap_configure(self) -> None:
        m, self._module = self._module, None
        if m is None:
            return
        if self._had_configure:
            m.configure_optimizers = self._original_configure
        else:
            m.__dict__.pop("configure_optimizers", None)

    def _replace_optimizer(self, conf):
        s = self.settings
        found: list[torch.optim.Optimizer] = []
        scheds: list = []

        def walk(x):
            if isinstance(x, torch.optim.Optimizer):
                if not any(x is f for f in found):
                    found.append(x)
            elif hasattr(x, "optimizer") and isinstance(getattr(x, "optimizer", None), torch.optim.Optimizer) \
                    and hasattr(x, "step"):
                scheds.append(x)
            elif isinstance(x, Mapping):
                for v in x.values():
                    walk(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v)

        walk(conf)
        why = "budget=" if s.plans else f"state_bits={s.state_bits}"
        if len(found) != 1:
            raise IncompatibleSetup(
                f"memfit: configure_optimizers returned {len(found)} optimizers; MemfitCallback({why}) replaces "
                "exactly one. Use bits= (activations only) with several optimizers."
            )
        opt = found[0]
        if isinstance(opt, DeferredOptimizer):
            return conf
        family = optimizer_family(opt)
        if family is None:
            raise IncompatibleSetup(
                f"memfit: configure_optimizers returned {type(opt).__name__}; MemfitCallback({why}) supplies "
                "AdamW, SGD or Lion (torch.optim.Adam counts as AdamW without weight decay): return one of those, "
                "or drop budget=/state_bits="
            )
        if self._optimizer_asked and family != s.optimizer:
            raise IncompatibleSetup(
                f"memfit: configure_optimizers returned {type(opt).__name__} ({family}) but "
                f"MemfitCallback(optimizer={s.optimizer!r}); make them agree"
            )
        if any(g.get("amsgrad") for g in opt.param_groups):
            raise IncompatibleSetup("memfit: amsgrad=True has no memfit equivalent; drop it or drop "
                                    f"MemfitCallback({why})")
        s.optimizer = family
        self._hyper = {k: v for k, v in opt.defaults.items() if k in _HYPER_KEYS}
        groups = [dict(g) for g in opt.param_groups]
        for g in groups:
            g["params"] = list(g["params"])
        deferred = DeferredOptimizer(groups, dict(opt.defaults))
        if not s.plans:
            deferred.materialize(lambda gs: build_optimizer(family, s.state_bits, gs, **self._hyper))
        for sch in scheds:
            if sch.optimizer is opt:
                sch.optimizer = deferred
        self._deferred = deferred
        self._replaced = True

        if s.plans and self.plan is not None:  # a later fit() of the same run: the plan exists
            self._materialize()

        def swap(x):
            if x is opt:
                return deferred
            if isinstance(x, Mapping):
                return {k: swap(v) for k, v in x.items()}
            if isinstance(x, list):
                return [swap(v) for v in x]
            if isinstance(x, tuple):
                return tuple(swap(v) for v in x)
            return x

        return swap(conf)

    def _materialize(self) -> None:
        plan, deferred = self.plan, self._deferred
        if deferred is None or deferred.materialized:
            return
        hyper = dict(self._hyper)
        if plan.optimizer_in_backward:
            deferred.materialize(lambda groups: plan.optimizer(**hyper), in_backward=True)
        else:
            deferred.materialize(
                lambda groups: build_optimizer(plan.optimizer_name, plan.state_bits, groups, **hyper)
            )

    # ------------------------------------------------------------------ planning

    def _plan_loss(self, trainer: "pl.Trainer"):
        if self.loss_fn is not None:
            user = self.loss_fn

            def loss_fn(module, batch):
                return first_loss(user(module, batch))
        else:
            def loss_fn(module, batch):
                return first_loss(module.training_step(batch, 0))

        precision = getattr(trainer, "precision_plugin", None)

        def wrapped(module, batch):
            ctx = precision.train_step_context() if precision is not None else contextlib.nullcontext()
            with ctx, _silenced(module):
                return loss_fn(module, batch)

        return wrapped

    def _make_plan(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch) -> None:
        if self.settings.supplies_optimizer and self._deferred is None:
            raise IncompatibleSetup(
                "memfit: the optimizer did not come from configure_optimizers (was it set some other way?), so "
                "memfit could not supply the planned one"
            )
        steps, clip = int(trainer.accumulate_grad_batches), self._clip(trainer)
        if world()[1] > 1:
            plan, self._ranks = plan_per_rank(self.settings, pl_module, batch, self._plan_loss(trainer),
                                              wrapped=trainer.strategy.model, grad_accumulation=steps,
                                              clip_grad_norm=clip)
        else:
            plan = self.settings.make_plan(pl_module, batch, self._plan_loss(trainer), grad_accumulation=steps,
                                           clip_grad_norm=clip)
        self._applier.plan = plan
        self._guard = BatchGuard(batch)
        if self.verbose:
            try:
                from rich.console import Console

                Console(width=110).print(plan.table())
            except Exception:
                self._log(str(plan))
        self._materialize()

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer, pl_module, stage) -> None:
        if stage != "fit":
            return
        self._check(trainer, pl_module)
        if self.settings.supplies_optimizer and self._module is None:
            self._wrap_configure(pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.settings.supplies_optimizer and not self._replaced:
            raise IncompatibleSetup(
                "memfit: the optimizers were not built through configure_optimizers after the callback's setup, "
                "so memfit could not supply its optimizer"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.settings.plans and self.plan is None:
            self._make_plan(trainer, pl_module, batch)
        elif self.settings.compresses and self.plan is None and self._applier.compressor is None:
            self._applier.compressor = self.settings.make_compressor(pl_module)
        if self._guard is not None:
            self._guard.check(batch)
        if self._deferred is not None:
            self._deferred.attach()
            self._deferred.sync()
        if (self.settings.plans and pl_module.automatic_optimization
                and batch_idx % max(1, int(trainer.accumulate_grad_batches)) == 0):
            # Lightning zero-grads after the forward: the previous step's gradients
            # (already applied) would stay alive through this forward, which the plan
            # does not count. Free them now; Lightning's zero_grad then finds none.
            for p in pl_module.parameters():
                p.grad = None
        if self.meter is not None and trainer.global_step >= 1:
            self.meter.start(pl_module, self._deferred if self._deferred is not None else
                             (trainer.optimizers[0] if trainer.optimizers else None), batch)
        self._in_batch = True
        self._applier.enter()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._applier.exit()

    def on_after_backward(self, trainer, pl_module) -> None:
        if self._in_batch:
            self._applier.enter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_batch = False
        self._applier.exit(count=False)
        if self.meter is not None:
            self.meter.stop()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._in_batch = False
        self._applier.exit(exception)
        if self.meter is not None:
            self.meter.abort()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """The activations' rounding stream goes into the checkpoint, so a resumed fit
        is bit-identical to an uninterrupted one."""
        act = self._applier.activation_state()
        if act is not None:
            checkpoint["memfit_activations"] = act

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if "memfit_activations" in checkpoint:
            self._applier.load_activation_state(checkpoint["memfit_activations"])

    def on_train_end(self, trainer, pl_module) -> None:
        if self._ranks is not None:  # every rank ends training: a collective
            self._ranks.gather_measured(self.measured_peak_bytes)
        if self.verbose:
            self._log(self.summary())

    def teardown(self, trainer, pl_module, stage) -> None:
        if self._applier.active:
            self._applier.exit(RuntimeError("teardown"))
        if self.meter is not None:
            self.meter.abort()
        if self._deferred is not None:
            self._deferred.detach()  # optimizer-in-backward hooks: re-installed by the next training batch
        if stage == "fit":
            self._unwrap_configure()


def _checkpointing_on(m: torch.nn.Module) -> bool:
    """Hugging Face gradient/activation checkpointing enabled on ``m``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # is_gradient_checkpointing is deprecated in transformers 5
        for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
            if isinstance(type(m).__dict__.get(attr), property) or hasattr(type(m), attr):
                try:
                    if bool(getattr(m, attr)):
                        return True
                except Exception:
                    pass
    return getattr(m, "gradient_checkpointing", False) is True


@contextlib.contextmanager
def _silenced(module):
    """``self.log``/``self.log_dict`` do nothing while memfit plans (the loss there is
    computed on fake tensors)."""
    had = {k: k in module.__dict__ for k in ("log", "log_dict")}
    old = {k: module.__dict__.get(k) for k in ("log", "log_dict")}
    module.log = lambda *a, **k: None
    module.log_dict = lambda *a, **k: None
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            if had[k]:
                setattr(module, k, old[k])
            else:
                module.__dict__.pop(k, None)
