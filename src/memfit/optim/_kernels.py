"""The fused C++/OpenMP optimizer step (``csrc/step.cpp``) for CPU tensors: the
optimizers' ``cpu`` backend (see :mod:`memfit._backends`).

Built once per Python environment through :mod:`memfit._jit` with the codec's flags
(``-O3 -march=native -ffp-contract=off``: no FMA contraction, so the results equal
the eager step's, :func:`memfit.optim._qstate.eager_step`, bit for bit).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .._backends import backend
from .._jit import Extension

NAME = "cpu"

EXTENSION = Extension(
    name="memfit_optim_cpu",
    sources=(Path(__file__).with_name("csrc") / "step.cpp",),
    what="the fused CPU optimizer step",
)


def load():
    """The compiled extension (its ``step`` is the fused step); built on first use in
    this environment. Raises if it cannot be built."""
    return EXTENSION.load()


def fused_step(device: torch.device | str = "cpu"):
    """The fused step function the optimizers use for ``device``'s tensors, or None
    when they use the eager step there."""
    chosen = backend("optim", device)
    return None if chosen.name == "eager" else chosen.kernels.step


def backend_name(device: torch.device | str = "cpu") -> str:
    """Which optimizer-step backend runs on ``device``'s tensors: ``"cpu"`` (fused
    C++), ``"triton"`` or ``"eager"``. Loads (on first use builds) the kernels it names."""
    return backend("optim", device).name
