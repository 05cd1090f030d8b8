"""The planner's frozen-weight lever: which frozen modules to store compressed
(:mod:`memfit.weights`), in which format, and what that saves and costs.

A frozen floating-point parameter (a fine-tune's pretrained base under LoRA adapters)
is memory that every phase of a step holds: compressing it lowers the whole step's
profile by the bytes it saves. This module owns:

* :func:`frozen_groups`: the parameters :func:`memfit.weights` would compress by
  default (frozen, floating point, two or more dimensions), grouped by the module that
  holds them, each shared parameter once;
* :func:`coded_bytes`: what a parameter holds in a format (codes, scales, offsets);
* :func:`levels`: the assignments the planner tries, from no compression to every
  group in the smallest format, each a :class:`WeightLevel` with its bytes saved,
  its time cost and its fidelity cost;
* :func:`shadow_model`: a copy of the model with fake parameters, compressed as a
  level says, that :func:`~memfit.plan.estimate` can run (nothing real allocated);
* :func:`compress_frozen`: applying an assignment to the real model.

The fidelity costs (:data:`FROZEN_FIDELITY`, for the whole frozen base, shared among
the groups by bytes) are on the scale of :class:`~memfit.plan.solver.CostModel`'s
(a block's activations at 8 bits cost 0.002, at 4 bits 0.01). A frozen weight's
rounding error is the same at every step (it is not unbiased noise that averages
out), but the adapters train on top of the rounded base, and the QLoRA paper reports
NF4 bases matching 16-bit LoRA fine-tunes (docs/benchmarks.md has memfit's own MiniLM
measurement). So: int8 (8.25 bits, near-lossless, round to nearest in blocks of 256)
costs the whole base 0.005, below compressing one block's activations at 4 bits;
NF4 (4.13 bits) costs 0.03, about three blocks at 4 bits; int4 (5 bits, evenly spaced
levels: worse than NF4 on roughly normal weights, and larger) costs 0.06, so it is
only chosen when it is the only 4-bit format allowed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

__all__ = ["FROZEN_FIDELITY", "WEIGHT_FORMATS", "FrozenGroup", "WeightLevel", "coded_bytes", "compress_frozen",
           "frozen_groups", "levels", "resolve_weight_formats", "shadow_model"]

# label -> memfit.weights' bits= argument
WEIGHT_FORMATS: dict[str, object] = {"int8": 8, "nf4": "nf4", "int4": 4}
FROZEN_FIDELITY = {"int8": 0.005, "nf4": 0.03, "int4": 0.06}
# Bytes per element of each format's codes (fp32 per-block values included), for
# coded_bytes: int8 blocks of 256 and int4 blocks of 64 with fp32 min and scale; NF4
# blocks of 64 with an 8-bit absmax code each, and an fp32 scale and offset per 256
# absmaxes.
_BLOCKS = {"int8": (8, 256), "int4": (4, 64)}


@dataclass(frozen=True)
class FrozenGroup:
    """The compressible frozen parameters one module holds."""

    module: str  # qualified module name
    params: tuple[str, ...]  # qualified parameter names
    numel: int
    nbytes: int  # bytes as they are (their own dtype)


@dataclass
class WeightLevel:
    """One assignment of formats to frozen groups, with what it saves and costs."""

    formats: dict[str, str] = field(default_factory=dict)  # module -> "int8" | "nf4" | "int4"
    saved_bytes: int = 0
    seconds: float = 0.0  # decoding per step (forward and backward)
    fidelity: float = 0.0

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.formats.items()))

    def describe(self) -> str:
        if not self.formats:
            return "keep"
        counts: dict[str, int] = {}
        for f in self.formats.values():
            counts[f] = counts.get(f, 0) + 1
        return ", ".join(f"{f} x{n}" for f, n in sorted(counts.items()))


def resolve_weight_formats(weight_formats: Sequence[str | int] | str | int | None) -> tuple[str, ...]:
    """The formats the planner may use: None -> int8 and nf4; ``()`` -> none. Accepts
    the labels ``"int8"``, ``"nf4"``, ``"int4"`` and memfit.weights' ``8``, ``4``."""
    if weight_formats is None:
        return ("int8", "nf4")
    if isinstance(weight_formats, (str, int)):
        weight_formats = (weight_formats,)
    out = []
    for f in weight_formats:
        label = {8: "int8", 4: "int4"}.get(f, f) if not isinstance(f, bool) else f
        if isinstance(label, str):
            label = label.lower()
        if label not in WEIGHT_FORMATS:
            raise ValueError(f"weight_formats: unknown format {f!r}; known: 'int8' (or 8), 'nf4', 'int4' (or 4)")
        if label not in out:
            out.append(label)
    return tuple(out)


def frozen_groups(model: nn.Module) -> list[FrozenGroup]:
    """The frozen floating-point parameters with 2+ dimensions, per holding module
    (largest first); empty when the model has none."""
    seen: set[int] = set()
    groups = []
    for mname, module in model.named_modules():
        names, numel, nbytes = [], 0, 0
        for local, p in module._parameters.items():
            if p is None or id(p) in seen or p.requires_grad or not p.is_floating_point() or p.ndim < 2:
                continue
            seen.add(id(p))
            names.append(f"{mname}.{local}" if mname else local)
            numel += p.numel()
            nbytes += p.numel() * p.element_size()
        if names:
            groups.append(FrozenGroup(mname, tuple(names), numel, nbytes))
    return sorted(groups, key=lambda g: -g.nbytes)


def coded_bytes(numel: int, label: str) -> int:
    """Bytes a parameter of ``numel`` elements holds in format ``label``."""
    if label == "nf4":
        blocks = -(-numel // 64)
        return -(-numel // 2) + blocks + 8 * -(-blocks // 256)
    bits, block = _BLOCKS[label]
    return -(-numel * bits // 8) + 8 * -(-numel // block)


def levels(groups: Sequence[FrozenGroup], formats: Sequence[str], decode_seconds_per_byte: Mapping[str, float],
           step_seconds: float, fidelity_weight: float = 1.0) -> list[WeightLevel]:
    """The assignments the planner tries, in order of fidelity cost: none; then for
    each allowed format, from the largest-precision one down, the largest groups
    covering a quarter, half and all of the frozen bytes in that format (groups not
    yet in it keep the previous format). Per-module choices, a few candidates."""
    total = sum(g.nbytes for g in groups)
    out = [WeightLevel()]
    if not groups or not formats or total == 0:
        return out
    order = [f for f in ("int8", "nf4", "int4") if f in formats]
    if "nf4" in order and "int4" in order:
        order.remove("int4")  # NF4 is smaller and closer on weights; int4 only when alone
    current: dict[str, str] = {}
    for fmt in order:
        for share in (0.25, 0.5, 1.0):
            assign, covered = dict(current), 0
            for g in groups:
                if covered >= share * total:
                    break
                assign[g.module] = fmt
                covered += g.nbytes
            if assign != out[-1].formats:
                out.append(_level(assign, groups, total, decode_seconds_per_byte, step_seconds, fidelity_weight))
        current = {g.module: fmt for g in groups}
    return out


def _level(assign, groups, total, decode_seconds_per_byte, step_seconds, fidelity_weight) -> WeightLevel:
    by_name = {g.module: g for g in groups}
    saved, seconds, fidelity = 0, 0.0, 0.0
    for module, fmt in assign.items():
        g = by_name[module]
        saved += g.nbytes - coded_bytes(g.numel, fmt)
        # decoded in forward, and again in backward (nothing is kept for it)
        seconds += 2 * g.nbytes * decode_seconds_per_byte.get(fmt, 0.0)
        fidelity += fidelity_weight * FROZEN_FIDELITY[fmt] * g.nbytes / total
    return WeightLevel(dict(assign), int(saved), seconds / step_seconds if step_seconds > 0 else 0.0, fidelity)


def _by_format(model: nn.Module, formats: Mapping[str, str]) -> dict[str, list[str]]:
    """Format label -> the qualified parameter names to compress in it."""
    by_module = {g.module: g for g in frozen_groups(model)}
    out: dict[str, list[str]] = {}
    for module, fmt in formats.items():
        g = by_module.get(module)
        if g is None:
            raise ValueError(f"the plan compresses the frozen weights of {module!r}, which this model does not have "
                             "(or they are trainable, or already compressed)")
        out.setdefault(fmt, []).extend(g.params)
    return out


def compress_frozen(model: nn.Module, formats: Mapping[str, str]) -> list:
    """Compress ``model``'s frozen weights as ``formats`` (module -> label) says: one
    :func:`memfit.weights` call per format; returns their handles."""
    from ..weights import compress_weights

    handles = []
    try:
        for fmt, params in _by_format(model, formats).items():
            handles.append(compress_weights(model, WEIGHT_FORMATS[fmt], include=params))
    except BaseException:
        for h in reversed(handles):
            h.remove()
        raise
    return handles


def shadow_model(model: nn.Module, formats: Mapping[str, str]) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors, with the
    frozen weights compressed as ``formats`` says (encoded on fake tensors: nothing
    real is computed or allocated). :func:`~memfit.plan.estimate` runs it as it would
    the compressed real model."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..codec.blockwise import is_fake

    fm = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta:
            with fm:
                f = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")
        else:
            f = fm.from_tensor(t.detach())
        memo[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
    shadow = copy.deepcopy(model, memo)
    compress_frozen(shadow, formats)
    # The estimator fakes meta tensors itself (and refuses fakes of another mode).
    for module in shadow.modules():
        for d in (module._parameters, module._buffers):
            for n, t in list(d.items()):
                if t is not None and is_fake(t):
                    m = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")
                    d[n] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    return shadow
