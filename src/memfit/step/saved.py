"""Counting what autograd saves for backward: :class:`SavedCounter`.

This module owns the per-module count (bytes, by dtype, each storage once) that the
estimator and the profiler report when no compression runs; it changes nothing the
step computes.
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

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

