"""How a module uses its compressed parameters: decoded on the fly, never swapped.

* ``nn.Linear`` (plain forward, the QLoRA case and peft's ``base_layer``): its forward
  is overridden on the instance by :class:`CodedLinear`, an autograd Function that
  decodes the weight, runs ``F.linear`` and saves nothing but a reference to the codes:
  a frozen weight needs no gradient, and the input's gradient ``grad_out @ W`` needs
  only ``W``, which backward decodes again. The decoded weight lives only inside the
  forward and inside the backward.
* ``nn.Conv1d/2d/3d`` (plain forward, zero padding given as numbers): the same with
  :class:`CodedConv`; backward gets the input's gradient from ``torch.nn.grad``'s
  ``conv*d_input``, which needs the weight and only the input's shape.
* ``nn.Embedding`` (plain forward): its forward decodes only the rows the input looks
  up, straight into its output (the whole table first when a row is not whole
  blocks); nothing of the weight is saved for backward.
* Any other module (norms, transposed or padded-by-mode convolutions, a Linear
  subclass or an already wrapped forward): a forward pre-hook sets each decoded
  parameter as a plain attribute and a forward hook removes it. Whatever the module's ops save for backward stays alive
  until that backward, as for any tensor: a norm saves its decoded weight (under
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
        _remember(ctx, x, bias, weight)
        return F.linear(x, weight.decode(), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Under autocast the forward ran in a lower precision: the gradient comes back
            # in that dtype and the input's gradient goes back in the input's own dtype.
            grad_x = grad_out.matmul(_current(ctx).to(grad_out.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


_CONV_INPUT_GRAD = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}
_CONV_FORWARD = {nn.Conv1d.forward: 1, nn.Conv2d.forward: 2, nn.Conv3d.forward: 3}


class CodedConv(torch.autograd.Function):
    """``conv.forward`` with a decoded weight, whose backward decodes the weight again
    for the input's gradient instead of keeping it (batched input, zero padding)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, weight: CodedWeight, conv: nn.Module) -> torch.Tensor:
        _remember(ctx, x, bias, weight)
        ctx.conv = conv
        return conv._conv_forward(x, weight.decode(), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        conv = ctx.conv
        if ctx.needs_input_grad[0]:
            weight = _current(ctx)
            input_grad = _CONV_INPUT_GRAD[len(conv.kernel_size)]
            grad_x = input_grad(ctx.x_shape, weight.to(grad_out.dtype), grad_out, conv.stride, conv.padding,
                                conv.dilation, conv.groups).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dims = [0] + list(range(2, grad_out.dim()))
            grad_bias = grad_out.sum(dims).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None


def _remember(ctx, x: torch.Tensor, bias: torch.Tensor | None, weight: CodedWeight) -> None:
    """What a backward needs besides the weight: the codes' store and version, and the
    input's shape and dtype and the bias's dtype (nothing of their values)."""
    ctx.weight = weight
    ctx.version = weight.version
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _current(ctx) -> torch.Tensor:
    """The decoded weight for a backward, after checking that its codes are the ones
    the forward used."""
    weight: CodedWeight = ctx.weight
    if weight.version != ctx.version:
        raise RuntimeError(
            f"the compressed weight {weight.name!r} of {type(weight.owner).__name__} was re-encoded "
            "(load_state_dict or remove) between this forward and its backward")
    return weight.decode()


def binds_as_conv(module: nn.Module, coded: dict[str, CodedWeight]) -> bool:
    """Whether ``module`` can use :class:`CodedConv`: a plain ``nn.Conv1d/2d/3d`` with
    zero padding given as numbers, whose weight is compressed."""
    return (_CONV_FORWARD.get(type(module).forward) is not None and "forward" not in module.__dict__
            and "weight" in coded and module.padding_mode == "zeros" and not isinstance(module.padding, str))


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
            # The looked-up rows, decoded straight into the output: one per position,
            # repeats included, so that no shape depends on the values (fake-tensor
            # estimates, torch.compile). padding_idx, scale_grad_by_freq and sparse only
            # shape the weight's gradient, and a compressed weight has none.
            return table.decode_rows(input.reshape(-1)).view(*input.shape, -1)

        return _override_forward(module, embedding_forward)

    if binds_as_conv(module, coded):
        conv_weight, conv_bias = coded["weight"], coded.get("bias")
        batched_dim = len(module.kernel_size) + 2

        def conv_forward(input: torch.Tensor) -> torch.Tensor:
            bias = conv_bias.decode() if conv_bias is not None else module.bias
            if input.dim() != batched_dim:  # unbatched input: add the batch dimension around it
                return CodedConv.apply(input.unsqueeze(0), bias, conv_weight, module).squeeze(0)
            return CodedConv.apply(input, bias, conv_weight, module)

        return _override_forward(module, conv_forward)

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
