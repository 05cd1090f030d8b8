"""Shape-only codec kernels for FakeTensors (``FakeTensorMode``) and meta tensors.

They return empty tensors of exactly the sizes and dtypes the real kernels return
(the fused C++ ones and the eager reference agree on outputs). :func:`memfit.plan.estimate`
relies on this to count what compressed activations hold without computing anything.

They also reproduce the real kernels' transient memory, so that estimated peaks match
real ones: the fused C++ kernels allocate their outputs and nothing else; the eager
kernels (``MEMFIT_KERNELS=eager``, no compiler, non-CPU devices) make temporaries
several times the tensor's size. For a device whose real backend is not the C++ one,
each call allocates, right after its outputs, a scratch buffer as large as the real
kernel's peak temporaries (measured once per process on small real tensors of that
kind, and scaled: it is linear in the number of elements), and frees it.
"""

from __future__ import annotations

import weakref

import torch

NAME = "fake"

_SCRATCH: dict[tuple, tuple[float, float]] = {}


def _peak_mode():
    """A TorchDispatchMode whose ``peak`` is the most bytes of storages created inside
    it that were alive at once."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class PeakBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = 0
            self.peak = 0
            self.seen: set[int] = set()

        def _gone(self, key: int, nbytes: int) -> None:
            self.seen.discard(key)
            self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    self.seen.add(t.untyped_storage()._cdata)
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st._cdata not in self.seen:
                        self.seen.add(st._cdata)
                        self.live += st.nbytes()
                        weakref.finalize(st, self._gone, st._cdata, st.nbytes())
            self.peak = max(self.peak, self.live)
            return out

    return PeakBytes()


def _real_backend(device: torch.device):
    from .kernels import backend_for

    return backend_for(device)


def _measure(op: str, device: torch.device, dtype: torch.dtype, args: tuple, block: int) -> tuple[float, float]:
    """(bytes per element, constant) of the real kernel's memory beyond its outputs."""
    k = _real_backend(device)
    fn = getattr(k, op)
    extra = []
    sizes = (4 * block, 12 * block)
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        if op in ("quantize_int", "quantize_fp8"):
            x = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
            inputs = (x,)
        elif op == "pack_bits":
            inputs = ((torch.rand(n, generator=gen) > 0.5).to(device),)
        elif op == "unpack_bits":
            inputs = (k.pack_bits((torch.rand(n, generator=gen) > 0.5).to(device)),)
        elif op == "dequantize_int":
            bits, symmetric = args
            x = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
            codes, scale, lo, _ = k.quantize_int(x, bits, block, symmetric, False, 0)
            inputs = (codes, scale, lo)
        else:  # dequantize_fp8
            x = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
            codes, scale, _ = k.quantize_fp8(x, block)
            inputs = (codes, scale)
        call = {
            "quantize_int": lambda: fn(inputs[0], args[0], block, args[1], args[2], 1),
            "quantize_fp8": lambda: fn(inputs[0], block),
            "pack_bits": lambda: fn(inputs[0]),
            "unpack_bits": lambda: fn(inputs[0], n),
            "dequantize_int": lambda: fn(*inputs, args[0], block, n, dtype),
            "dequantize_fp8": lambda: fn(*inputs, block, n, dtype),
        }[op]
        mode = _peak_mode()
        with mode:
            out = call()
        kept = sum(t.untyped_storage().nbytes() for t in (out if isinstance(out, (tuple, list)) else (out,))
                   if isinstance(t, torch.Tensor))
        extra.append(max(0, mode.peak - kept))
        del out
    slope = (extra[1] - extra[0]) / (sizes[1] - sizes[0])
    return slope, extra[0] - slope * sizes[0]


def _scratch(op: str, like: torch.Tensor, n: int, dtype: torch.dtype, block: int, args: tuple = ()) -> None:
    """Allocate and free what the real kernel needs beyond its outputs, for ``n`` elements."""
    device = like.device
    if device.type == "meta":
        return
    try:
        real = _real_backend(device)
    except Exception:  # pragma: no cover
        return
    if getattr(real, "NAME", "eager") == "cpu":
        return  # the fused C++ kernels allocate their outputs only
    key = (op, device.type, dtype, block, args, getattr(real, "NAME", "eager"))
    coef = _SCRATCH.get(key)
    if coef is None:
        from torch.utils._python_dispatch import _disable_current_modes

        try:
            with _disable_current_modes():  # real tensors: outside fake mode and any tracker
                coef = _measure(op, device, dtype, args, block)
        except Exception:  # e.g. a fake CUDA tensor on a machine without CUDA
            coef = (0.0, 0.0)
        _SCRATCH[key] = coef
    nbytes = int(round(coef[0] * n + coef[1]))
    if nbytes > 0:
        scratch = torch.empty(nbytes, dtype=torch.uint8, device=device)
        del scratch


def quantize_int(x, bits: int, block: int, symmetric: bool, stochastic: bool, seed: int, col_inv=None):
    n = x.numel()
    nb = -(-n // block)
    codes = torch.empty(nb * block * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(nb, dtype=torch.float32, device=x.device)
    lo = None if symmetric else torch.empty(nb, dtype=torch.float32, device=x.device)
    nonfinite = torch.empty(nb, dtype=torch.bool, device=x.device)
    _scratch("quantize_int", x, n, x.dtype, block, (bits, symmetric, stochastic))
    return codes, scale, lo, nonfinite


def dequantize_int(codes, scale, lo, bits: int, block: int, n: int, out_dtype: torch.dtype, col_scale=None):
    out = torch.empty(n, dtype=out_dtype, device=codes.device)
    _scratch("dequantize_int", codes, n, out_dtype, block, (bits, lo is None))
    return out


def quantize_fp8(x, block: int):
    n = x.numel()
    nb = -(-n // block)
    codes = torch.empty(nb * block, dtype=torch.uint8, device=x.device)
    scale = torch.empty(nb, dtype=torch.float32, device=x.device)
    nonfinite = torch.empty(nb, dtype=torch.bool, device=x.device)
    _scratch("quantize_fp8", x, n, x.dtype, block)
    return codes, scale, nonfinite


def dequantize_fp8(codes, scale, block: int, n: int, out_dtype: torch.dtype):
    out = torch.empty(n, dtype=out_dtype, device=codes.device)
    _scratch("dequantize_fp8", codes, n, out_dtype, block)
    return out


def pack_bits(x):
    out = torch.empty(-(-x.numel() // 8), dtype=torch.uint8, device=x.device)
    _scratch("pack_bits", x, x.numel(), torch.bool, 8)
    return out


def unpack_bits(codes, n: int):
    out = torch.empty(n, dtype=torch.bool, device=codes.device)
    _scratch("unpack_bits", codes, n, torch.bool, 8)
    return out
