"""The planner's search driver, :func:`plan`: choose, per module, how to keep activations, and how to run the
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
  for (``grad_accumulation=``, ``clip_grad_norm=``);
* for a model with frozen floating-point weights (a LoRA fine-tune's base), which
  modules store them compressed, and in which format (int8, NF4; :mod:`memfit.weights`):
  a few per-module assignments (:mod:`memfit.plan.frozen`), tried in order of their
  cost, each with the search below on the model compressed that way.

How (one call of :func:`plan`): one plain :func:`~memfit.plan.estimate` (fake
tensors); :func:`~memfit.plan.units.trace_units`, one fake forward that measures each
unit; :mod:`~memfit.plan.probes`, a short real profile for forward times and the
codec's and optimizers' throughput on this machine. These give the units' costs
(:class:`~memfit.plan.solver.CostModel`) and a calibrated
:class:`~memfit.plan.peak_model.PeakModel`. :func:`~memfit.plan.solver.search` picks
the cheapest choices whose modelled peak fits; the
:class:`~memfit.plan.verifier.Verifier` checks the pick with a real ``estimate(...)``
of exactly that configuration; the peak model is corrected from the difference and
the search runs again, until an estimated peak fits. The cost is the predicted
step-time overhead (recomputing costs the unit's forward time; compressing costs its
bytes at the measured codec throughput; compressed optimizer state costs its slower
step) plus a fidelity cost (fewer bits cost more; the first and last layers and the
loss head cost 8x as much, so they stay precise unless the budget needs them; 4-bit
optimizer state costs more than recomputing every block, so it too is used only when
the budget needs it: ``python bench/plan.py --parts statebits`` has the measurement).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Mapping, Sequence

import torch

from .._units import format_bytes
from ..step import Loss, StepConfig, main_device
from ..step.config import autocast_name
from ..activations.offload import available_host_bytes
from . import frozen as F
from . import solver as S
from .budget import parse_budget
from .estimate import estimate
from .peak_model import PeakModel, state_bytes
from .probes import (
    codec_costs,
    codec_seconds_per_byte,
    offload_seconds_per_byte,
    optimizer_seconds_per_param,
    unit_times,
)
from .result import BudgetTooSmall, Plan, UnitChoice, choice_label, dominant_part, fingerprint, policy_for
from .units import MIN_BYTES, UnitSpec, discover_units, param_ownership, trace_units
from .verifier import Verifier

__all__ = ["STATE_FIDELITY", "plan"]

# Fidelity costs of compressed optimizer state (the activation widths' are in
# solver.CostModel). Activation codes are rounded stochastically (unbiased) and their
# error lives for one step; the state is rounded to nearest and carried from step to
# step into every update of every parameter. So the plan leaves the optimizer alone
# unless compressing activations would cost more than ~7 blocks at 8 bits (8-bit
# state) or the budget needs it. 4-bit state is priced above recomputing every block
# (a slower step, same result), because of the early-training measurement in
# docs/benchmarks.md ("Optimizer-state and activation bits, early training"): so
# 4 bits only when the budget needs them.
STATE_FIDELITY = {32: 0.0, 8: 0.05, 4: 1.0}


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



def _config_for(sol: S.Solution, optimizer: str, accumulation: int, clip, activation_kwargs,
                autocast: str | None) -> StepConfig:
    return StepConfig(
        policy=policy_for(sol.choices),
        checkpoint=tuple(n for n, c in sol.choices.items() if c == S.RECOMPUTE),
        optimizer=optimizer,
        state_bits=sol.option.state_bits,
        optimizer_in_backward=sol.option.in_backward,
        accumulation_steps=accumulation,
        max_grad_norm=clip,
        activation_kwargs=dict(activation_kwargs),
        autocast=autocast,
    )



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
    weight_formats: Sequence[str | int] | None = None,
    autocast: Any = None,
    offload: bool = True,
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
        weight_formats: the formats the plan may store frozen floating-point weights in
            (:mod:`memfit.weights`, chosen per module): labels among ``"int8"``,
            ``"nf4"``, ``"int4"``; default ``("int8", "nf4")``; ``()`` never compresses
            them. Only models with frozen floating-point parameters of 2+ dimensions
            (a LoRA fine-tune's base) have this lever; the plan applies it once, on the
            first ``with plan:`` or ``plan.compress_weights()``
            (see :class:`~memfit.plan.Plan`). The costs are in :mod:`memfit.plan.frozen`.
        autocast: the forward runs under ``torch.autocast`` in this dtype: None,
            ``"bf16"`` or ``"fp16"`` (also ``torch.bfloat16``/``torch.float16``;
            :attr:`~memfit.step.StepConfig.autocast`). Every estimate, trace and profile
            of the plan runs so (autocast's casts and cached weight copies counted), and
            the plan carries it: ``with plan:`` enters that autocast around the forward,
            as :func:`~memfit.plan.measure_peak` with ``plan.config`` does.
        offload: whether the plan may hold a unit's activations in pinned host memory
            (``"offload"``, :mod:`memfit.activations.offload`), priced by the
            host<->device bandwidth measured here. Offered on CUDA models only (a CPU
            model's tensors already are in host memory); ``plan.notes`` says which.
            The plan reports the host bytes (``plan.predicted_host_bytes``).

    Returns:
        :class:`Plan`. Raises :class:`BudgetTooSmall` (a ``ValueError``) with the
        smallest reachable peak when nothing fits.
    """
    optimizer, widths, bits, in_bwd_opts = _checked_options(
        model, optimizer, state_bits, bits, optimizer_in_backward, grad_accumulation, clip_grad_norm, max_rounds)
    weight_formats = F.resolve_weight_formats(weight_formats)
    if not isinstance(offload, bool):
        raise TypeError(f"offload must be True or False, got {offload!r}")
    autocast = autocast_name(autocast)
    log = print if verbose else (lambda *a, **k: None)
    t_start = time.perf_counter()
    activation_kwargs = dict(activation_kwargs or {})
    for k in ("bits", "policy", "head_bits"):
        if k in activation_kwargs:
            raise ValueError(f"activation_kwargs cannot set {k!r}: the plan chooses it")
    cache = {} if cache is None else cache
    ckey = (optimizer, id(loss_fn), fingerprint(model), autocast)

    # 1. The plain step, on fake tensors.
    if ("plain",) + ckey not in cache:
        cache[("plain",) + ckey] = estimate(model, batch, optimizer, 32, None, loss_fn, autocast=autocast)
    plain = cache[("plain",) + ckey]
    budget_bytes = parse_budget(budget, plain_peak_bytes=plain.peak_bytes)
    target = budget_bytes * (1 - margin)
    log(f"plain estimate: peak {format_bytes(plain.peak_bytes)} in {plain.peak_phase}")

    # 2. Units and what they save, on fake tensors.
    specs = discover_units(model)
    names = [s.name for s in specs]
    min_bytes = int(activation_kwargs.get("min_bytes", MIN_BYTES))
    if ("trace", min_bytes) + ckey not in cache:
        cache[("trace", min_bytes) + ckey] = trace_units(model, batch, loss_fn, names, min_bytes=min_bytes,
                                                         autocast=autocast)
    trace = cache[("trace", min_bytes) + ckey]
    grads_by_unit, span = param_ownership(model, names, trace.order)

    # 3. Times: a short real profile, and the codec/optimizer probes.
    tkey = ("times", step_seconds, profile_steps) + ckey
    if tkey not in cache:
        cache[tkey] = unit_times(model, batch, loss_fn, names, trace, profile_steps, step_seconds, optimizer,
                                 autocast)
    fwd_seconds, base_seconds, opt32, compressed_seconds = cache[tkey]
    codec = codec_costs(codec_seconds_per_byte(), compressed_seconds, trace)
    opt_speed = optimizer_seconds_per_param(optimizer)
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    step32 = opt32 if opt32 else opt_speed[32] * sum(p.numel() for p in trainable.values())
    cost = S.CostModel(
        step_seconds=base_seconds + step32,
        encode_decode_seconds_per_byte=codec,
        fidelity_weight=fidelity_weight,
        offload_seconds_per_byte=offload_seconds_per_byte(main_device(model)) if offload else None,
    )
    units, role_of = _search_units(specs, trace, grads_by_unit, fwd_seconds, recompute)

    # 4. Optimizer options, and what the frozen-weight lever can offer (one level:
    # nothing, for a model without frozen floating-point weights).
    P = trace.start_bytes or (plain.param_bytes + plain.buffer_bytes + plain.input_bytes)
    G = sum(grads_by_unit.values()) or plain.grad_bytes
    c_opt32 = max(0.0, plain.phase_peaks.get("optimizer", 0) - (P + G + plain.optimizer_bytes))
    options = _optimizer_options(model, optimizer, widths, in_bwd_opts, plain.optimizer_bytes, c_opt32, step32,
                                 opt_speed, fidelity_weight)
    decode = {"int8": codec.get(8, 0.0), "int4": codec.get(4, 0.0), "nf4": codec.get(4, 0.0)}
    weight_levels = F.levels(F.frozen_groups(model), weight_formats, decode, cost.step_seconds, fidelity_weight)

    def config_of(sol: S.Solution) -> StepConfig:
        return _config_for(sol, optimizer, grad_accumulation, clip_grad_norm, activation_kwargs, autocast)

    # 5. Per weight level, in order of its cost: search with the peak model, verify with
    # estimate(), correct the model, again. A level whose own cost already exceeds the
    # best plan found cannot win (activation and optimizer choices cost >= 0).
    found = None  # (level, solution, estimate, held bytes)
    leanest = None
    floor = None  # the leanest estimated peak with no weight compressed, once a level found no plan
    rounds: list = []
    for level in weight_levels:
        if found is not None and level.seconds + level.fidelity > found[1].cost + found[0].seconds + found[0].fidelity:
            break
        if found is None and floor is not None and floor - level.saved_bytes > target:
            continue  # even the leanest choices would not fit with this level's savings
        if level.formats:
            log(f"frozen weights: {level.describe()} (saves {format_bytes(level.saved_bytes)})")
        best, verifier, overrides = _search_level(
            model, batch, loss_fn, level, units, trace, options, cost, target, bits, recompute, P, G, span, c_opt32,
            config_of, max_rounds, budget_bytes, cache, ckey, log)
        rounds += [{**r, "weights": level.describe()} if level.formats else r for r in verifier.rounds]
        if leanest is None or verifier.leanest[1].peak_bytes < leanest.peak_bytes:
            leanest = verifier.leanest[1]
        if best is None:
            floor = verifier.leanest[1].peak_bytes + level.saved_bytes
        if best is not None:
            total = best[0].cost + level.seconds + level.fidelity
            if found is None or total < found[1].cost + found[0].seconds + found[0].fidelity - cost.tie:
                found = (level, best[0], best[1], overrides)
    search = {"rounds": rounds, "seconds": round(time.perf_counter() - t_start, 2),
              "codec_seconds_per_byte": codec, "optimizer_seconds_per_param": opt_speed,
              "plain_step_seconds": cost.step_seconds}
    if found is None:
        raise _too_small(model, batch, loss_fn, leanest, budget_bytes, optimizer, widths,
                         grad_accumulation, ruled_out_in_backward=in_bwd_opts == (False,) and (
                             grad_accumulation > 1 or clip_grad_norm is not None),
                         weights=weight_levels[-1] if len(weight_levels) > 1 else None)
    level, sol, est, overrides = found
    search["offload_seconds_per_byte"] = cost.offload_seconds_per_byte
    p = _make_plan(model, sol, est, plain, units, cost, budget_bytes, optimizer, grad_accumulation,
                   clip_grad_norm, role_of, search, activation_kwargs, overrides, level, autocast)
    p.notes.append(_offload_note(p, cost, offload, main_device(model)))
    return p


def _offload_note(p: Plan, cost: S.CostModel, offered: bool, device: torch.device) -> str:
    """What the plan says about activation offload: whether it was offered, and why not."""
    if not offered:
        return "activation offload not offered (offload=False)"
    if cost.offload_seconds_per_byte is None:
        return (f"activation offload not offered: the model is on {device.type}, not CUDA, so its tensors "
                "already are in host memory")
    bandwidth = 1 / cost.offload_seconds_per_byte if cost.offload_seconds_per_byte else 0.0
    n = sum(1 for u in p.units if u.choice == S.OFFLOAD)
    note = (f"{n} unit(s) offloaded to pinned host memory ({format_bytes(p.predicted_host_bytes)}; "
            f"host<->device copies priced at the {format_bytes(int(bandwidth))}/s measured here)")
    available = available_host_bytes()
    if p.predicted_host_bytes > 0.9 * available:
        note += (f"; that is more than 90% of the {format_bytes(available)} of host memory available now, so "
                 "the step will raise memfit.HostMemoryError: free host memory or plan with offload=False")
    return note


def _search_level(model, batch, loss_fn, level: F.WeightLevel, units, trace, options, cost, target, bits,
                  recompute, P, G, span, c_opt32, config_of, max_rounds, budget_bytes, cache, ckey, log):
    """The search at one frozen-weight level: ``(best verified (solution, estimate) or
    None, the verifier, the held bytes the estimates reported)``. The peak model is the
    plain step's, less the bytes the level saves; estimates run on the model compressed
    as the level says (a copy with fake parameters)."""
    peaks = PeakModel.calibrated(units, trace, options, param_bytes=P - level.saved_bytes, grad_bytes=G,
                                 span_grad_bytes=span, optimizer_temp_bytes=c_opt32)
    if level.formats:
        target_model = F.shadow_model(model, level.formats)
    else:
        target_model = model
    verifier = Verifier(lambda cfg: estimate(target_model, batch, config=cfg, loss_fn=loss_fn), config_of, target,
                        estimates=cache.setdefault(("estimates", level.key) + ckey, {}), log=log)
    for rnd in range(max_rounds):
        sol, lean = S.search(units, options, cost, target, bits, recompute, peaks, peaks.overrides)
        chosen = sol if sol is not None else lean
        if verifier.is_checked(chosen):
            break  # the corrected model picks a configuration already checked
        est, fits = verifier.verify(chosen, f"round {rnd}", leanest=sol is None)
        peaks.correct(chosen.choices, chosen.option, est)
        if fits and abs(est.peak_bytes - chosen.peak) < 0.02 * budget_bytes:
            break  # the model agreed with the estimate: a new search would pick the same
    best = verifier.best(cost.tie)
    # Polish. The peak model agrees with estimate() to about 2% of the budget, and
    # refine() trusts it, so near the floor it rejects cheaper neighbours that would
    # fit (a block at 4 bits instead of 2, say). The rounds the search left check the
    # cheapest such near misses with real estimates; the plan only ever gets cheaper
    # and stays verified.
    if best is not None:
        menus = {u.name: S.options_for(u, bits, recompute, cost.offload_seconds_per_byte is not None)
                 for u in units}
        slack = 0.02 * budget_bytes
        while len(verifier.rounds) < max_rounds:
            move = _near_miss(units, best[0], cost, menus, peaks, target + slack, verifier)
            if move is None:
                break
            est, fits = verifier.verify(move, "polish", leanest=False, polish=True)
            if fits:
                best = (move, est)
                peaks.learn_held(move.choices, est)
    return best, verifier, peaks.overrides


def _checked_options(model, optimizer, state_bits, bits, optimizer_in_backward, grad_accumulation,
                     clip_grad_norm, max_rounds):
    """``plan()``'s arguments checked: ``(optimizer name, state widths, activation
    widths, optimizer-in-backward settings to consider)``."""
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
    widths = _state_widths(state_bits)
    bits = tuple(int(b) for b in bits)
    for b in bits:
        if b not in (8, 4, 2):
            raise ValueError(f"bits must be among 8, 4, 2; got {b!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive int, got {max_rounds!r}")
    if optimizer_in_backward is None:
        in_bwd_opts = (False,) if needs_all_grads else (False, True)
    else:
        in_bwd_opts = (bool(optimizer_in_backward),)
    return optimizer, widths, bits, in_bwd_opts


def _optimizer_options(model, optimizer: str, widths, in_bwd_opts, plain_state_bytes: int, c_opt32: float,
                       step32: float, opt_speed: Mapping[int, float], fidelity_weight: float):
    """One :class:`~memfit.plan.solver.OptimizerOption` per state width and
    in-backward setting: its state bytes, the temporaries of its step (``c_opt32``,
    what the plain fp32 step holds beyond parameters, gradients and state, bounded
    by three times the largest parameter when stepping inside backward), its extra
    seconds per step and its fidelity cost."""
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    largest = max((p.numel() * p.element_size() for p in trainable.values()), default=0)
    options = []
    for w in widths:
        for ib in in_bwd_opts:
            sb = plain_state_bytes if w == 32 else state_bytes(model, optimizer, w)
            extra = step32 * (opt_speed[w] / opt_speed[32] - 1.0)
            if ib:
                extra += 30e-6 * len(trainable)
            temp = min(c_opt32, 3 * largest) if (ib and w == 32) else 0
            options.append(S.OptimizerOption(
                state_bits=w, in_backward=ib, state_bytes=sb, temp_bytes=int(temp),
                seconds=max(0.0, extra), fidelity=STATE_FIDELITY[w] * fidelity_weight,
            ))
    return options


def _too_small(model, batch, loss_fn, lean_est, budget_bytes: int, optimizer: str, widths, grad_accumulation: int,
               *, ruled_out_in_backward: bool, weights: F.WeightLevel | None = None) -> BudgetTooSmall:
    """The error when no verified plan fits: the smallest estimated peak, and what dominates it."""
    bd = lean_est.peak_breakdown
    dom = dominant_part(bd)
    extra = ""
    if ruled_out_in_backward:
        extra = (" (optimizer-in-backward, which would free the gradients, is ruled out by "
                 + ("gradient accumulation" if grad_accumulation > 1 else "gradient clipping") + ")")
    return BudgetTooSmall(
        f"no plan fits {format_bytes(budget_bytes)}: the smallest peak memfit can reach for "
        f"{type(model).__name__} on this batch is {format_bytes(lean_est.peak_bytes)} "
        f"(with every activation recomputed or at the fewest bits, {optimizer} state at "
        f"{min(widths)} bits{', frozen weights ' + weights.describe() if weights else ''}), dominated by {dom}{extra}{_logits_hint(model, batch, loss_fn, lean_est.peak_bytes)}",
        budget_bytes=budget_bytes, min_peak_bytes=lean_est.peak_bytes, dominant=dom, breakdown=bd,
    )


def _state_widths(state_bits: int | Sequence[int] | None) -> tuple[int, ...]:
    """The optimizer state widths a plan may use, validated."""
    if state_bits is None:
        widths = (32, 8, 4)
    elif isinstance(state_bits, int):
        widths = (state_bits,)
    else:
        widths = tuple(state_bits)
    for w in widths:
        StepConfig(state_bits=w)  # validates
    return widths


def _search_units(specs: Sequence[UnitSpec], trace, grads_by_unit: Mapping[str, int],
                  fwd_seconds: Mapping[str, float], recompute: bool) -> tuple[list[S.Unit], dict[str, str]]:
    """The search's units (those that ran), and each unit's role: blocks, units before
    the blocks ("pre"), after them ("post"), the root."""
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
    return [u for u in units if u.name in trace.order], role_of


def _near_miss(units, base: S.Solution, cost: S.CostModel, menus, peaks: PeakModel, ceiling: float,
               verifier: Verifier) -> S.Solution | None:
    """The single-unit move from ``base`` to a cheaper choice that saves the most cost
    with a modelled peak at or under ``ceiling``, among configurations the verifier
    has not checked; None when there is none."""
    def stored(u, c):
        return peaks.overrides.get((u.name, c), u.stored(c))

    best = None
    for u in units:
        c0 = base.choices[u.name]
        for c in menus[u.name]:
            if cost.total(u, c) >= cost.total(u, c0) - 1e-12:
                continue
            trial = dict(base.choices)
            trial[u.name] = c
            peak, phase = peaks(trial, base.option)
            if peak > ceiling:
                continue
            sol = S.as_solution(units, trial, base.option, peak, phase, cost, stored)
            if verifier.is_checked(sol):
                continue
            if best is None or sol.cost < best.cost:
                best = sol
    return best


def _make_plan(model, sol, est, plain, units, cost, budget_bytes, optimizer, accumulation, clip, role_of,
               search, activation_kwargs, overrides, level: F.WeightLevel, autocast: str | None) -> Plan:
    rows = []
    for u in sorted(units, key=lambda u: u.order):
        c = sol.choices[u.name]
        t, f = cost.unit_cost(u, c)
        held = u.act_bytes if c == S.KEEP else overrides.get((u.name, c), u.stored(c))
        rows.append(UnitChoice(name=u.name, role=role_of.get(u.name, u.role), choice=choice_label(c),
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
    if level.formats:
        notes.append(f"frozen weights stored compressed (memfit.weights: {level.describe()}), saving "
                     f"{format_bytes(level.saved_bytes)}: applied once, on the first `with plan:` or "
                     "plan.compress_weights(), and kept after it")
    p = Plan(
        units=rows,
        optimizer_name=optimizer,
        state_bits=o.state_bits,
        optimizer_in_backward=o.in_backward,
        budget_bytes=int(budget_bytes),
        predicted_peak_bytes=int(est.peak_bytes),
        predicted_peak_phase=est.peak_phase,
        predicted_breakdown=dict(est.peak_breakdown),
        predicted_overhead=float(sol.overhead + level.seconds),
        fidelity_cost=float(sol.fidelity + level.fidelity),
        plain_peak_bytes=int(plain.peak_bytes),
        plain_breakdown=dict(plain.peak_breakdown),
        grad_accumulation=accumulation,
        clip_grad_norm=clip,
        notes=notes,
        model_class=type(model).__name__,
        model_fingerprint=fingerprint(model),
        activation_kwargs=dict(activation_kwargs),
        search=search,
        weights=dict(level.formats),
        weight_bytes_saved=int(level.saved_bytes),
        predicted_host_bytes=int(est.host_bytes),
        predicted_reserved_bytes=int(est.reserved_bytes),
        autocast=autocast,
    )
    p.bind(model)
    return p

