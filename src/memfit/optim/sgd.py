"""``memfit.optim.SGD``: torch's SGD whose momentum buffer is block-wise quantized."""

from __future__ import annotations

import torch
from torch.optim import sgd as _torch_sgd

from . import _qstate as Q
from .._validate import check_lr, check_nonnegative
from ._base import MEMFIT_GROUP_KEYS, QuantizedOptimizer, _local, like_param


class SGD(QuantizedOptimizer):
    """SGD with momentum (torch's semantics: dampening, nesterov, L2 weight decay added
    to the gradient, the first step's buffer is the gradient itself) with the momentum
    buffer quantized block-wise: 8-bit on the signed FP8-style map (E4M3-like, see
    :func:`memfit.codec.dynamic.float_map`; block 256, ~1.02 bytes/param) or 4-bit on
    the signed dynamic map (block 128, ~0.53). ``momentum=0`` keeps no state at all. Options
    ``state_bits``, ``block_size``, ``min_quantized_numel``, ``bf16`` and ``bf16_seed`` as
    for :class:`memfit.optim.AdamW`. Sparse gradients are only supported where the state
    is fp32 (as torch's SGD)."""

    _ALGO = Q.ALGO_SGD
    _STATE_NAMES = ("momentum_buffer",)
    _SPARSE_MSG = "memfit.optim.SGD does not support sparse gradients for parameters with quantized momentum"
    _SPARSE_OK_FP32 = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        state_bits: int = 8,
        block_size: int | None = None,
        min_quantized_numel: int = 4096,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        bf16: str = "nearest",
        bf16_seed: int = 0,
    ):
        if differentiable:
            raise ValueError("memfit.optim.SGD does not support differentiable")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            state_bits=state_bits, block_size=block_size, min_quantized_numel=min_quantized_numel,
            maximize=maximize, foreach=foreach, fused=fused,
        )
        defaults.update(bf16=bf16, bf16_seed=bf16_seed, bf16_step=0)
        super().__init__(params, defaults)

    def _check_hparams(self, group):
        check_lr(group["lr"])
        momentum = check_nonnegative(group["momentum"], name="momentum")
        dampening = check_nonnegative(group["dampening"], name="dampening")
        check_nonnegative(group["weight_decay"], name="weight_decay")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")

    def _has_state(self, group):
        return group["momentum"] != 0

    def _maps(self, bits):
        return ("float8_e4m3_signed",) if bits == 8 else ("dynamic4_signed",)

    def _hparams(self, group, step):
        gs = -1.0 if group["maximize"] else 1.0
        return [
            float(group["lr"]), float(group["momentum"]), 1.0 - float(group["dampening"]),
            float(group["weight_decay"]), gs, 1.0 if group["nesterov"] else 0.0, 1.0 if step == 1.0 else 0.0,
        ]

    def _fp32_entry(self, p, values, step, dtype=None):
        if values is None:
            return {}
        lp = _local(p)
        return {"momentum_buffer": like_param(p, values[0].reshape(lp.shape).to(dtype or lp.dtype).clone())}

    def _fp32_step(self, group, params, targets, grads):
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        _torch_sgd.sgd(
            targets, grads, bufs, has_sparse_grad=any(g.is_sparse for g in grads), foreach=group["foreach"],
            fused=group["fused"], grad_scale=None, found_inf=None, weight_decay=group["weight_decay"],
            momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf

    def _torch_group(self, group):
        out = {k: v for k, v in group.items() if k not in MEMFIT_GROUP_KEYS}
        for k, v in dict(maximize=False, foreach=None, differentiable=False, fused=None).items():
            out.setdefault(k, v)
        return out
