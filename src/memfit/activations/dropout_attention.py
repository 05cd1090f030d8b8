"""Attention with dropout, recomputed in backward: what the op table does with
``F.scaled_dot_product_attention(..., dropout_p > 0)`` under a lossy format.

With dropout, SDPA has no fused kernel to lean on for consistency (on CPU it runs as
composed ops, the "math" backend): plain autograd keeps the probabilities, the
dropout's noise and the dropped probabilities, three tensors of ``B·H·L·S``
elements, the largest of a transformer at any sequence length beyond a few
hundred tokens, and at 2 bits the probabilities' codes dominate the gradient error
of models with sharp attention (the real all-MiniLM-L6-v2). A fused kernel with
dropout (flash on CUDA) keeps its output and logsumexp, which cannot be rebuilt
without the same dropout mask.

So the call runs as :class:`RecomputedAttention`, which works by these rules:

1. **Forward** runs the same SDPA call, with grad, as plain autograd would, under a
   pack hook that only notes the bytes of what the call saves (reported to the
   engine's stats as what plain autograd would have kept, so that ``stats`` ratios
   compare with plain) and lets the graph go when the forward returns: the output
   and the random draws are exactly those of the plain call.
2. **Saved** are q, k and v only (and the mask, if it is a tensor); they pass through
   the engine's pack hook like any saved tensor, where the op table gives q and k
   the precision of fused attention's and v one step up. Nothing of size
   ``B·H·L·S`` is kept.
3. Before the forward, the RNG state of the CPU and of the inputs' device is
   recorded, and the autocast state is noted (as ``torch.utils.checkpoint`` does).
4. **Backward** decodes q, k and v, restores the RNG state inside ``fork_rng`` (the
   global streams are left as they were), and runs the same call again, with grad,
   on the same kernel (pinned with ``sdpa_kernel``) and autocast state: the dropout mask is the forward's. The
   gradient is then the exact gradient of attention at the decoded inputs with the
   forward's mask. Tensors the recomputation saves are kept as they are (an identity
   pack hook), since they are freed as soon as this backward returns.

The cost is one attention forward per call in backward. Only lossy formats take this
path; with ``bits=None`` (or ``policy={"op:sdpa": None}``) the call runs as plain.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = {int(v): v for v in SDPBackend.__members__.values()}


def plain_backend(q, k, v, mask, dropout_p: float, causal: bool, scale, gqa: bool) -> SDPBackend | None:
    """The kernel plain autograd runs for this call (it depends on grad mode, so it is
    asked with the real, grad-requiring inputs), or None when torch cannot say."""
    try:
        choice = int(torch._fused_sdp_choice(q, k, v, mask, dropout_p, causal, scale=scale, enable_gqa=gqa))
    except Exception:
        return None
    backend = _BACKENDS.get(choice)
    return None if backend in (None, SDPBackend.ERROR, SDPBackend.OVERRIDEABLE) else backend


class _RngState:
    """The CPU RNG state and the state of one accelerator device's default generator."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.device = device if device.type not in ("cpu", "meta") else None
        self.device_state = None
        if self.device is not None:
            module = getattr(torch, self.device.type, None)
            if module is not None and hasattr(module, "get_rng_state"):
                self.device_state = module.get_rng_state(self.device)

    @contextlib.contextmanager
    def restored(self):
        devices = [self.device] if self.device_state is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.set_rng_state(self.cpu)
            if devices:
                getattr(torch, self.device.type).set_rng_state(self.device_state, self.device)
            yield


def _autocast_state(device_type: str) -> dict | None:
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return {"dtype": torch.get_autocast_dtype(device_type), "cache_enabled": torch.is_autocast_cache_enabled()}


class RecomputedAttention(torch.autograd.Function):
    """``F.scaled_dot_product_attention`` that saves q, k, v (and the mask) and
    recomputes everything else in backward, with the forward's dropout mask."""

    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, causal, scale, gqa, backend, report_plain_bytes):
        ctx.rng = _RngState(q.device)
        ctx.autocast = _autocast_state(q.device.type)
        ctx.options = (dropout_p, causal, scale, gqa, backend)
        inputs = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) and t.is_floating_point()
                  else t for t in (q, k, v, mask)]
        noted: list[tuple[weakref.ref, int]] = []  # each storage plain autograd saves, once
        latest: dict[int, weakref.ref] = {}

        def note(t: torch.Tensor) -> None:
            # Nothing is kept: this graph is never differentiated (backward builds its
            # own), and a pack hook returning a tensor the node outputs would tie the
            # two into a cycle that outlives the forward. So a storage noted here may be
            # freed before the next is saved, and the next may get its address: a
            # storage is the same one only if its weak reference says so.
            storage = t.untyped_storage()
            ref = latest.get(storage._cdata)
            if ref is None or ref() is not storage:
                latest[storage._cdata] = ref = weakref.ref(storage)
                noted.append((ref, storage.nbytes()))

        with torch.enable_grad(), saved_tensors_hooks(note, _identity):
            out = _attention(*inputs, *ctx.options).detach()
        if report_plain_bytes is not None:
            # q, k, v and the mask are packed (and counted) by the engine itself, but
            # only where plain autograd saves their storage too: the math backend saves
            # scaled copies, and a view of them only sometimes. They are alive, so a
            # live noted storage at one of their addresses is theirs.
            own = {t.untyped_storage()._cdata for t in (q, k, v, mask) if isinstance(t, torch.Tensor)}
            live = [(kept._cdata if (kept := ref()) is not None else None, n) for ref, n in noted]
            report_plain_bytes(sum(n for key, n in live if key not in own),
                               frozenset(key for key, _ in live if key in own))
        mask_is_tensor = isinstance(mask, torch.Tensor)
        ctx.mask_is_tensor = mask_is_tensor
        ctx.mask = None if mask_is_tensor else mask
        ctx.save_for_backward(q, k, v, *((mask,) if mask_is_tensor else ()))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        q, k, v = saved[:3]
        mask = saved[3] if ctx.mask_is_tensor else ctx.mask
        needs = ctx.needs_input_grad[:4]
        inputs = [t.detach().requires_grad_(n) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                  for t, n in zip((q, k, v, mask), needs)]
        autocast = (torch.autocast(q.device.type, **ctx.autocast) if ctx.autocast is not None
                    else torch.autocast(q.device.type, enabled=False))
        with ctx.rng.restored(), torch.enable_grad(), autocast, saved_tensors_hooks(_identity, _identity):
            out = _attention(*inputs, *ctx.options)
        wanted = [t for t, n in zip(inputs, needs) if n]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else iter(())
        return (*(next(grads) if n else None for n in needs), None, None, None, None, None, None)


def _identity(t):
    return t


def _attention(q, k, v, mask, dropout_p, causal, scale, gqa, backend):
    kwargs = {}
    if scale is not None:
        kwargs["scale"] = scale
    if gqa:
        kwargs["enable_gqa"] = True
    pin = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
    with pin:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                              **kwargs)


def recomputed_attention(args: tuple, kwargs: dict,
                         report_plain_bytes: Callable[[int, frozenset], None] | None = None
                         ) -> torch.Tensor | None:
    """Run ``F.scaled_dot_product_attention(*args, **kwargs)`` as
    :class:`RecomputedAttention`, or return None when the call is not one it takes:
    no dropout, no grad needed, arguments it does not know, or inputs on different
    devices. ``report_plain_bytes`` is given the bytes plain autograd would have
    saved for the call (its saved storages, each once) other than the storages of q,
    k, v and the mask, and which of those storages (``untyped_storage()._cdata``)
    plain autograd saves too."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound = dict(zip(names, args))
    for name, value in kwargs.items():
        if name in bound or name not in (*names, "scale", "enable_gqa"):
            return None
        bound[name] = value
    if len(args) > len(names):
        return None
    q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
    mask = bound.get("attn_mask")
    dropout_p = float(bound.get("dropout_p", 0.0))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or dropout_p <= 0.0:
        return None
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v, mask)
                                              if isinstance(t, torch.Tensor)):
        return None
    if len({t.device for t in (q, k, v)}) != 1 or (isinstance(mask, torch.Tensor) and mask.device != q.device):
        return None
    causal, scale, gqa = bool(bound.get("is_causal", False)), bound.get("scale"), bool(bound.get("enable_gqa", False))
    backend = plain_backend(q, k, v, mask, dropout_p, causal, scale, gqa)
    return RecomputedAttention.apply(q, k, v, mask, dropout_p, causal, scale, gqa, backend, report_plain_bytes)
