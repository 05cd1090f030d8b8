"""``memfit.optim.AdamW``: torch's AdamW with block-wise 8-bit or 4-bit states."""

from __future__ import annotations

import math

import torch
from torch.optim import adam as _torch_adam

from . import _qstate as Q
from .._validate import check_betas, check_lr, check_nonnegative
from ._base import MEMFIT_GROUP_KEYS, QuantizedOptimizer, _local, like_param


class AdamW(QuantizedOptimizer):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) whose two moments are
    stored block-wise quantized.

    Args (beyond torch's, which keep torch's defaults):
        state_bits: 8 (default), 4 or 32, per param group. 8-bit: blocks of 256 with an
            fp32 absmax each (~2.03 bytes/param), both moments on 8-bit floating-point
            maps whose top code is exactly 1.0 (:func:`memfit.codec.dynamic.float_map`):
            the first on a signed E4M3-like map (as FP8-LM and COAT store it), the
            second on an unsigned E5M3-like map without a zero code (32 binades; a
            second moment never decodes to 0). Rounding to them is integer arithmetic
            on the fp32 bits, which is what makes the fused CPU step fast. A state
            saved on other maps (the dynamic-tree maps of memfit 0.1 development
            builds; the names are in the state dict) is requantized onto these when
            loaded, one extra rounding. 4-bit: blocks of 128, the
            first moment on the 4-bit signed dynamic map, the second on the linear map
            without a zero code (1/16 .. 1; Li et al. 2023), ~1.06 bytes/param. 32:
            plain fp32 state, stepped by torch's own AdamW code.
        block_size: override the block size (even, at most 4096).
        min_quantized_numel: parameters with fewer elements (counted over the whole
            tensor, never an FSDP shard) keep fp32 state; default 4096.
        bf16: how the fp32 update reaches a bf16 parameter, per param group:
            ``"nearest"`` (default, as torch), ``"stochastic"`` (unbiased stochastic
            rounding, no extra memory) or ``"master"`` (an fp32 master copy in the
            state, 4 more bytes per parameter; fp16 parameters too). Under
            "stochastic" and "master", fp32-format state (``state_bits=32`` and
            small parameters) is kept in fp32. See :mod:`memfit.optim.bf16`.
        bf16_seed: seeds the stochastic rounding (with the step and the parameter's
            position; the global RNG is never used).

    Complex parameters, and parameters marked with :func:`memfit.optim.keep_fp32`,
    keep fp32 state too. ``amsgrad``, ``capturable`` and ``differentiable`` are not
    supported (ValueError). ``foreach``/``fused`` apply to the fp32-state parameters.
    """

    _ALGO = Q.ALGO_ADAMW
    _STATE_NAMES = ("exp_avg", "exp_avg_sq")
    _SPARSE_MSG = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        state_bits: int = 8,
        block_size: int | None = None,
        min_quantized_numel: int = 4096,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        bf16: str = "nearest",
        bf16_seed: int = 0,
    ):
        if amsgrad:
            raise ValueError("memfit.optim.AdamW does not support amsgrad")
        if capturable or differentiable:
            raise ValueError("memfit.optim.AdamW does not support capturable or differentiable")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_bits=state_bits, block_size=block_size,
            min_quantized_numel=min_quantized_numel, maximize=maximize, foreach=foreach, fused=fused,
        )
        defaults.update(bf16=bf16, bf16_seed=bf16_seed, bf16_step=0)
        super().__init__(params, defaults)

    def _check_hparams(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative(group["eps"], name="eps")
        check_nonnegative(group["weight_decay"], name="weight_decay")

    def _maps(self, bits: int) -> tuple[str, ...]:
        return ("float8_e4m3_signed", "float8_e5m3_unsigned") if bits == 8 else ("dynamic4_signed", "linear4_unsigned_nozero")

    def _hparams(self, group: dict, step: float) -> list[float]:
        lr = float(group["lr"])
        b1, b2 = (float(b) for b in group["betas"])
        wd, eps = float(group["weight_decay"]), float(group["eps"])
        bc1 = 1.0 - b1**step
        bc2 = 1.0 - b2**step
        gs = -1.0 if group["maximize"] else 1.0
        return [1.0 - lr * wd, b1, 1.0 - b1, b2, 1.0 - b2, 1.0 / math.sqrt(bc2), eps, lr / bc1, gs]

    def _fp32_entry(self, p, values, step, dtype=None):
        lp = _local(p)
        dtype = dtype or lp.dtype
        if values is None:
            ea, eas = torch.zeros_like(p, dtype=dtype), torch.zeros_like(p, dtype=dtype)
        else:
            ea, eas = (like_param(p, v.reshape(lp.shape).to(dtype).clone()) for v in values)
        return {"step": torch.tensor(float(step), dtype=torch.float32), "exp_avg": ea, "exp_avg_sq": eas}

    def _fp32_step(self, group, params, targets, grads):
        ea, eas, steps = [], [], []
        for p, t in zip(params, targets):
            state = self.state[p]
            if "step" not in state:
                state.update(self._fp32_entry(p, None, 0.0, t.dtype))
            ea.append(state["exp_avg"])
            eas.append(state["exp_avg_sq"])
            steps.append(state["step"])
        b1, b2 = group["betas"]
        _torch_adam.adam(
            targets, grads, ea, eas, [], steps,
            foreach=group["foreach"], capturable=False, differentiable=False, fused=group["fused"],
            grad_scale=None, found_inf=None, has_complex=any(torch.is_complex(t) for t in targets),
            decoupled_weight_decay=True, amsgrad=False, beta1=b1, beta2=b2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        )

    def _torch_group(self, group):
        out = {k: v for k, v in group.items() if k not in MEMFIT_GROUP_KEYS}
        for k, v in dict(amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                         fused=None, decoupled_weight_decay=True).items():
            out.setdefault(k, v)
        return out
