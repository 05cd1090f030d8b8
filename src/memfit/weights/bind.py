"""How a module uses its compressed parameters: decoded on the fly, never swapped.

* ``nn.Linear`` (plain forward, the QLoRA case and peft's ``base_layer``): its forward
  is overridden on the instance by :class:`CodedLinear`, an autograd Function that
  decodes the weight, runs ``F.linear`` and saves nothing but a reference to the codes:
  a frozen weight needs no gradient, and the input's gradient ``grad_out @ W`` needs
  only ``W``, which backward decodes again. The decoded weight lives only inside the
  forward and inside the backward.
* ``nn.Embedding`` (plain forward): its forward decodes only the rows the input looks
  up (all of them when a row is not whole blocks) and gathers from those; nothing of
  the weight is saved for backward.
* Any other module (Conv, norms, a Linear subclass or an already wrapped
  forward): a forward pre-hook sets each decoded parameter as a plain attribute and a
  forward hook removes it. Whatever the module's ops save for backward stays alive
  until that backward, as for any tensor: a convolution or a norm saves its decoded
  weight (under
  ``memfit.activations`` that saved copy is compressed like any activation).

Outside its forward, a compressed parameter is not an attribute of its module.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .store import CodedWeight


class CodedLinear(torch.autograd.Function):
    """``F.linear(x, decode(weight), bias)`` whose backward decodes the weight again
    instead of keeping it. ``bias`` is the module's bias (trainable or not) or the
    decoded one when it is compressed too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, weight: CodedWeight) -> torch.Tensor:
        ctx.weight = weight
        ctx.version = weight.version
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight.decode(), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight: CodedWeight = ctx.weight
            if weight.version != ctx.version:
                raise RuntimeError(
                    f"the compressed weight {weight.name!r} of {type(weight.owner).__name__} was re-encoded "
                    "(load_state_dict or remove) between this forward and its backward")
            # Under autocast the forward ran in a lower precision: the gradient comes back
            # in that dtype and the input's gradient goes back in the input's own dtype.
            grad_x = grad_out.matmul(weight.decode().to(grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


def binds_as_linear(module: nn.Module, coded: dict[str, CodedWeight]) -> bool:
    """Whether ``module`` can use :class:`CodedLinear`: a plain ``nn.Linear`` (its own
    class's forward, not overridden) whose weight is compressed."""
    return (type(module).forward is nn.Linear.forward and "forward" not in module.__dict__
            and "weight" in coded)


def binds_as_embedding(module: nn.Module, coded: dict[str, CodedWeight]) -> bool:
    """Whether ``module`` is a plain ``nn.Embedding`` whose only compressed parameter is
    its weight (``max_norm`` embeddings are refused earlier: they write the weight)."""
    return (type(module).forward is nn.Embedding.forward and "forward" not in module.__dict__
            and set(coded) == {"weight"})


def _override_forward(module: nn.Module, forward: Callable) -> Callable[[], None]:
    module.forward = forward

    def unbind() -> None:
        module.__dict__.pop("forward", None)

    return unbind


def bind(module: nn.Module, coded: dict[str, CodedWeight]) -> Callable[[], None]:
    """Make ``module`` decode the parameters in ``coded`` (name -> store) when it runs;
    returns the function that undoes it."""
    if binds_as_embedding(module, coded):
        table = coded["weight"]

        def embedding_forward(input: torch.Tensor) -> torch.Tensor:
            # padding_idx, scale_grad_by_freq and sparse only shape the weight's
            # gradient, and a compressed weight has none.
            rows, inverse = torch.unique(input, return_inverse=True)
            return F.embedding(inverse, table.decode_rows(rows.reshape(-1)))

        return _override_forward(module, embedding_forward)

    if binds_as_linear(module, coded):
        weight, bias_store = coded["weight"], coded.get("bias")

        def forward(input: torch.Tensor) -> torch.Tensor:
            bias = bias_store.decode() if bias_store is not None else module.bias
            return CodedLinear.apply(input, bias, weight)

        return _override_forward(module, forward)

    def set_decoded(mod: nn.Module, args) -> None:
        for name, store in coded.items():
            object.__setattr__(mod, name, store.decode())

    def clear_decoded(mod: nn.Module, args, output) -> None:
        for name in coded:
            mod.__dict__.pop(name, None)

    handles = [module.register_forward_pre_hook(set_decoded, prepend=True),
               module.register_forward_hook(clear_decoded, always_call=True)]

    def unbind_hooks() -> None:
        for h in handles:
            h.remove()
        for name in coded:
            module.__dict__.pop(name, None)

    return unbind_hooks
