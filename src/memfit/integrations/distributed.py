"""Per-rank budgets under DDP and FSDP2: how the ranks of one data-parallel run each
plan their own step and agree on one plan (:func:`plan_per_rank`), and what each rank
predicted and measured (:class:`RankPlanning`).

A budget is what one process may hold. Each rank plans on what it holds: its own
batch, and its own parameters (the whole model under DDP; its shards, plus the
gathered parameters and all-gather buffers of the blocks in flight, under FSDP2,
whose hooks the estimator runs). How the ranks agree:

1. every rank plans (:func:`memfit.plan`) for its own model and batch, within its
   budget less what the planner cannot see (DDP's gradient buckets);
2. the plans are gathered; if they are all the same, that is the plan;
3. otherwise every rank estimates every distinct plan on its own model and batch, the
   estimates are gathered, and the ranks adopt the cheapest plan (predicted slowdown
   plus fidelity cost) whose estimated peak fits *every* rank's budget (ties: the
   lowest rank's). If none does, every rank raises :class:`memfit.BudgetTooSmall`.

Every rank runs the same collectives in the same order, and a rank that fails to plan
makes every rank raise (with that rank's reason), so no rank is left waiting in a
collective. Optimizer-in-backward is never planned with several processes.
"""

from __future__ import annotations

import contextlib
import json
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .._units import format_bytes
from .settings import IncompatibleSetup, MemfitSettings

__all__ = ["RankPlanning", "ddp_bucket_bytes", "fsdp2_state_kept", "is_fsdp2", "plan_per_rank", "world"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_fsdp2(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or a submodule."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def ddp_bucket_bytes(ddp: torch.nn.Module) -> int:
    """The bytes of DDP's gradient buckets (allocated when DDP was built, so neither
    the planner nor a tracker started later sees them). From DDP's own logging data;
    if that is unavailable, the gradients of every trainable parameter."""
    try:
        sizes = ddp._get_ddp_logging_data().get("bucket_sizes", "")
        total = sum(int(s) for s in str(sizes).split(",") if s.strip())
        if total > 0:
            return total
    except Exception:  # a private API: fall back to what the buckets hold
        pass
    return sum(p.numel() * p.element_size() for p in ddp.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- FSDP2


def _fsdp2_objects(model: torch.nn.Module) -> list:
    """FSDP2's Python state objects of ``model``: per FSDP module its state, param group
    and params, and the root's shared contexts (a private API)."""
    from torch.distributed.fsdp import FSDPModule

    objs: list = []
    seen: set[int] = set()
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        state = m._get_fsdp_state()
        for o in (state, getattr(state, "_state_ctx", None), getattr(state, "_comm_ctx", None)):
            if o is not None and id(o) not in seen:
                seen.add(id(o))
                objs.append(o)
        for group in getattr(state, "_fsdp_param_groups", ()) or ():
            for o in (group, *group.fsdp_params):
                if id(o) not in seen:
                    seen.add(id(o))
                    objs.append(o)
    return objs


def _fsdp2_roots(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost FSDP modules in ``model``: ``model`` itself when it was sharded
    last, or the submodules a wrapper holds (a LightningModule whose
    ``configure_model`` shards ``self.model``)."""
    from torch.distributed.fsdp import FSDPModule

    roots: list[torch.nn.Module] = []

    def walk(m: torch.nn.Module) -> None:
        if isinstance(m, FSDPModule):
            roots.append(m)
            return
        for child in m.children():
            walk(child)

    walk(model)
    return roots


@contextlib.contextmanager
def fsdp2_state_kept(model: torch.nn.Module) -> Iterator[None]:
    """Estimate or plan an FSDP2 model in the block and train it afterwards.

    The estimator runs FSDP2's own hooks on fake tensors, and FSDP2 keeps what it
    makes (the gathered parameters, the all-gather buffers) in its state objects, so a
    real step afterwards would meet fake tensors. This runs FSDP2's lazy
    initialization first (what the first real forward does), so the estimate does
    not initialize FSDP2 on fake tensors, and puts every attribute of FSDP2's state
    objects back on exit. The block must not run real steps (they would change state
    that is then put back)."""
    if not is_fsdp2(model):
        yield
        return
    try:
        for root in _fsdp2_roots(model):
            root._get_fsdp_state()._lazy_init()
        objs = _fsdp2_objects(model)
    except AttributeError as exc:
        raise IncompatibleSetup(
            f"memfit: this torch's FSDP2 internals are not the ones memfit knows ({exc}), so planning a sharded "
            "model could leave fake tensors in FSDP2's state. Plan a sharded copy of the model yourself "
            "(docs/distributed.md) and use bits=/state_bits= without a budget."
        ) from exc
    saved = [dict(vars(o)) for o in objs]
    try:
        yield
    finally:
        for o, attrs in zip(objs, saved):
            o.__dict__.clear()
            o.__dict__.update(attrs)


# --------------------------------------------------------------------------- the agreement


@dataclass
class RankPlanning:
    """How the ranks of a data-parallel run planned, and what each one measured.

    ``budget_bytes`` is the per-rank budget (the same argument on every rank;
    a ``"%"`` budget is resolved on each rank's own plain peak, so ``budgets`` lists
    them), ``reserved_bytes`` what each rank kept out of the planner's budget (DDP's
    gradient buckets; 0 under FSDP2), ``predicted_peaks`` each rank's estimate of the
    adopted plan, ``adopted_from`` the rank whose plan it is, ``distinct_plans`` how
    many different plans the ranks made, ``measured_peaks`` each rank's measured peak
    (``measure=True``)."""

    parallel: str  # "ddp" or "fsdp2"
    world_size: int
    rank: int
    budgets: list[int]
    reserved: list[int]
    predicted_peaks: list[int]
    adopted_from: int
    distinct_plans: int
    measured_peaks: list[int] | None = None

    @property
    def budget_bytes(self) -> int:
        """This rank's budget."""
        return self.budgets[self.rank]

    @property
    def reserved_bytes(self) -> int:
        return self.reserved[self.rank]

    def lines(self) -> list[str]:
        kind = {"ddp": "DDP", "fsdp2": "FSDP2"}.get(self.parallel, self.parallel)
        out = [f"memfit: {self.world_size} ranks ({kind}); the ranks made {self.distinct_plans} distinct plan(s) "
               f"and adopted rank {self.adopted_from}'s, which fits every rank's budget"]
        for r in range(self.world_size):
            line = f"memfit:   rank {r}: budget {format_bytes(self.budgets[r])}"
            if self.reserved[r]:
                line += f" ({format_bytes(self.reserved[r])} of it for DDP's gradient buckets)"
            line += f", predicted peak {format_bytes(self.predicted_peaks[r])}"
            if self.measured_peaks is not None:
                p = self.measured_peaks[r]
                verdict = "within" if p <= self.budgets[r] else "OVER"
                line += f", measured {format_bytes(p)} ({verdict}, {100 * p / self.budgets[r]:.0f}%)"
            out.append(line)
        return out

    def gather_measured(self, peak_bytes: int | None) -> None:
        """Collect every rank's measured peak (a collective: every rank calls it)."""
        peaks = _gather(peak_bytes)
        self.measured_peaks = None if any(p is None for p in peaks) else [int(p) for p in peaks]


def _gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _config_key(plan) -> str:
    return json.dumps(plan.config.to_dict(), sort_keys=True, default=str)


def _fail_together(outcome: tuple) -> list:
    """Gather each rank's outcome (``("ok", payload)`` or an error); if any rank failed,
    raise that failure on every rank."""
    import memfit

    outcomes = _gather(outcome)
    for r, o in enumerate(outcomes):
        if o[0] == "too_small":
            _, msg, budget, floor, dominant = o
            raise memfit.BudgetTooSmall(f"memfit: rank {r}: {msg}", budget_bytes=budget, min_peak_bytes=floor,
                                        dominant=dominant)
        if o[0] == "incompatible":
            raise IncompatibleSetup(f"memfit: rank {r}: {o[1]}")
        if o[0] == "error":
            raise RuntimeError(f"memfit: planning failed on rank {r}:\n{o[1]}")
    return [o[1] for o in outcomes]


def _attempt(fn: Callable[[], Any]) -> tuple:
    import memfit

    try:
        return ("ok", fn())
    except memfit.BudgetTooSmall as exc:
        return ("too_small", str(exc), exc.budget_bytes, exc.min_peak_bytes, exc.dominant)
    except IncompatibleSetup as exc:
        return ("incompatible", str(exc))
    except Exception:
        return ("error", traceback.format_exc())


def _step_seconds(model, batch, loss_fn, autocast) -> float:
    """A plain forward+backward's seconds on this rank (real steps, with FSDP2's
    collectives: every rank runs it), for the planner instead of its own profile,
    which would run real steps after fake ones."""
    from memfit.plan import StepConfig, profile

    prof = profile(model, batch, loss_fn=loss_fn, steps=2, config=StepConfig(autocast=autocast))
    return float(prof.forward_seconds + prof.backward_seconds) or float(prof.step_seconds) or 1.0


def plan_per_rank(settings: MemfitSettings, model: torch.nn.Module, batch, loss_fn, *,
                  wrapped: torch.nn.Module | None, grad_accumulation: int, clip_grad_norm: float | None):
    """Plan ``model``'s step on this rank's ``batch`` within this rank's budget, agree
    with the other ranks on one plan (see the module docstring) and return
    ``(plan, RankPlanning)``. ``wrapped`` is the module the framework trains (a DDP
    wrapper, or ``model`` itself under FSDP2). A collective: every rank calls it."""
    import memfit
    import torch.distributed as dist
    from memfit.plan import parse_budget
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, size = world()
    if isinstance(wrapped, DDP):
        parallel, reserve = "ddp", ddp_bucket_bytes(wrapped)
    elif is_fsdp2(model):
        parallel, reserve = "fsdp2", 0
    else:
        parallel, reserve = "other", 0
    kinds = _gather(parallel)
    if any(k != kinds[0] for k in kinds) or kinds[0] == "other":
        raise IncompatibleSetup(
            f"memfit: a budget with {size} processes needs every rank to train under DDP or FSDP2 (fully_shard); "
            f"the ranks run {kinds}. Use bits=/state_bits= without a budget for other set-ups."
        )
    if settings.forced_in_backward():
        raise IncompatibleSetup(
            f"memfit: plan_kwargs asks for optimizer_in_backward=True with {size} processes ({parallel}). Under DDP "
            "each parameter would be stepped from its gradient hook before DDP has averaged the gradient over the "
            "ranks, so the replicas would drift apart; under FSDP2 memfit has not tested it. Drop it."
        )

    extra: dict[str, Any] = {"optimizer_in_backward": False}
    autocast = settings.plan_kwargs.get("autocast")
    if parallel == "fsdp2" and "step_seconds" not in settings.plan_kwargs:
        # real steps, before any fake one: the planner's own profile would run them after
        seconds = _fail_together(_attempt(lambda: _step_seconds(model, batch, loss_fn, autocast)))
        extra["step_seconds"] = max(seconds)

    kept = fsdp2_state_kept(model) if parallel == "fsdp2" else contextlib.nullcontext()
    with kept:
        def resolve_budget() -> int:
            budget = settings.budget
            if isinstance(budget, str) and budget.strip().endswith("%"):
                # of this rank's plain peak, DDP's buckets included
                plain = memfit.estimate(model, batch, settings.optimizer, loss_fn=loss_fn,
                                        autocast=autocast).peak_bytes
                return parse_budget(budget, plain_peak_bytes=plain + reserve)
            return parse_budget(budget)

        budget_bytes = _fail_together(_attempt(resolve_budget))[rank]

        own: list = []

        def make():
            if budget_bytes <= reserve:
                raise memfit.BudgetTooSmall(
                    f"the budget per rank, {format_bytes(budget_bytes)}, does not even hold DDP's gradient buckets "
                    f"({format_bytes(reserve)})", budget_bytes=budget_bytes, min_peak_bytes=reserve,
                    dominant=f"DDP's gradient buckets {format_bytes(reserve)}")
            plan = settings.make_plan(model, batch, loss_fn, grad_accumulation=grad_accumulation,
                                      clip_grad_norm=clip_grad_norm, budget=budget_bytes - reserve, **extra)
            own.append(plan)
            return plan.to_json(), _config_key(plan), plan.predicted_peak_bytes

        gathered = _fail_together(_attempt(make))
        budgets = [int(b) for b in _gather(budget_bytes)]
        reserved = [int(r) for r in _gather(reserve)]

        keys: list[str] = []
        first_rank: list[int] = []
        for r, (_, key, _) in enumerate(gathered):
            if key not in keys:
                keys.append(key)
                first_rank.append(r)
        if len(keys) == 1:
            chosen = 0
            predicted = [int(p) for _, _, p in gathered]
        else:
            candidates = [memfit.Plan.from_json(gathered[r][0]) for r in first_rank]

            def estimates():
                out = []
                for i, cand in enumerate(candidates):
                    if keys[i] == gathered[rank][1]:
                        out.append(int(gathered[rank][2]))
                    else:
                        out.append(int(memfit.estimate(model, batch, loss_fn=loss_fn, config=cand.config).peak_bytes))
                return out

            table = _fail_together(_attempt(estimates))  # table[rank][candidate]
            margin = float(settings.plan_kwargs.get("margin", 0.02))
            limits = [(budgets[r] - reserved[r]) * (1 - margin) for r in range(size)]
            fitting = [i for i in range(len(candidates)) if all(table[r][i] <= limits[r] for r in range(size))]
            if not fitting:
                worst = min(range(len(candidates)), key=lambda i: max(table[r][i] / limits[r] for r in range(size)))
                raise memfit.BudgetTooSmall(
                    f"memfit: each rank's plan fits its own budget, but none of the {len(candidates)} plans fits "
                    f"every rank: estimated peaks per rank and plan {table} against {[int(x) for x in limits]} "
                    "(budget less DDP's buckets and the margin). Give the ranks batches of one shape, or a larger "
                    "budget.",
                    budget_bytes=budgets[rank], min_peak_bytes=max(table[r][worst] for r in range(size)) + reserve,
                    dominant="the rank with the largest share")
            chosen = min(fitting, key=lambda i: (candidates[i].predicted_overhead + candidates[i].fidelity_cost, i))
            predicted = [int(table[r][chosen]) for r in range(size)]

    source = first_rank[chosen]
    if keys[chosen] == gathered[rank][1]:
        plan = own[0]
    else:
        plan = memfit.Plan.from_json(gathered[source][0], model=model)
    dist.barrier()
    record = RankPlanning(parallel=parallel, world_size=size, rank=rank, budgets=budgets, reserved=reserved,
                          predicted_peaks=[p + r for p, r in zip(predicted, reserved)], adopted_from=source,
                          distinct_plans=len(keys))
    return plan, record
