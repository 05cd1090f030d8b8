"""``memfit.optim.Lion``: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms") with its one moment block-wise quantized."""

from __future__ import annotations

import torch

from . import _qstate as Q
from .._validate import check_betas, check_lr, check_nonnegative
from ._base import MEMFIT_GROUP_KEYS, QuantizedOptimizer, _local, like_param


class Lion(QuantizedOptimizer):
    """Lion: ``c = b1*m + (1-b1)*g``; ``p = p*(1 - lr*wd) - lr*sign(c)``;
    ``m = b2*m + (1-b2)*g``. Defaults lr=1e-4, betas=(0.9, 0.99), weight_decay=0.
    The moment uses the signed FP8-style map at 8 bits (block 256) or the signed
    dynamic map at 4 bits (block 128).
    Options ``state_bits``, ``block_size``, ``min_quantized_numel``, ``bf16`` and
    ``bf16_seed`` as for :class:`memfit.optim.AdamW`. ``sign`` follows ``torch.sign`` (NaN -> 0)."""

    _ALGO = Q.ALGO_LION
    _STATE_NAMES = ("exp_avg",)
    _SPARSE_MSG = "Lion does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        state_bits: int = 8,
        block_size: int | None = None,
        min_quantized_numel: int = 4096,
        maximize: bool = False,
        bf16: str = "nearest",
        bf16_seed: int = 0,
    ):
        defaults = dict(
            lr=lr, betas=betas, weight_decay=weight_decay, state_bits=state_bits, block_size=block_size,
            min_quantized_numel=min_quantized_numel, maximize=maximize,
        )
        defaults.update(bf16=bf16, bf16_seed=bf16_seed, bf16_step=0)
        super().__init__(params, defaults)

    def _check_hparams(self, group):
        check_lr(group["lr"])
        check_betas(group["betas"])
        check_nonnegative(group["weight_decay"], name="weight_decay")

    def _maps(self, bits):
        return ("float8_e4m3_signed",) if bits == 8 else ("dynamic4_signed",)

    def _hparams(self, group, step):
        lr = float(group["lr"])
        b1, b2 = (float(b) for b in group["betas"])
        gs = -1.0 if group["maximize"] else 1.0
        return [1.0 - lr * float(group["weight_decay"]), lr, b1, 1.0 - b1, b2, 1.0 - b2, gs]

    def _fp32_entry(self, p, values, step, dtype=None):
        lp = _local(p)
        dtype = dtype or lp.dtype
        ea = torch.zeros_like(p, dtype=dtype) if values is None else like_param(
            p, values[0].reshape(lp.shape).to(dtype).clone())
        return {"step": torch.tensor(float(step), dtype=torch.float32), "exp_avg": ea}

    def _fp32_step(self, group, params, targets, grads):
        lr = float(group["lr"])
        b1, b2 = (float(b) for b in group["betas"])
        wd = float(group["weight_decay"])
        for p, t, grad in zip(params, targets, grads):
            state = self.state[p]
            if "step" not in state:
                state.update(self._fp32_entry(p, None, 0.0, t.dtype))
            state["step"] += 1
            g = -grad if group["maximize"] else grad
            m = state["exp_avg"]
            if wd != 0.0:
                t.mul_(1.0 - lr * wd)
            c = m * b1 + g * (1.0 - b1)
            t.add_(torch.sgn(c), alpha=-lr)
            m.mul_(b2).add_(g, alpha=1.0 - b2)

    def _torch_group(self, group):
        return {k: v for k, v in group.items() if k not in MEMFIT_GROUP_KEYS}
