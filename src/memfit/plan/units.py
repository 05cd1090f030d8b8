"""The units a plan decides for, and what each one saves: :func:`discover_units` and
:func:`trace_units`.

A *unit* is a module and everything under it: the blocks of the model's main
``nn.ModuleList``, the modules outside it (embeddings, final norm, output layer) and
the root, where the loss is computed. This module owns finding them, one plain
forward and backward on fake tensors that measures each unit (order, input and
output bytes, saved bytes by kind, live-bytes peaks), and who owns which gradient
(:func:`param_ownership`).
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..activations.policy import main_blocks
from ..activations.saved import FLOAT, MASK, NOT_DENSE, PARAM, ModuleStack, classify, parameter_storages
from ..step import Loss, autocast_context, preserved_state, resolve_loss_fn, tracker_class

__all__ = ["MIN_BYTES", "Trace", "UnitSpec", "discover_units", "param_ownership", "trace_units", "unit_of"]

MIN_BYTES = 32 * 1024  # memfit.activations' default: smaller storages are kept


@dataclass
class UnitSpec:
    """A unit as found in the model, before it is measured."""

    name: str
    role: str
    can_recompute: bool


def discover_units(model: torch.nn.Module) -> list[UnitSpec]:
    """The units a plan decides for: the blocks of the main ``nn.ModuleList``
    (:func:`memfit.activations.policy.main_blocks`), the other children of the blocks'
    ancestors (embeddings, final norm, output layer, ...), and the root. Without a
    ModuleList of two or more modules: the root's children and the root."""
    units = [UnitSpec("", "root", False)]
    found = main_blocks(model)
    modules = dict(model.named_modules())
    if found is None:
        for n, _ in model.named_children():
            units.append(UnitSpec(n, "other", False))
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
            units.append(UnitSpec(full, "other", False))
    prefix = f"{list_name}." if list_name else ""
    for i in range(len(ml)):
        units.append(UnitSpec(f"{prefix}{i}", "block", True))
    return units


def unit_of(module_name: str, unit_names: Sequence[str]) -> str:
    """The innermost unit containing ``module_name`` (``""``, the root, when none does)."""
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
class Trace:
    """What :func:`trace_units` measured."""

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
                min_bytes: int = MIN_BYTES, autocast: Any = None) -> Trace:
    """One plain forward and backward on fake tensors (nothing computed or allocated),
    under MemTracker: each unit's first-call order, input and output bytes, what
    autograd saves in it (compressible floats, bool masks, the rest; each storage
    once, parameters excluded), and the live-bytes peak during its forward and its
    backward. No optimizer: the planner adds the state itself. ``autocast`` (None,
    ``"bf16"``, ``"fp16"``: :attr:`~memfit.step.StepConfig.autocast`) runs the forward
    under ``torch.autocast``, as the step will. Frozen parameters are tracked as
    parameters that never get a gradient."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import _ModState

    from .estimate import fake_model, quiet_fake_kernel_log

    fn = resolve_loss_fn(loss_fn)
    order: dict[str, int] = {}
    in_b: dict[str, int] = {}
    out_b: dict[str, int] = {}
    saved: dict[str, Counter] = {n: Counter() for n in names}
    modules = dict(model.named_modules())
    unit_set = set(names)
    device = torch.device("cpu")

    def entered(name, args, kwargs):
        if name in unit_set and name not in order:
            order[name] = len(order)
            in_b[name] = _storage_nbytes((args, kwargs))

    def exited(name, output):
        if name in unit_set and name not in out_b:
            out_b[name] = _storage_nbytes(output)

    stack = ModuleStack(entered, exited, with_io=True)
    with preserved_state(model, values=False), quiet_fake_kernel_log():
        model.train()
        fm = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_model(model, fm) as faker:
            fbatch = faker.batch(batch)
            params = parameter_storages(list(model.parameters()) + list(model.buffers()))
            seen: dict[int, Any] = {}

            def pack(t):
                kind, key = classify(t, params)
                if kind in (PARAM, NOT_DENSE):
                    return t
                st = t.untyped_storage()
                old = seen.get(key)
                if old is not None and old() is st:
                    return t
                seen[key] = weakref.ref(st)  # never keep a saved tensor alive
                nb = st.nbytes()
                c = saved[unit_of(stack.current, names)]
                c["total"] += nb
                if kind == MASK:
                    c["mask"] += nb
                elif kind == FLOAT and nb >= min_bytes:
                    c["float"] += nb
                else:
                    c["other"] += nb
                return t

            def total(snap) -> int:
                return int(snap.get(device, {}).get("Total", 0))

            try:
                stack.attach(model)
                with fm:
                    from torch.utils._pytree import tree_leaves

                    mt = tracker_class()()
                    mt.track_external(model, *[t for t in tree_leaves(fbatch) if isinstance(t, torch.Tensor)])
                    with mt:
                        start = total(mt.get_tracker_snapshot("current"))
                        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
                                autocast_context(model, autocast):
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
                stack.detach()
                seen.clear()
    order.setdefault("", len(order))
    # The root runs first but its own work (the loss) comes last.
    order[""] = max(order.values()) + 1
    return Trace(order, in_b, out_b, saved, fw_peak, bw_peak, start, fwd_peak,
                  all_peak if all_peak > fwd_peak else 0)



def param_ownership(model: torch.nn.Module, unit_names: Sequence[str], order: Mapping[str, int]):
    """Gradient bytes per unit (a parameter used by several units belongs to the one
    latest in forward order: its gradient appears first in backward) and the bytes of
    parameters shared across units (alive for the whole backward even when the
    optimizer steps inside it)."""
    users: dict[int, set[str]] = {}
    sizes: dict[int, int] = {}
    for mname, m in model.named_modules():
        unit = unit_of(mname, unit_names)
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

