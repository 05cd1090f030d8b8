"""``compress_weights(model, bits)``: choose the frozen parameters, store them
compressed, bind their modules; :class:`CompressedWeights` is the handle it returns
(stats, decoded export, ``remove()``)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .._units import format_bytes
from ..codec import is_plain_dense
from .bind import bind
from .state import install_state_hooks
from .store import CodedWeight, WeightFormat, format_name, resolve_format

# Set on a bound module (instance attribute), so a second call cannot bind it twice.
_MARK = "_memfit_weights"


@dataclass(frozen=True)
class ModuleWeights:
    """What one module holds compressed: its parameters (local names), their bytes as
    they were and every byte held now (codes, scales, offsets)."""

    module: str
    params: tuple[str, ...]
    format: str
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 0.0


class CompressedWeights:
    """The handle :func:`compress_weights` returns.

    * ``stats``: module name -> :class:`ModuleWeights` (a parameter shared by several
      modules is counted once, at the module that holds its codes);
      ``bytes_before`` / ``bytes_after`` / ``ratio``: the totals; ``table()`` prints them.
    * ``skipped``: parameter name -> why it was left as it is (trainable, not floating
      point, 1-D), when no ``include`` was given.
    * ``decoded(name)``: the decoded value of a compressed parameter (qualified name).
    * ``export_state_dict()``: the model's state dict with every compressed parameter
      decoded: a plain checkpoint.
    * ``remove()``: puts plain frozen parameters back (holding the decoded values: the
      originals are gone) and removes every hook; the model is as before the call.
    """

    def __init__(self, model: nn.Module, fmt: WeightFormat):
        self.model = model
        self.format = fmt
        self.stats: dict[str, ModuleWeights] = {}
        self.skipped: dict[str, str] = {}
        self._stores: dict[str, CodedWeight] = {}  # qualified parameter name -> store
        self._holders: list[tuple[nn.Module, str, CodedWeight]] = []  # every (module, local name) using a store
        self._undo: list[Callable[[], None]] = []
        self._key_orders: dict[int, list[str]] = {}
        self.removed = False

    @property
    def bytes_before(self) -> int:
        return sum(s.bytes_before for s in self.stats.values())

    @property
    def bytes_after(self) -> int:
        return sum(s.bytes_after for s in self.stats.values())

    @property
    def ratio(self) -> float:
        """Bytes held now over the parameters' bytes before (their own dtype)."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 0.0

    @property
    def numel(self) -> int:
        """Elements of the compressed parameters (each shared one once)."""
        return sum(store.shape.numel() for store in self._stores.values())

    @property
    def names(self) -> list[str]:
        """Qualified names of the compressed parameters (tied ones under their first name)."""
        return list(self._stores)

    def refresh_stats(self) -> None:
        """Recompute ``stats`` from the codes held now (after a ``load_state_dict``)."""
        per_module: dict[str, list[CodedWeight]] = {}
        owner_names = {id(m): n for n, m in self.model.named_modules()}
        for store in self._stores.values():
            per_module.setdefault(owner_names.get(id(store.owner), "?"), []).append(store)
        self.stats = {
            name: ModuleWeights(name, tuple(s.name for s in stores), format_name(self.format),
                                sum(s.bytes_before for s in stores), sum(s.nbytes for s in stores))
            for name, stores in per_module.items()
        }

    def table(self) -> str:
        """One line per module and a total: bytes before, after, and their ratio."""
        rows = [(name, s.format, format_bytes(s.bytes_before), format_bytes(s.bytes_after), f"{s.ratio:.3f}")
                for name, s in self.stats.items()]
        rows.append(("total", format_name(self.format), format_bytes(self.bytes_before),
                     format_bytes(self.bytes_after), f"{self.ratio:.3f}"))
        head = ("module", "format", "before", "after", "ratio")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def line(r: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

        return "\n".join([line(head)] + [line(r) for r in rows])

    def decoded(self, name: str) -> torch.Tensor:
        """The decoded value of the compressed parameter ``name`` (qualified)."""
        self._check_live()
        try:
            return self._stores[name].decode()
        except KeyError:
            raise KeyError(f"{name!r} is not a compressed parameter; compressed: {self.names}") from None

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the compressed parameters decoded (their original
        dtype, shape and key): loads into the uncompressed model."""
        self._check_live()
        return dict(self.model.state_dict())

    def remove(self) -> None:
        """Restore plain frozen parameters (decoded values) and remove every hook."""
        if self.removed:
            return
        params: dict[int, nn.Parameter] = {}
        for module, local, store in self._holders:
            p = params.get(id(store))
            if p is None:
                p = params[id(store)] = nn.Parameter(store.decode(), requires_grad=False)
            module._parameters[local] = p
        for undo in reversed(self._undo):
            undo()
        for store in self._stores.values():
            store.version += 1  # a backward still pending must not use the dropped codes
            store.drop()
        for module, _, _ in self._holders:
            order = self._key_orders.get(id(module))
            if order is not None:
                module._parameters = {k: module._parameters[k] for k in order if k in module._parameters} | {
                    k: v for k, v in module._parameters.items() if k not in order}
            module.__dict__.pop(_MARK, None)
        self.removed = True

    def _check_live(self) -> None:
        if self.removed:
            raise RuntimeError("these compressed weights were removed (CompressedWeights.remove())")

    def __repr__(self) -> str:
        state = "removed" if self.removed else f"{len(self._stores)} parameters in {len(self.stats)} modules"
        return (f"CompressedWeights({format_name(self.format)}, {state}, "
                f"{format_bytes(self.bytes_before)} -> {format_bytes(self.bytes_after)})")


def _patterns(arg: str | Sequence[str] | None, what: str) -> list[str] | None:
    if arg is None:
        return None
    if isinstance(arg, str):
        return [arg]
    if isinstance(arg, Iterable) and all(isinstance(p, str) for p in arg):
        return list(arg)
    raise TypeError(f"{what} must be a glob string or a list of them, got {arg!r}")


def _select(model: nn.Module, include: list[str] | None, exclude: list[str] | None,
            skipped: dict[str, str]) -> list[str]:
    """Qualified names of the parameters to compress; raises for a bad explicit choice."""
    named = dict(model.named_parameters())
    chosen: list[str] = []
    if include is None:
        for name, p in named.items():
            if p.requires_grad:
                skipped[name] = "trainable"
            elif not p.is_floating_point():
                skipped[name] = f"not floating point ({p.dtype})"
            elif p.ndim < 2:
                skipped[name] = "1-D (biases and norm scales stay exact unless named in include=)"
            else:
                chosen.append(name)
    else:
        for pattern in include:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in named):
                raise ValueError(f"include={pattern!r} matches no parameter of the model")
        chosen = [n for n in named if any(fnmatch.fnmatchcase(n, pat) for pat in include)]
        for name in chosen:
            p = named[name]
            if p.requires_grad:
                raise ValueError(f"parameter {name!r} requires grad: memfit.weights compresses frozen "
                                 "parameters only (set requires_grad=False or leave it out of include=)")
            if not p.is_floating_point():
                raise ValueError(f"parameter {name!r} is {p.dtype}: only floating-point parameters can be compressed")
    if exclude:
        chosen = [n for n in chosen if not any(fnmatch.fnmatchcase(n, pat) for pat in exclude)]
    for name in chosen:
        p = named[name]
        if not is_plain_dense(p):
            raise ValueError(f"parameter {name!r} is a {type(p).__name__} ({p.layout}); memfit.weights compresses "
                             "plain dense tensors only")
    return chosen


def compress_weights(
    model: nn.Module,
    bits: int | str | WeightFormat = "nf4",
    *,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> CompressedWeights:
    """Store the frozen floating-point parameters of ``model`` compressed and decode
    them on the fly when their module runs. Returns a :class:`CompressedWeights`.

    Args:
        model: any ``nn.Module``; apply after ``peft.get_peft_model`` (peft reads the
            base layers' weights while it wraps them).
        bits: ``"nf4"`` (QLoRA's NormalFloat, block 64, double-quantized absmaxes:
            about 4.13 bits per parameter), ``4`` (integer codes, block 64, per-block
            min and scale: 5 bits), ``8`` (integer codes, block 256: 8.25 bits), or a
            :class:`memfit.codec.IntFormat` / :class:`memfit.codec.formats.NF4Format`.
        include: glob(s) on qualified parameter names (``"*.q_proj.weight"``,
            ``"encoder.*"``). Default: every frozen (``requires_grad=False``)
            floating-point parameter with 2 or more dimensions (matrices, embeddings,
            kernels; biases and norm scales are tiny and stay exact). Every matched
            parameter must be frozen and floating point, else ``ValueError``.
        exclude: glob(s) on qualified parameter names left out of the selection.

    Trainable parameters are never touched. Nothing else changes: the model keeps its
    modules, hooks and state-dict keys (see :mod:`memfit.weights.state`); backward
    through an ``nn.Linear`` keeps no decoded weight (see :mod:`memfit.weights.bind`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fmt = resolve_format(bits)
    handle = CompressedWeights(model, fmt)
    chosen = _select(model, _patterns(include, "include"), _patterns(exclude, "exclude"), handle.skipped)
    if not chosen:
        raise ValueError("no frozen floating-point parameter to compress (trainable parameters are left as they "
                         f"are; skipped: {handle.skipped})")

    # Every module holding each chosen parameter (tied parameters have several).
    named = dict(model.named_parameters())
    by_id = {id(named[n]): n for n in chosen}
    holders: dict[str, list[tuple[str, nn.Module, str]]] = {n: [] for n in chosen}
    for mname, module in model.named_modules():
        for local, p in module._parameters.items():
            if p is not None and id(p) in by_id:
                if _MARK in module.__dict__:
                    raise ValueError(f"module {mname!r} already has compressed weights; call remove() on "
                                     "their handle first")
                renorm = getattr(module, "max_norm", None)
                if renorm is not None and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                    # max_norm renormalises the weight in place: on a decoded copy it would be lost
                    raise ValueError(f"module {mname!r} is an embedding with max_norm={renorm}, which "
                                     "rewrites its weight in place; leave it out (exclude=) or set max_norm=None")
                holders[by_id[id(p)]].append((mname, module, local))
    del named

    per_module: dict[int, dict[str, CodedWeight]] = {}
    modules: dict[int, nn.Module] = {}
    try:
        for name in chosen:
            (_, owner, local), *_ = holders[name]
            value = owner._parameters[local]
            store = CodedWeight(owner, local, value.detach(), fmt)
            handle._stores[name] = store
            for _, module, mlocal in holders[name]:
                handle._key_orders.setdefault(id(module), _own_keys(module))
                del module._parameters[mlocal]
                handle._holders.append((module, mlocal, store))
                per_module.setdefault(id(module), {})[mlocal] = store
                modules[id(module)] = module
            del value
        for key, coded in per_module.items():
            module = modules[key]
            handle._undo.append(bind(module, coded))
            handle._undo.append(install_state_hooks(module, coded, handle._key_orders[key]))
            module.__dict__[_MARK] = True
    except BaseException:
        handle.remove()
        raise
    handle.refresh_stats()
    return handle


def _own_keys(module: nn.Module) -> list[str]:
    """The local names of a module's own state-dict entries, in state-dict order."""
    return [k for k, v in module._parameters.items() if v is not None] + [
        k for k, v in module._buffers.items() if v is not None and k not in module._non_persistent_buffers_set]
