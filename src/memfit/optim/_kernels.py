"""Loads the fused C++/OpenMP optimizer step (``csrc/step.cpp``) for CPU tensors.

Built once per machine with ``torch.utils.cpp_extension.load`` (a C++ compiler and
ninja needed; cached under ``TORCH_EXTENSIONS_DIR``), with the codec's flags: ``-O3
-march=native -ffp-contract=off`` (no FMA contraction, so the results equal the eager
path's bit for bit). :func:`fused_step` returns None when the extension is unavailable
(after one ``RuntimeWarning``) or when ``MEMFIT_KERNELS=eager``; callers then use
:mod:`memfit.optim._eager`, which is always correct.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path

_SOURCE = Path(__file__).with_name("csrc") / "step.cpp"
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
_LDFLAGS = ["-fopenmp"]

_ext = None
_tried = False
_lock = threading.Lock()


def _machine_key() -> str:
    try:
        from memfit.codec._cpu import _machine_key as codec_key

        return codec_key()
    except Exception:  # pragma: no cover - the codec helper moved or is missing
        import platform
        import sys

        import torch

        return "\n".join([platform.machine(), platform.processor(), sys.version, torch.__version__])


def _build():
    from torch.utils import cpp_extension

    h = hashlib.sha256()
    h.update(_SOURCE.read_bytes())
    h.update(repr((_CFLAGS, _LDFLAGS)).encode())
    h.update(_machine_key().encode())
    return cpp_extension.load(
        name=f"memfit_optim_cpu_{h.hexdigest()[:16]}",
        sources=[str(_SOURCE)],
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        verbose=False,
    )


def load_extension():
    """The compiled extension, or None if it cannot be built (warns once)."""
    global _ext, _tried
    if _tried:
        return _ext
    with _lock:
        if not _tried:
            try:
                _ext = _build()
            except Exception as exc:  # no compiler, no ninja, ...: stay correct, just slower
                warnings.warn(
                    f"memfit.optim: fused CPU step unavailable ({type(exc).__name__}: {exc}); "
                    "using the eager PyTorch fallback, which is correct but slower. "
                    "Install a C++ compiler and `pip install ninja` for the fast path.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _ext = None
            _tried = True
    return _ext


def fused_step():
    """The fused CPU step function, or None (eager requested, or unavailable)."""
    if os.environ.get("MEMFIT_KERNELS", "auto") == "eager":
        return None
    ext = load_extension()
    return None if ext is None else ext.step


def backend_name() -> str:
    """``"cpp"`` when the fused CPU step is used, else ``"eager"``."""
    return "cpp" if fused_step() is not None else "eager"
