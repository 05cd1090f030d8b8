"""Putting a model back as it was: :func:`preserved_state`.

This module owns the snapshot and restore of everything a measured or estimated step
may change on a model (parameters, buffers, grads, modes, hooks, forwards, RNG), so
that estimating, profiling and planning leave the caller's model untouched.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["preserved_state"]

_HOOK_DICT_HINT = "hooks"


@contextlib.contextmanager
def preserved_state(
    model: torch.nn.Module, *, values: bool = True, rng: bool = True, clear_grads: bool = True
) -> Iterator[None]:
    """Put ``model`` back as it was when the block exits (also on errors):

    * which tensors are its parameters and buffers (swapped ones are put back), and,
      with ``values=True``, their values (a copy is kept meanwhile: real steps change
      them; pass ``values=False`` when nothing real runs, as in :func:`estimate`);
    * every parameter's ``.grad`` (the same tensor, unchanged: with ``clear_grads``,
      the default, grads are None inside the block, so steps run there start clean
      and cannot accumulate into the caller's gradients) and ``requires_grad``;
    * the training mode of every submodule;
    * hooks: module forward/backward (pre-)hooks and every other ``*hooks*`` dict of
      each module, parameters' tensor and post-accumulate-grad hooks: any added in the
      block are removed;
    * forwards set on module instances (checkpoint wrappers);
    * the CPU RNG state (dropout in real steps draws from it), with ``rng=True``.
    """
    modules = list(model.named_modules())
    training = [(m, m.training) for _, m in modules]
    tensors = []  # (dict, name, tensor)
    for _, m in modules:
        for d in (m._parameters, m._buffers):
            for n, t in d.items():
                tensors.append((d, n, t))
    params = list({id(p): p for p in model.parameters()}.values())
    grads = [(p, p.grad, p.requires_grad) for p in params]
    hook_keys = []
    for _, m in modules:
        for attr, d in m.__dict__.items():
            if _HOOK_DICT_HINT in attr and isinstance(d, dict):
                hook_keys.append((d, set(d.keys())))
    param_hooks = []
    for p in params:
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            d = getattr(p, attr, None)
            param_hooks.append((p, attr, d, set(d.keys()) if d is not None else None))
    forwards = [(m, "forward" in m.__dict__, m.__dict__.get("forward")) for _, m in modules]
    saved_values = None
    if values:
        with torch.no_grad():
            unique = {id(t): t for _, _, t in tensors if t is not None and not t.is_meta}  # tied weights once
            saved_values = [(t, t.detach().clone()) for t in unique.values()]
    rng_state = torch.get_rng_state() if rng else None
    try:
        if clear_grads:
            for p in params:
                p.grad = None
        yield
    finally:
        for d, n, t in tensors:
            d[n] = t
        for m, mode in training:
            m.training = mode
        for p, g, rg in grads:
            if p.requires_grad != rg:
                p.requires_grad_(rg)
            p.grad = g
        for d, keys in hook_keys:
            for k in [k for k in d if k not in keys]:
                del d[k]
        for p, attr, d_old, keys in param_hooks:
            d_now = getattr(p, attr, None)
            if d_now is None:
                continue
            if keys is None:
                if attr == "_backward_hooks":
                    for k in list(d_now):
                        del d_now[k]
                setattr(p, attr, None)
            else:
                for k in [k for k in d_now if k not in keys]:
                    del d_now[k]
        for m, had, fwd in forwards:
            if had:
                m.forward = fwd
            else:
                m.__dict__.pop("forward", None)
        if saved_values is not None:
            with torch.no_grad():
                for t, v in saved_values:
                    t.copy_(v)
        if rng_state is not None:
            torch.set_rng_state(rng_state)

