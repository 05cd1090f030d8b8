"""Counting what autograd saves for backward: :class:`SavedCounter`.

This module owns the per-module count (bytes, by dtype, each storage once) that the
estimator and the profiler report when no compression runs; it changes nothing the
step computes. What a saved tensor is and which module saved it follow the engine's
own rule (:mod:`memfit.activations.saved`), so counts and compression agree.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..activations.saved import NOT_DENSE, PARAM, ModuleStack, classify, parameter_storages

__all__ = ["SavedCounter", "SavedModuleStats"]


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
        self._modules = ModuleStack()
        self._hooks = None
        self._seen: dict[int, weakref.ref] = {}
        self._params: set[int] = set()

    def __enter__(self) -> "SavedCounter":
        self.stats = {}
        self._seen = {}
        self._params = parameter_storages(
            list(self.model.parameters()) + list(self.model.buffers()) + list(self.exclude)
        )
        self._modules.attach(self.model)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._modules.detach()
        self._seen = {}
        hooks, self._hooks = self._hooks, None
        hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        name = self._modules.current
        m = self.stats.get(name)
        if m is None:
            m = self.stats[name] = SavedModuleStats()
        kind, key = classify(t, self._params)
        if kind == NOT_DENSE:
            m.counts["other"] += 1
            return t
        if kind == PARAM:
            m.counts["param"] += 1
            return t
        st = t.untyped_storage()
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

