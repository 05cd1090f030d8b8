"""What a saved tensor is, and which module saved it: the one rule for every pack hook.

Three pack hooks look at the tensors autograd saves: the compressing engine, the
estimator's byte counter and the planner's tracer. They must agree on what a tensor
is, or the planner's predictions drift from what the engine does. This module holds
the rule once:

* :func:`classify` says what kind of saved tensor ``t`` is (:data:`PARAM`,
  :data:`NOT_DENSE`, :data:`MASK`, :data:`FLOAT`, :data:`OTHER`) and gives the key of
  its storage;
* :func:`storage_key` identifies a storage;
* :class:`ModuleStack` tracks the innermost running module with forward pre/post hooks.

Why these rules:

* **Storage key: the storage's ``_cdata``** (the address of its ``StorageImpl``), not
  ``data_ptr()``. Both identify a live storage, but ``data_ptr()`` is 0 for every
  FakeTensor and meta storage and for every empty storage, so under ``FakeTensorMode``
  (the estimator) all storages would collide; ``_cdata`` is distinct for each live
  storage on every device. Like any address it can be reused once the storage is
  freed, so a cache keyed on it must also hold a weak reference to the storage object
  (``untyped_storage()`` returns the same Python object while the storage lives) and
  compare it.
* **Parameter-like**: a leaf that requires grad, a view of one (``t._base``; e.g. the
  transposed weight that ``F.linear`` saves), or any tensor on the storage of a
  parameter or buffer of the model (frozen weights, buffers, views that lost their
  ``_base``). Such tensors are alive anyway, so they cost nothing and are never copied.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..codec import is_plain_dense

#: A parameter, a view of one, or a tensor on a parameter's or buffer's storage.
PARAM = "param"
#: Not an ordinary strided tensor (sparse, quantized, nested, a subclass): kept as is.
NOT_DENSE = "not-dense"
#: A dense bool tensor (dropout and comparison masks).
MASK = "mask"
#: A dense float32/float16/bfloat16 tensor: what activation compression encodes.
FLOAT = "float"
#: Any other dense tensor (integer indices, complex, float64, fp8).
OTHER = "other"

KINDS = (PARAM, NOT_DENSE, MASK, FLOAT, OTHER)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def storage_key(storage) -> int:
    """The key of a live storage (see the module docstring for why ``_cdata``)."""
    return storage._cdata


def parameter_storages(tensors: Iterable[torch.Tensor]) -> set[int]:
    """The storage keys of ``tensors`` (a model's parameters and buffers, and anything
    else that is alive anyway), for :func:`classify`."""
    return {storage_key(t.untyped_storage()) for t in tensors if is_plain_dense(t)}


def classify(t: torch.Tensor, param_storages: set[int] | frozenset[int] = frozenset()) -> tuple[str, int | None]:
    """What kind of saved tensor ``t`` is, and its storage key.

    Returns ``(kind, key)``: ``kind`` is one of :data:`KINDS`; ``key`` is
    :func:`storage_key` of ``t``'s storage for dense tensors and None otherwise.
    ``param_storages`` is :func:`parameter_storages` of the model.
    """
    dense = is_plain_dense(t)
    key = storage_key(t.untyped_storage()) if dense else None
    if t.requires_grad and t.is_leaf:
        return PARAM, key
    base = t._base
    if base is not None and base.requires_grad and base.is_leaf:
        return PARAM, key
    if not dense:
        return NOT_DENSE, None
    if key in param_storages or _is_parameter_cast(t) or (base is not None and _is_parameter_cast(base)):
        return PARAM, key
    if t.dtype is torch.bool:
        return MASK, key
    if t.dtype in _FLOATS:
        return FLOAT, key
    return OTHER, key


def _is_parameter_cast(t: torch.Tensor) -> bool:
    """Whether ``t`` is a dtype cast of a leaf that requires grad: the copies of the
    weights autocast makes (and caches for the whole region). They are parameters in
    another dtype, alive while autocast's cache holds them; coding them would put the
    weights' quantization error into every input gradient."""
    fn = t.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    nexts = fn.next_functions
    return len(nexts) == 1 and nexts[0][0] is not None and type(nexts[0][0]).__name__ == "AccumulateGrad"


class ModuleStack:
    """The qualified name of the innermost module of ``model`` that is running.

    :meth:`attach` registers a forward pre-hook and an always-called forward hook on
    every module; :meth:`detach` removes them. :attr:`current` is ``""`` (the root's
    name) outside every module. An exception inside a module skips the inner modules'
    post-hooks; the outer module's post-hook (always called) then unwinds them too.

    ``on_enter(name)`` / ``on_exit(name)``, when given, run after each push and before
    each pop, for callers that track more than the stack (the engine's loss head).
    With ``with_io=True`` they are called as ``on_enter(name, args, kwargs)`` and
    ``on_exit(name, output)`` (the planner's tracer sizes each unit's inputs and
    outputs).
    """

    def __init__(
        self,
        on_enter: Callable[..., None] | None = None,
        on_exit: Callable[..., None] | None = None,
        *,
        with_io: bool = False,
    ):
        self.names: list[str] = []
        self._on_enter = on_enter
        self._on_exit = on_exit
        self._with_io = with_io
        self._handles: list = []

    @property
    def current(self) -> str:
        return self.names[-1] if self.names else ""

    def attach(self, model: torch.nn.Module) -> None:
        self.names = []
        io = self._with_io
        for name, module in model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=io))
            self._handles.append(module.register_forward_hook(self._post_hook(name), with_kwargs=io, always_call=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.names = []

    def _pre_hook(self, name: str):
        if self._with_io:

            def hook_io(module, args, kwargs):
                self.names.append(name)
                if self._on_enter is not None:
                    self._on_enter(name, args, kwargs)

            return hook_io

        def hook(module, args):
            self.names.append(name)
            if self._on_enter is not None:
                self._on_enter(name)

        return hook

    def _post_hook(self, name: str):
        if self._with_io:

            def hook_io(module, args, kwargs, output):
                if self._on_exit is not None:
                    self._on_exit(name, output)
                self._pop(name)

            return hook_io

        def hook(module, args, output):
            if self._on_exit is not None:
                self._on_exit(name)
            self._pop(name)

        return hook

    def _pop(self, name: str) -> None:
        names = self.names
        if names and names[-1] == name:
            names.pop()
        elif name in names:  # an exception unwound inner modules without their hooks
            del names[names.index(name) :]
