"""Which kernels run for a device: the one place memfit chooses a kernel backend.

Two families of kernels have the same three backends:

========  =========================  ==============================  ===========================
family    eager (reference)          cpu (fused C++/OpenMP)          triton (CUDA)
========  =========================  ==============================  ===========================
codec     ``memfit.codec._eager``    ``memfit.codec._cpu``           ``memfit.codec._triton``
optim     ``memfit.optim._qstate``   ``memfit.optim._kernels``       ``memfit.optim._triton``
========  =========================  ==============================  ===========================

``MEMFIT_KERNELS`` picks one: ``auto`` (the default) takes the fastest that works for
the tensor's device (CPU: ``cpu``, else ``eager`` with one warning; CUDA: ``triton``
when Triton is installed, else ``eager``; other devices: ``eager``). ``eager``,
``cpu`` or ``triton`` ask for that backend and raise :class:`KernelBackendError`,
naming the fix, when it cannot serve a tensor (``cpu`` on CUDA tensors, a failed build;
``triton`` without Triton, or on CPU tensors unless ``TRITON_INTERPRET=1``).
:func:`backend` answers with a :class:`Backend`; ``memfit.codec.backend_name(device)``
and ``memfit.optim.backend_name(device)`` say which one runs.

Adding a backend
----------------
1. Write one module per family, named in :data:`MODULES` (``memfit/<family>/_<name>.py``),
   with ``NAME = "<name>"`` and either ``available() -> bool`` (the module holds the
   kernels) or ``load()`` (returns the object holding them, or raises saying why not;
   the C++ modules build there, through :mod:`memfit._jit`).
   * codec: ``quantize_int``, ``dequantize_int``, ``quantize_fp8``, ``dequantize_fp8``,
     ``pack_bits``, ``unpack_bits`` with exactly the signatures and results of
     :mod:`memfit.codec._eager` (round-to-nearest bit for bit; stochastic rounding
     unbiased within :meth:`IntFormat.error_bound`).
   * optim: ``step(algo, p, g, codes, absmax, values, table, mids, tparams, bits, block,
     redo, hp)`` with the arguments of ``step`` in ``optim/csrc/step.cpp``: update
     ``p`` and the states in place, bit for bit as :func:`memfit.optim._qstate.eager_step`;
     a block it cannot do exactly (non-finite state) is left untouched and flagged in
     ``redo``, and the eager step redoes it.
2. Add its name to :data:`BACKENDS`, the devices it serves to :func:`_serves` and its
   place in the ``auto`` order to :func:`_auto_order`.
3. Test it against the eager reference (``tests/test_codec_cpu_kernels.py``,
   ``tests/test_optim.py::test_fused_equals_eager`` show how), and the choice in
   ``tests/test_backends.py``.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BACKENDS", "ENV", "MODULES", "Backend", "KernelBackendError", "backend", "requested"]

ENV = "MEMFIT_KERNELS"
BACKENDS = ("eager", "cpu", "triton")
FAMILIES = ("codec", "optim")

MODULES: dict[str, dict[str, str]] = {
    "codec": {"eager": "memfit.codec._eager", "cpu": "memfit.codec._cpu", "triton": "memfit.codec._triton"},
    "optim": {"eager": "memfit.optim._qstate", "cpu": "memfit.optim._kernels", "triton": "memfit.optim._triton"},
}

# What a failed backend is called in its one warning (the tests filter on these words).
_LABELS = {
    ("codec", "cpu"): "memfit: fused CPU kernels",
    ("optim", "cpu"): "memfit.optim: fused CPU step",
    ("codec", "triton"): "memfit: Triton codec kernels",
    ("optim", "triton"): "memfit.optim: Triton step",
}
_FIXES = {
    "cpu": "install a C++ compiler and `pip install ninja` (or `pip install 'memfit[fast]'`)",
    "triton": "`pip install 'memfit[triton]'` on a machine with a CUDA GPU",
}


class KernelBackendError(RuntimeError):
    """The backend ``MEMFIT_KERNELS`` asks for cannot run here."""


@dataclass(frozen=True)
class Backend:
    """The chosen backend for one family and device: its name and the object holding
    its kernels (a module for the codec; for the optimizers, one with ``step``)."""

    name: str
    kernels: Any


def requested() -> str:
    """``MEMFIT_KERNELS``, checked: ``auto`` (unset or empty), ``eager``, ``cpu`` or ``triton``."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{ENV}={os.environ.get(ENV)!r}: expected one of auto, {', '.join(BACKENDS)}")
    return value


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _serves(name: str, device: torch.device) -> bool:
    if name == "eager":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _interpreted())
    return False


def _auto_order(device: torch.device) -> tuple[str, ...]:
    # Triton serves CPU tensors only through its (slow) interpreter: never by default.
    if device.type == "cpu":
        return ("cpu", "eager")
    if device.type == "cuda":
        return ("triton", "eager")
    return ("eager",)


_loads: dict[tuple[str, str], Any] = {}  # (family, backend) -> kernels, or the exception
_warned: set[tuple[str, str]] = set()
_lock = threading.Lock()


def _load(family: str, name: str) -> Any:
    """The kernels of ``name`` for ``family``, loaded once; raises what made it fail."""
    key = (family, name)
    with _lock:
        if key not in _loads:
            try:
                _loads[key] = _import_kernels(family, name)
            except Exception as exc:  # no compiler, no Triton, a build lock held too long, ...
                _loads[key] = exc
        out = _loads[key]
    if isinstance(out, Exception):
        raise out
    return out


def _import_kernels(family: str, name: str) -> Any:
    module = importlib.import_module(MODULES[family][name])
    if hasattr(module, "load"):
        return module.load()
    if hasattr(module, "available") and not module.available():
        raise KernelBackendError(f"{MODULES[family][name]}.available() is False")
    return module


def backend(family: str, device: torch.device | str) -> Backend:
    """The backend that runs ``family``'s kernels (``"codec"`` or ``"optim"``) on
    tensors of ``device``, as ``MEMFIT_KERNELS`` asks (see the module docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    device = torch.device(device)
    choice = requested()
    if choice != "auto":
        return _explicit(family, choice, device)
    for name in _auto_order(device):
        if name == "eager":
            return Backend("eager", _load(family, "eager"))
        try:
            return Backend(name, _load(family, name))
        except Exception as exc:
            if name == "triton" and isinstance(exc, ImportError):
                continue  # Triton is optional: its absence is not worth a warning
            _warn_once(family, name, exc)
    raise AssertionError("unreachable: eager serves every device")  # pragma: no cover


def _explicit(family: str, name: str, device: torch.device) -> Backend:
    if not _serves(name, device):
        if name == "cpu":
            fix = f"unset {ENV} (or set it to auto) to use the best backend for {device.type} tensors"
            raise KernelBackendError(f"{ENV}=cpu: the fused C++ kernels run CPU tensors only, got a {device} tensor; {fix}")
        raise KernelBackendError(
            f"{ENV}=triton: the Triton kernels run CUDA tensors, got a {device} tensor; for CPU tensors set "
            f"TRITON_INTERPRET=1 (Triton's interpreter, slow: for tests), or unset {ENV} to use the best "
            "backend available"
        )
    try:
        return Backend(name, _load(family, name))
    except KernelBackendError:
        raise
    except Exception as exc:
        raise KernelBackendError(
            f"{ENV}={name}: {_LABELS.get((family, name), name)} cannot be used ({type(exc).__name__}: {exc}); "
            f"{_FIXES.get(name, 'see the error above')}, or unset {ENV} to use the best backend available"
        ) from exc


def _warn_once(family: str, name: str, exc: Exception) -> None:
    key = (family, name)
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    from ._jit import BuildLockTimeout

    # a lock held too long or a bad MEMFIT_BUILD_LOCK_TIMEOUT: the message says what to do
    fix = "" if isinstance(exc, (BuildLockTimeout, ValueError)) else f" For the fast path: {_FIXES[name]}."
    warnings.warn(
        f"{_LABELS[key]} unavailable ({type(exc).__name__}: {exc}); using the eager PyTorch kernels, which "
        f"give the same results, more slowly.{fix}",
        RuntimeWarning,
        stacklevel=4,
    )
