"""memfit for the Hugging Face ``Trainer``: fit a memory budget, or compress what you ask.

Usage::

    from memfit.integrations.transformers import MemfitCallback, MemfitTrainer

    trainer = MemfitTrainer(model=model, args=args, train_dataset=ds,
                            callbacks=[MemfitCallback(budget="600MB")])
    trainer.train()

or, with any ``Trainer`` (subclasses from other libraries included)::

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    MemfitCallback(budget="600MB").attach(trainer)

How it hooks in (and why not with callback events alone)
--------------------------------------------------------
``TrainerCallback`` events never see the forward pass: ``on_step_begin`` comes before
the batch is even passed to the model, and no event sits between the loss and
``backward``. Callbacks also never receive the ``Trainer``, and the optimizer they are
shown already exists. So :meth:`MemfitCallback.attach` wraps three methods of that one
``Trainer`` instance (not the class):

* ``trainer.training_step`` (one micro-batch: forward, loss, backward): with a budget,
  its first call plans first, on that very batch (:func:`memfit.plan`, the loss being
  ``trainer.compute_loss``), so the plan sees the real batch shape and device and the
  model as the Trainer prepared it (mixed-precision autocast included); it then builds
  the planned optimizer (below). Every call checks the batch is no larger than the
  planned one.
* ``trainer.compute_loss``, when called from ``training_step``: the forward and the
  loss (including any ``compute_loss_func`` or label smoothing) run inside the plan's
  activation context (``plan.apply()``: per-module compression, recomputed blocks) or
  ``memfit.activations(...)``. The backward that ``training_step`` runs next decodes
  the compressed tensors and recomputes the checkpointed blocks; the context itself is
  left before it, so that backward frees each encoding as soon as it is used.
  Evaluation calls ``compute_loss`` outside ``training_step``: untouched. A
  ``training_step`` override that never calls ``compute_loss`` is refused.
* ``trainer.create_optimizer``: memfit supplies the optimizer. With a budget it is a
  :class:`~memfit.integrations.DeferredOptimizer` holding the Trainer's usual param
  groups (weight decay off for biases and norms) and hyperparameters
  (``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay``): the
  Trainer's LR scheduler binds to it as usual, and once the plan exists the planned
  optimizer (torch's AdamW at 32 bits, :mod:`memfit.optim` at 8/4 bits, or one stepping
  inside backward) is built over the same groups. With ``state_bits=`` and no budget,
  it is :class:`memfit.optim.AdamW` (or SGD/Lion) with those groups, right away.

Several processes (DDP, or a model sharded with FSDP2): the budget is per rank. Each
rank plans its own step (its batch, its parameters or shards; under DDP within the
budget less DDP's gradient buckets) and the ranks agree on one plan that fits every
rank (:mod:`memfit.integrations.distributed`); never with the optimizer inside backward.
:attr:`MemfitCallback.ranks` and the summary give each rank's budget and peaks.

The callback events do the rest: ``on_train_begin`` checks the set-up again (the
Trainer turns gradient checkpointing on at the start of ``train()``) and
``on_step_begin``/``on_step_end`` bracket each optimizer step for ``measure=True``
(``MemTracker``: the real peak of forward, backward, clipping and the optimizer step).

:class:`MemfitTrainer` is ``Trainer`` that attaches the ``MemfitCallback`` found in its
``callbacks`` (or given as ``memfit=``). A ``MemfitCallback`` added to a plain
``Trainer`` without ``attach`` raises ``IncompatibleSetup`` when training starts
instead of doing nothing.

What it refuses (``IncompatibleSetup``, before any step)
--------------------------------------------------------
* DeepSpeed (``args.deepspeed``): it owns the optimizer and partitions its state.
* FSDP through accelerate (``args.fsdp`` / its FSDP plugin). A model sharded with FSDP2
  before the Trainer sees it (``from_pretrained(..., distributed_config=...)``) works.
* an optimizer you passed (``optimizers=(opt, sched)``, ``optimizer_cls_and_kwargs``)
  while memfit is asked to choose one (``budget=`` or ``state_bits=``), and an
  ``args.optim`` of another family than the callback's ``optimizer=``.
* with a budget: gradient checkpointing already on (``args.gradient_checkpointing`` /
  ``activation_checkpointing`` or the model's own): the plan decides which blocks to
  recompute, and nested checkpoints would hide memory from it; ``torch_compile``
  (per-module choices need eager modules).
* ``plan_kwargs={"optimizer_in_backward": True}`` with ``gradient_accumulation_steps > 1``
  or ``max_grad_norm > 0`` (the Trainer clips by default: ``max_grad_norm=1.0``).
  Unforced, the planner is told about accumulation and clipping and never picks
  optimizer-in-backward then.
"""

from __future__ import annotations

import functools
import os
import warnings
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
)
from .distributed import plan_per_rank, world

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "memfit.integrations.transformers needs transformers (and accelerate for Trainer): "
        "pip install 'memfit[hf]'"
    ) from exc

__all__ = ["IncompatibleSetup", "MemfitCallback", "MemfitTrainer"]

# TrainingArguments.optim values, by the optimizer family memfit would supply.
_FAMILY_WORDS = {"adamw": ("adamw", "adam"), "sgd": ("sgd",), "lion": ("lion",)}


def _optim_name(value) -> str:
    return str(getattr(value, "value", value) or "").lower()


class MemfitCallback(CallbackResults, TrainerCallback):
    """Fit a ``Trainer`` run into a memory budget, or compress what you ask.

    Args:
        budget: bytes or a string (``"600MB"``, ``"2GiB"``, ``"40%"`` of the plain
            estimated peak). memfit plans the training step on the first training batch
            (:func:`memfit.plan`: per-module activation compression or recomputation,
            optimizer state bits, optimizer-in-backward), applies it around every
            training step and supplies the planned optimizer.
        bits: without a budget, the activation setting for :func:`memfit.activations`
            (8, 4, 2, ``"fp8"``); with a budget, the widths the planner may use
            (e.g. ``(8, 4)``).
        policy: without a budget, per-module rules ``{glob: bits}`` for
            :func:`memfit.activations`.
        state_bits: without a budget, 8 or 4 (or 32): memfit supplies its
            :class:`memfit.optim.AdamW` (``optimizer=``) with the Trainer's
            hyperparameters; with a budget, the widths the planner may use.
        head_bits, activation_kwargs: passed to :func:`memfit.activations` (no budget).
        optimizer: ``"adamw"`` (default), ``"sgd"`` or ``"lion"``: the optimizer memfit
            supplies; ``args.optim`` must be of the same family.
        plan_kwargs: more :func:`memfit.plan` options (``margin``, ``recompute``,
            ``optimizer_in_backward``, ``step_seconds``, ``fidelity_weight``, ...).
        measure: measure the real peak of each optimizer step after the first with
            ``MemTracker`` (slower steps): :attr:`measured_peak_bytes`.
        verbose: print the plan and, at the end of training, a summary.

    After training: :attr:`plan` (the :class:`memfit.Plan`, with a budget),
    :attr:`stats` (the latest step's :class:`memfit.ActivationStats`),
    :attr:`compressed_steps`, :attr:`measured_peak_bytes`, :meth:`summary`.
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
        optimizer: str = "adamw",
        plan_kwargs: Mapping[str, Any] | None = None,
        measure: bool = False,
        verbose: bool = True,
        log: Callable[[str], None] = print,
    ):
        self.settings = MemfitSettings(
            budget, bits, policy, state_bits, head_bits=head_bits, optimizer=optimizer,
            plan_kwargs=plan_kwargs, activation_kwargs=activation_kwargs, measure=measure,
        )
        self.verbose = verbose
        self._log = log
        self._applier = StepApplier()
        self.meter = PeakMeter() if measure else None
        self._trainer = None
        self._guard: BatchGuard | None = None
        self._deferred: DeferredOptimizer | None = None
        self._in_step = False
        self._loss_calls = 0
        self._compute_loss = None
        self._warned_gc = False

    # ------------------------------------------------------------------ attaching

    def attach(self, trainer: "Trainer") -> "Trainer":
        """Hook this callback into ``trainer`` (see the module docstring): checks the
        set-up, adds the callback, wraps ``trainer.training_step`` and, when memfit
        supplies the optimizer, ``trainer.create_optimizer``. Returns ``trainer``."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"attach() needs a transformers.Trainer, got {type(trainer).__name__}")
        if self._trainer is not None:
            if self._trainer is trainer:
                return trainer
            raise RuntimeError("this MemfitCallback is already attached to another Trainer; make one per Trainer")
        others = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MemfitCallback) and cb is not self]
        if others:
            raise IncompatibleSetup("memfit: this Trainer already has another MemfitCallback; use one")
        self._check_trainer(trainer, attaching=True)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer

        original_step = trainer.training_step
        original_loss = trainer.compute_loss
        self._compute_loss = original_loss

        @functools.wraps(original_step)
        def training_step(model, inputs, *args, **kwargs):
            return self._training_step(original_step, model, inputs, *args, **kwargs)

        @functools.wraps(original_loss)
        def compute_loss(model, inputs, *args, **kwargs):
            if not self._in_step:  # evaluation, or a call from outside training_step
                return original_loss(model, inputs, *args, **kwargs)
            self._loss_calls += 1
            with self._applier.forward():
                return original_loss(model, inputs, *args, **kwargs)

        trainer.training_step = training_step
        trainer.compute_loss = compute_loss

        # A resumed run continues the activations' rounding stream where the checkpoint
        # left it (see on_save): the Trainer hands the checkpoint to _load_rng_state.
        original_rng = getattr(trainer, "_load_rng_state", None)
        if original_rng is not None:

            @functools.wraps(original_rng)
            def load_rng_state(checkpoint, *args, **kwargs):
                out = original_rng(checkpoint, *args, **kwargs)
                path = os.path.join(checkpoint, _activation_state_file()) if checkpoint else None
                if path is not None and os.path.isfile(path):
                    self._applier.load_activation_state(torch.load(path, weights_only=True))
                return out

            trainer._load_rng_state = load_rng_state

        if self.settings.supplies_optimizer:
            original_create = trainer.create_optimizer

            @functools.wraps(original_create)
            def create_optimizer(model=None):
                if trainer.optimizer is None:
                    trainer.optimizer = self._create_optimizer(trainer, model)
                return original_create(model)  # keeps what it does around an existing optimizer

            trainer.create_optimizer = create_optimizer
        return trainer

    # ------------------------------------------------------------------ checks

    def _check_trainer(self, trainer: "Trainer", model: torch.nn.Module | None = None, *,
                       attaching: bool = False) -> None:
        args = trainer.args
        s = self.settings
        if getattr(args, "deepspeed", None) or getattr(trainer, "is_deepspeed_enabled", False):
            raise IncompatibleSetup(
                "memfit: DeepSpeed is enabled (args.deepspeed): DeepSpeed builds and owns the optimizer, partitions "
                "its state and manages activation memory itself, so memfit can neither supply the optimizer nor "
                "honour a budget. Use memfit without DeepSpeed, or DeepSpeed without memfit."
            )
        fsdp = getattr(args, "fsdp", None)
        if fsdp or getattr(trainer, "is_fsdp_enabled", False):
            raise IncompatibleSetup(
                f"memfit: FSDP is enabled (args.fsdp={fsdp!r}): memfit's Trainer integration does not support "
                "accelerate's FSDP plugin (FSDP1 wraps the modules memfit's per-module policy names, and its FSDP2 "
                "path is untested). A model sharded with FSDP2 before the Trainer sees it works, budget included: "
                "from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N)), see docs/distributed.md."
            )
        if s.supplies_optimizer and attaching:
            why = "budget=" if s.plans else f"state_bits={s.state_bits}"
            if trainer.optimizer is not None:
                raise IncompatibleSetup(
                    f"memfit: the Trainer was given an optimizer (optimizers=(opt, ...)) but MemfitCallback({why}) "
                    "supplies its own; drop optimizers= (the Trainer's learning rate, betas, eps and weight decay "
                    "are used), or drop budget=/state_bits= to keep yours"
                )
            if getattr(trainer, "lr_scheduler", None) is not None:
                raise IncompatibleSetup(
                    f"memfit: the Trainer was given an LR scheduler (optimizers=(..., sched)) bound to another "
                    f"optimizer, but MemfitCallback({why}) supplies the optimizer; use args.lr_scheduler_type"
                )
            if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
                raise IncompatibleSetup(
                    f"memfit: the Trainer was given optimizer_cls_and_kwargs, but MemfitCallback({why}) supplies "
                    "its own optimizer; drop one of them"
                )
            optim = _optim_name(getattr(args, "optim", ""))
            default = _optim_name(getattr(type(args), "__dataclass_fields__", {}).get("optim", None) and
                                  type(args).__dataclass_fields__["optim"].default)
            words = _FAMILY_WORDS[s.optimizer]
            if optim and optim != default and not any(w in optim for w in words):
                raise IncompatibleSetup(
                    f"memfit: args.optim={optim!r} asks for another optimizer than the {s.optimizer!r} memfit "
                    f"supplies with {why}; pass MemfitCallback(optimizer='adamw'|'sgd'|'lion') to match, or set "
                    "args.optim accordingly"
                )
            if s.optimizer == "adamw" and "8bit" in optim:
                raise IncompatibleSetup(
                    f"memfit: args.optim={optim!r} (bitsandbytes) and memfit's own optimizer: pick one"
                )
        gc_on = bool(getattr(args, "gradient_checkpointing", False) or getattr(args, "activation_checkpointing", False))
        m = model if model is not None else getattr(trainer, "model", None)
        if m is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # is_gradient_checkpointing is deprecated in transformers 5
                gc_on = gc_on or bool(getattr(m, "is_activation_checkpointing", False)) \
                    or bool(getattr(m, "is_gradient_checkpointing", False))
        if gc_on and s.compresses and not s.plans and not self._warned_gc:
            self._warned_gc = True
            warnings.warn(
                "memfit: gradient checkpointing is on, so what the checkpointed layers save is recomputed, not "
                "kept, and memfit compresses only the tensors saved outside them (embeddings, head, loss)",
                RuntimeWarning,
                stacklevel=3,
            )
        if s.plans:
            if gc_on:
                raise IncompatibleSetup(
                    "memfit: gradient checkpointing is already on (args.gradient_checkpointing / "
                    "activation_checkpointing, or enabled on the model) together with a budget: memfit's plan decides "
                    "per block whether to keep, compress or recompute activations, and tensors inside someone "
                    "else's checkpoint are invisible to it. Turn gradient checkpointing off; the plan recomputes "
                    "blocks itself when the budget needs it."
                )
            if getattr(args, "torch_compile", False):
                raise IncompatibleSetup(
                    "memfit: torch_compile=True with a budget: compiled graphs inline the modules memfit's plan "
                    "chooses for one by one, so the plan could not be applied. Drop torch_compile or the budget."
                )
            clip = as_float_or_none(getattr(args, "max_grad_norm", 0.0))
            s.check_in_backward(int(args.gradient_accumulation_steps), clip, "the Trainer (TrainingArguments)")

    # ------------------------------------------------------------------ optimizer

    def _param_groups(self, trainer: "Trainer", model: torch.nn.Module) -> list[dict]:
        decay = set(trainer.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": trainer.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    def _hyper(self, args) -> dict:
        name = self.settings.optimizer
        if name == "sgd":
            return {"lr": args.learning_rate, "weight_decay": args.weight_decay}
        if name == "lion":
            return {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2),
                    "weight_decay": args.weight_decay}
        return {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
                "weight_decay": args.weight_decay}

    def _create_optimizer(self, trainer: "Trainer", model: torch.nn.Module | None) -> torch.optim.Optimizer:
        model = model if model is not None else trainer.model
        groups = self._param_groups(trainer, model)
        hyper = self._hyper(trainer.args)
        if self.settings.plans:
            self._deferred = DeferredOptimizer(groups, dict(hyper))
            return self._deferred
        opt = build_optimizer(self.settings.optimizer, self.settings.state_bits, groups, **hyper)
        self._supplied = opt
        return opt

    def _materialize(self, trainer: "Trainer") -> None:
        plan = self.plan
        deferred = self._deferred
        if deferred is None or deferred.materialized:
            return
        hyper = self._hyper(trainer.args)
        if plan.optimizer_in_backward:
            deferred.materialize(lambda groups: plan.optimizer(**hyper), in_backward=True)
        else:
            deferred.materialize(
                lambda groups: build_optimizer(plan.optimizer_name, plan.state_bits, groups, **hyper)
            )

    # ------------------------------------------------------------------ the step

    def _loss_fn(self, trainer: "Trainer") -> Callable:
        compute_loss = self._compute_loss or trainer.compute_loss

        def loss_fn(model, batch):
            return compute_loss(model, batch)

        return loss_fn

    def _make_plan(self, trainer: "Trainer", inputs, wrapped: torch.nn.Module | None = None) -> None:
        args = trainer.args
        model = trainer.model
        self._check_trainer(trainer, model)
        prepare = getattr(trainer, "_prepare_inputs", None)
        batch = prepare(inputs) if callable(prepare) else inputs
        if not isinstance(batch, Mapping):
            raise IncompatibleSetup(
                f"memfit: the Trainer's batches are {type(batch).__name__}, not dicts of model inputs"
            )
        steps = int(args.gradient_accumulation_steps)
        clip = as_float_or_none(args.max_grad_norm)
        if world()[1] > 1:
            plan, self._ranks = plan_per_rank(self.settings, model, dict(batch), self._loss_fn(trainer),
                                              wrapped=wrapped, grad_accumulation=steps, clip_grad_norm=clip)
        else:
            plan = self.settings.make_plan(model, dict(batch), self._loss_fn(trainer), grad_accumulation=steps,
                                           clip_grad_norm=clip)
        self._applier.plan = plan
        self._guard = BatchGuard(batch)
        if self.verbose:
            self._print_plan(plan)
        self._materialize(trainer)

    def _print_plan(self, plan) -> None:
        try:
            from rich.console import Console

            Console(width=110).print(plan.table())
        except Exception:  # rich missing, or a non-terminal logger
            self._log(str(plan))

    def _training_step(self, original, model, inputs, *args, **kwargs):
        trainer = self._trainer
        if self._in_step:  # a subclass calling training_step recursively
            return original(model, inputs, *args, **kwargs)
        if self.settings.plans and self.plan is None:
            self._make_plan(trainer, inputs, model)
        elif self.settings.compresses and self.plan is None and self._applier.compressor is None:
            self._applier.compressor = self.settings.make_compressor(trainer.model)
        if self._guard is not None:
            self._guard.check(inputs)
        if self._deferred is not None:
            self._deferred.attach()
            self._deferred.sync()
        if self.meter is not None:
            self.meter.track(inputs)
        self._in_step = True
        calls = self._loss_calls
        try:
            out = original(model, inputs, *args, **kwargs)
        finally:
            self._in_step = False
        if self._loss_calls == calls:
            raise IncompatibleSetup(
                "memfit: this Trainer's training_step did not call compute_loss, where memfit applies its "
                "activation choices (the forward of each training step); override compute_loss instead of "
                "training_step, or call self.compute_loss(model, inputs) from your training_step"
            )
        return out

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._trainer is None:
            raise IncompatibleSetup(
                "memfit: MemfitCallback was added to a Trainer without being attached, so it could not reach the "
                "training step or the optimizer. Use MemfitTrainer(..., callbacks=[MemfitCallback(...)]) or call "
                "MemfitCallback(...).attach(trainer) before trainer.train()."
            )
        self._check_trainer(self._trainer, self._trainer.model)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # The first step plans (and creates the optimizer state): measure from the second.
        if self.meter is not None and state.global_step >= 1:
            self.meter.start(self._trainer.model, self._trainer.optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        if self.meter is not None:
            self.meter.stop()

    def on_save(self, args, state, control, **kwargs):
        """Save the activations' rounding stream beside the Trainer's checkpoint, so a
        resumed run is bit-identical to an uninterrupted one."""
        act = self._applier.activation_state()
        if act is None:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(act, os.path.join(folder, _activation_state_file()))

    def on_train_end(self, args, state, control, **kwargs):
        if self.meter is not None:
            self.meter.abort()
            if self._ranks is not None:  # every rank ends training: a collective
                self._ranks.gather_measured(self.measured_peak_bytes)
        if self._deferred is not None:
            self._deferred.detach()  # optimizer-in-backward hooks: re-installed by the next training step
        if self.verbose:
            self._log(self.summary())


def _activation_state_file() -> str:
    """The checkpoint file holding this process's activation-compressor state (one per
    rank: each rank draws its own rounding noise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"memfit_activations_rank{dist.get_rank()}.pt"
    return "memfit_activations.pt"


class MemfitTrainer(Trainer):
    """``transformers.Trainer`` that attaches a :class:`MemfitCallback`: the one in
    ``callbacks=``, or ``memfit=`` (added for you). Everything else is ``Trainer``."""

    def __init__(self, *args, memfit: MemfitCallback | None = None, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        found = [cb for cb in callbacks if isinstance(cb, MemfitCallback)]
        if memfit is not None:
            if not isinstance(memfit, MemfitCallback):
                raise TypeError(f"memfit= must be a MemfitCallback, got {type(memfit).__name__}")
            if found and found != [memfit]:
                raise IncompatibleSetup("memfit: two MemfitCallbacks (memfit= and one in callbacks=); use one")
            if not found:
                callbacks.append(memfit)
            found = [memfit]
        if len(found) != 1:
            raise IncompatibleSetup(
                "MemfitTrainer needs exactly one MemfitCallback (in callbacks= or as memfit=), got "
                f"{len(found)}"
            )
        super().__init__(*args, callbacks=callbacks or None, **kwargs)
        self.memfit = found[0]
        self.memfit.attach(self)
