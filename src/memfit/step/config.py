"""What one training step does besides forward and backward: :class:`StepConfig`.

This module owns the configuration only (activation policy, checkpointed modules,
optimizer and its state bits, optimizer-in-backward, gradient accumulation and
clipping, autocast), its validation, its JSON form and :func:`as_config`. Installing it on a
model is :mod:`memfit.step.run`'s job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch

__all__ = ["AUTOCAST_DTYPES", "OPTIMIZERS", "STATE_BITS", "StepConfig", "as_config", "autocast_name"]

OPTIMIZERS = ("adamw", "sgd", "lion")
STATE_BITS = (32, 8, 4)
# autocast's names for the dtypes it computes in, and the spellings accepted for them
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_AUTOCAST_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16"}


def autocast_name(value: Any) -> str | None:
    """``None``, ``"bf16"`` or ``"fp16"`` for an autocast setting: None, one of those
    names (also ``"bfloat16"``, ``"float16"``, ``"half"``) or ``torch.bfloat16`` /
    ``torch.float16``. Anything else raises ``ValueError``."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        for name, dt in AUTOCAST_DTYPES.items():
            if value == dt:
                return name
    elif isinstance(value, str) and value.lower() in _AUTOCAST_ALIASES:
        return _AUTOCAST_ALIASES[value.lower()]
    raise ValueError(
        f"autocast must be None, 'bf16', 'fp16', torch.bfloat16 or torch.float16, got {value!r}"
    )


@dataclass
class StepConfig:
    """How one training step runs, beyond forward and backward.

    Attributes:
        policy: memfit activation compression: None (plain autograd), a setting for
            every module (8, 4, 2 or ``"fp8"``, as ``memfit.activations(model, bits=...)``),
            or per-module rules ``{glob: setting}`` (modules no rule matches keep
            their tensors as they are; a ``""`` rule sets the root's default).
        checkpoint: qualified module names whose forward is recomputed in backward
            (``torch.utils.checkpoint``, non-reentrant), installed by wrapping each
            module's forward for the duration of :func:`apply`.
        optimizer: ``"adamw"``, ``"sgd"`` (momentum 0.9 unless ``optimizer_kwargs``
            says otherwise) or ``"lion"``.
        state_bits: 32 (torch's own ``torch.optim.AdamW``/``SGD``; Lion has no torch
            version: ``memfit.optim.Lion(state_bits=32)``), 8 or 4 (``memfit.optim.*``).
        optimizer_in_backward: update each parameter as soon as its gradient is
            accumulated (``register_post_accumulate_grad_hook``, one optimizer per
            parameter) and free that gradient at once, so all gradients never exist
            together. Incompatible with ``accumulation_steps > 1`` and
            ``max_grad_norm`` (both need every gradient before the update).
        accumulation_steps: micro-steps (forward + backward on the batch) per
            optimizer step; the loss is divided by it.
        max_grad_norm: clip the global gradient norm before the step (None: no clipping).
        optimizer_kwargs: extra keyword arguments for the optimizer (lr, betas, ...).
        activation_kwargs: extra keyword arguments for ``memfit.activations``
            (``head_bits``, ``min_bytes``, ``block_size``, ...).
        autocast: run each forward (the loss included) under ``torch.autocast`` in
            this dtype, on the model's device type: None (no autocast), ``"bf16"`` or
            ``"fp16"`` (``torch.bfloat16`` / ``torch.float16`` are accepted and stored
            by name). Backward runs outside it, as autocast recommends.
    """

    policy: Any = None
    checkpoint: tuple[str, ...] = ()
    optimizer: str = "adamw"
    state_bits: int = 32
    optimizer_in_backward: bool = False
    accumulation_steps: int = 1
    max_grad_norm: float | None = None
    optimizer_kwargs: dict = field(default_factory=dict)
    activation_kwargs: dict = field(default_factory=dict)
    autocast: str | None = None

    def __post_init__(self):
        self.autocast = autocast_name(self.autocast)
        if isinstance(self.checkpoint, str):
            self.checkpoint = (self.checkpoint,)
        self.checkpoint = tuple(self.checkpoint)
        if not all(isinstance(n, str) for n in self.checkpoint):
            raise TypeError(f"checkpoint must be module names (strings), got {self.checkpoint!r}")
        opt = str(self.optimizer).lower()
        if opt not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        self.optimizer = opt
        if isinstance(self.state_bits, bool) or self.state_bits not in STATE_BITS:
            raise ValueError(f"state_bits must be 32, 8 or 4, got {self.state_bits!r}")
        if isinstance(self.accumulation_steps, bool) or not isinstance(self.accumulation_steps, int) \
                or self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive int, got {self.accumulation_steps!r}")
        if self.max_grad_norm is not None and not float(self.max_grad_norm) > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.optimizer_in_backward:
            if self.accumulation_steps > 1:
                raise ValueError(
                    "optimizer_in_backward cannot accumulate gradients (accumulation_steps="
                    f"{self.accumulation_steps}): each parameter is updated as soon as its gradient exists"
                )
            if self.max_grad_norm is not None:
                raise ValueError(
                    "optimizer_in_backward cannot clip the global gradient norm (max_grad_norm="
                    f"{self.max_grad_norm}): all gradients never exist at once"
                )
        if self.policy is not None and not isinstance(self.policy, Mapping):
            from ..activations.policy import resolve_setting

            resolve_setting(self.policy, block_size=256, rounding="nearest", where="policy", offload_ok=True)
        self.optimizer_kwargs = dict(self.optimizer_kwargs or {})
        self.activation_kwargs = dict(self.activation_kwargs or {})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint"] = list(self.checkpoint)
        if isinstance(self.policy, Mapping):
            d["policy"] = dict(self.policy)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "StepConfig":
        d = dict(d)
        d["checkpoint"] = tuple(d.get("checkpoint", ()))
        return cls(**d)

    def describe(self) -> str:
        """A short label, e.g. ``adamw-8 act=4 ckpt=12 in-bwd``."""
        parts = [f"{self.optimizer}-{self.state_bits}"]
        if self.policy is not None:
            if isinstance(self.policy, Mapping):
                parts.append("act={" + ", ".join(f"{k}:{v}" for k, v in self.policy.items()) + "}")
            else:
                parts.append(f"act={self.policy}")
        if self.checkpoint:
            parts.append(f"ckpt={len(self.checkpoint)}")
        if self.optimizer_in_backward:
            parts.append("in-bwd")
        if self.accumulation_steps > 1:
            parts.append(f"accum={self.accumulation_steps}")
        if self.max_grad_norm is not None:
            parts.append(f"clip={self.max_grad_norm:g}")
        if self.autocast is not None:
            parts.append(f"autocast={self.autocast}")
        return " ".join(parts)


def as_config(
    config: StepConfig | None = None,
    *,
    optimizer: str = "adamw",
    state_bits: int = 32,
    policy: Any = None,
    checkpoint: Sequence[str] = (),
    optimizer_in_backward: bool = False,
    autocast: Any = None,
) -> StepConfig:
    """``config`` if given, else a StepConfig from the keyword arguments."""
    if config is not None:
        if not isinstance(config, StepConfig):
            raise TypeError(f"config must be a StepConfig, got {type(config).__name__}")
        return config
    return StepConfig(
        policy=policy, checkpoint=tuple(checkpoint), optimizer=optimizer, state_bits=state_bits,
        optimizer_in_backward=optimizer_in_backward, autocast=autocast,
    )

