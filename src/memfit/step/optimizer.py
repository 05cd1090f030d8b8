"""The optimizer a :class:`~memfit.step.StepConfig` names: :func:`make_optimizer`.

This module owns the mapping from a config to an optimizer (torch's own at 32 bits,
:mod:`memfit.optim` at 8/4 bits, an :class:`~memfit.optim.InBackwardOptimizer` for
``optimizer_in_backward``), the defaults it fills in, and what an optimizer's state
weighs (:func:`optimizer_state_bytes`).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..optim.in_backward import InBackwardOptimizer
from .config import StepConfig

__all__ = ["inner_optimizers", "make_optimizer", "optimizer_state_bytes"]

# torch-like defaults per optimizer (lr), and SGD's momentum (0 would mean no state).
_DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2, "lion": 1e-4}


def _optimizer_factory(config: StepConfig, lr: float | None, kw: dict) -> Callable[[list], torch.optim.Optimizer]:
    name, bits = config.optimizer, config.state_bits
    kwargs = {**config.optimizer_kwargs, **kw}
    if lr is not None:
        kwargs["lr"] = lr
    kwargs.setdefault("lr", _DEFAULT_LR[name])
    if name == "sgd":
        kwargs.setdefault("momentum", 0.9)
    from .. import optim as mopt

    if name == "adamw":
        if bits == 32:
            return lambda params: torch.optim.AdamW(params, **kwargs)
        return lambda params: mopt.AdamW(params, state_bits=bits, **kwargs)
    if name == "sgd":
        if bits == 32:
            return lambda params: torch.optim.SGD(params, **kwargs)
        return lambda params: mopt.SGD(params, state_bits=bits, **kwargs)
    return lambda params: mopt.Lion(params, state_bits=bits, **kwargs)



def make_optimizer(model: torch.nn.Module, config: StepConfig, lr: float | None = None, **kw) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``model``'s parameters that require grad.

    ``lr`` and ``kw`` override ``config.optimizer_kwargs``; defaults: lr 1e-3 (AdamW),
    1e-2 with momentum 0.9 (SGD), 1e-4 (Lion). With ``config.optimizer_in_backward``
    the result is an :class:`InBackwardOptimizer` (its hooks are installed by
    :func:`apply`).
    """
    factory = _optimizer_factory(config, lr, kw)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad")
    if config.optimizer_in_backward:
        return InBackwardOptimizer(params, factory, model)
    return factory(params)


def inner_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers that hold state: the per-parameter ones of an
    :class:`InBackwardOptimizer`, else ``[optimizer]``."""
    if isinstance(optimizer, InBackwardOptimizer):
        return optimizer.inner_optimizers()
    return [optimizer]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's state, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for opt in inner_optimizers(optimizer):
        for entry in opt.state.values():
            for v in entry.values():
                if isinstance(v, torch.Tensor):
                    st = v.untyped_storage()
                    if st._cdata not in seen:
                        seen.add(st._cdata)
                        total += st.nbytes()
    return total

