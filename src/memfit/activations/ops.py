"""The op table: how a tensor is stored depends on the op that saves it.

Quantization error hurts some backward formulas far more than others. The table below
names those ops; every other saved tensor gets the module's format (the user's
``bits``). Each entry maps an op kind and the role of the saved tensor in it to a
:class:`Treatment`:

=============  ==========================================  ================================
op kind        ops                                         how their saved tensors are kept
=============  ==========================================  ================================
``sdpa``       ``F.scaled_dot_product_attention`` (fused   q, k: at least 8 bits (bf16 when
               kernels: flash, efficient, cuDNN; CPU and   the module's format is 8 bits or
               CUDA)                                       fp8); v: one step up (2 -> 4,
                                                           4 -> 8 bits);
                                                           the output and logsumexp: not
                                                           stored, recomputed in backward
                                                           from the decoded q, k, v; on
                                                           autocast's copies: all exact;
                                                           the math backend: q, k, v as
                                                           above and the probabilities as
                                                           q and k; with dropout (any
                                                           kernel): the call runs as
                                                           RecomputedAttention, which
                                                           stores q, k, v as above and
                                                           nothing else, and recomputes
                                                           the rest in backward with the
                                                           forward's dropout mask
``matmul``     ``torch.matmul``, ``@``, ``torch.bmm`` of   attention written as plain ops
               two activations (with a weight operand:     (HF's eager attention): the
               ``linear``)                                 scores' operands (q, kᵀ:
                                                           matrices, not a matrix times
                                                           a vector) as fused q and k;
                                                           when the first operand comes
                                                           from a softmax (probabilities
                                                           @ v): it as q and k, v one
                                                           step up
``linear``     ``F.linear``; ``torch.addmm``,              the input: at least 4 bits
               ``torch.mm`` and ``matmul`` with a weight   (4 at 2; the module's format
               operand (``nn.Linear``, GPT-2's             at 4 and 8 bits and fp8)
               ``Conv1D``)
``softmax``    ``F.softmax``, ``torch.softmax``,           the output: as fused q and k
               ``Tensor.softmax``
``relu``       ``F.relu``, ``torch.relu(_)``,              a 1-bit mask of ``x > 0``
               ``Tensor.relu(_)``, ``nn.ReLU``
``hardtanh``   ``F.hardtanh``, ``F.relu6``, ``nn.ReLU6``,  a 1-bit mask of
               ``nn.Hardtanh``                             ``min < x < max`` (0 and 6 for
                                                           ReLU6)
``leaky_relu`` ``F.leaky_relu``, ``nn.LeakyReLU``          a 1-bit mask of ``x > 0``
``threshold``  ``F.threshold``, ``nn.Threshold``           a 1-bit mask of ``x > threshold``
``gelu``       ``F.gelu``, ``nn.GELU`` (exact and tanh);   at 4 and 2 bits: a few-bit
               HF activation modules written as            derivative (the level of
               formulas (``NewGELUActivation``: GPT-2's    ``f'(x)``, decoded to an ``x``
               ``gelu_new``; ``FastGELUActivation``,       with that derivative); at 8
               ``AccurateGELUActivation``,                 bits: the module's format; a
               ``QuickGELUActivation``, and the Python     formula module: its input so,
               variants of ``GELUActivation`` and          and the tensors its plain ops
               ``GELUTanh``)                               save not stored, recomputed in
                                                           backward from that input
``silu``       ``F.silu``, ``nn.SiLU``                     as ``gelu``
``norm``       ``F.layer_norm``, ``F.rms_norm``, and the    the input: one step up (at
               plain ops inside a norm module (class name  least 4 bits for
               ending in ``Norm`` or ``NormGated``: HF's   ``F.group_norm``,
               ``LlamaRMSNorm``, ``T5LayerNorm``,          ``F.batch_norm``,
               ``Gemma2RMSNorm``) outside the ops above;   ``F.instance_norm``); the
               ``F.group_norm``, ``F.batch_norm``,         statistics (mean, rstd): exact
               ``F.instance_norm``                         (composed norms: the input is
                                                           what is saved before the first
                                                           statistic, a tensor with a
                                                           dimension of 1 after the first
                                                           and fewer elements than the
                                                           input; the normalised values
                                                           after it keep the module's
                                                           format)
=============  ==========================================  ================================

Why:

* **Fused attention** rebuilds the probabilities in backward as ``exp(q kᵀ - lse)``
  with the saved logsumexp, and uses ``rowsum(dO * O)`` with the saved output. With
  q and k quantized but the logsumexp exact, the rebuilt softmax is no longer
  normalised and the error grows with ``|q kᵀ|``; with v quantized but the output
  exact, ``rowsum(dO * O)`` no longer matches the rebuilt ``dO vᵀ``. So the engine
  stores q, k (precisely: a small error in them moves sharp softmaxes a lot) and v,
  and stores nothing for the output and logsumexp: when backward asks for them, they
  are computed again from the decoded q, k, v (one attention forward, without grad,
  per call; :func:`consistent_attention`). The backward is then the exact gradient at
  the decoded inputs, like an explicit softmax without its quantized probabilities.
  v's error reaches q and k through ``dO vᵀ`` and the softmax's backward, which sharp
  attention amplifies: at the module's bits it dominated (at 2 bits, and at 4 bits
  on the zoo's ViT, Qwen3 and T5), so v gets one step more: 4 bits at 2, 8 at 4.
  Measured figures are in ``docs/guide-plain.md`` ("Op-aware formats").
* **Attention with dropout** (training: on CPU SDPA then runs as composed ops, which
  keep the probabilities, the dropout's noise and the dropped probabilities, the
  largest tensors of the model; on CUDA a fused kernel whose mask cannot be redrawn
  from its saved tensors) runs as
  :class:`~memfit.activations.dropout_attention.RecomputedAttention`: like
  ``torch.utils.checkpoint`` around the one call, it records the RNG state, stores
  q, k and v as a fused call's, and in backward runs the call again on the decoded
  inputs with that RNG state, so the backward is exact at the decoded inputs with the
  forward's own mask, and nothing of size ``B·H·L·S`` is stored. ``stats`` count
  what plain autograd would have kept for the call as its original bytes.
* **Attention written as plain ops** (``softmax(q kᵀ) v``, HF's eager attention,
  which Gemma2's logit soft-capping selects) has no recompute to lean on: its
  backward uses the probabilities and the operands of the scores as stored. So the
  table stores them as SDPA's math backend stores its own copies: the scores'
  operands and the probabilities as fused q and k (8-bit codes, bf16 at 8-bit
  settings: small probabilities have no precision left in 8-bit block codes), v one
  step up. A product of two
  activations is recognised as attention; which operand is v is told by the other
  coming from a softmax (its autograd node, through at most three ops such as
  dropout or a cast); a matrix-vector product (a recurrent scan's state times a
  vector, per step) is not one. A softmax elsewhere (a router, a loss) keeps its
  output as precisely too; those outputs are small next to attention's.
* **Products with a weight** (``linear``): their saved input feeds only the weight's
  gradient, ``dW = dYᵀ X``, and stochastic rounding keeps that unbiased; but its
  relative error is X's, and with 2-bit codes every weight matrix gets a gradient
  that is off by most of its own size at every step. Adam divides each step by the
  root of its second moment, which that noise inflates, so the weights move less than
  they should: fine-tuning the real all-MiniLM-L6-v2, 2-bit codes of these inputs
  alone cost most of the gap of the final loss to fp32, and a Hadamard rotation,
  nearest rounding or 3-bit codes of them close too little of it (figures in
  ``docs/guide-plain.md``, "2 bits on a real fine-tune"). So they take at least 4
  bits; at 2 bits the rest of the model (the activation functions' derivatives,
  dropout, the norms' normalised values, attention's v) still gets 2.
  ``{"op:linear": 2}`` restores the smaller, noisier layout.
* **ReLU-like ops**: the backward needs only which side of the kink each element was
  on, so a 1-bit mask is lossless for the gradient and smaller than any code. The
  mask decodes to values on the same side (ReLU: 1 and 0; hardtanh: the midpoint and
  ``max + 1``), so the op's own backward runs unchanged. The same storage is often
  also saved by the next op (a linear's input) which needs the real values: masks and
  values are different representations and are never shared (see the engine).
* **GELU and SiLU** save their input only for ``f'(x)``. Storing which of ``2**bits``
  derivative levels each element is nearest to (:mod:`memfit.activations.fewbit`)
  gives a 4 to 5 times smaller gradient error than codes of ``x`` at the same bits
  (figures in ``docs/guide-plain.md``). Activations written as elementwise formulas
  (GPT-2's ``gelu_new``, ``0.5 x (1 + tanh(c (x + 0.044715 x³)))``) save four tensors
  of the input's size through their plain ops, for a backward that needs only
  ``f'(x)``. A module whose class is one of Hugging Face's formula GELUs
  (:data:`COMPOSED_ACTIVATIONS`, by class name; no parameters, buffers or submodules)
  is one ``gelu`` call (:class:`ComposedActivationCall`): the engine stores its input
  once, as a ``gelu`` call's input, stores nothing for the four, and the first time
  backward asks for one runs the module's forward again on the decoded input (like
  ``torch.utils.checkpoint`` around the one module), so the formula's own backward
  gives ``f'`` at the decoded input, that is the level. It costs one elementwise
  forward per call in backward and saves three to four tensors' codes. ``tanh`` and
  ``sigmoid`` on their own save their output, which the next op usually saves too;
  they keep the module's format.
* **Normalisation statistics** are small and their errors scale every element of the
  row. The norm's **input** gets one step more than the module (4 bits at 2, 8 at
  4; CNNs' batch, group and instance norms, whose inputs are the largest tensors of a
  convolutional network and where 4 bits measured fine, at least 4 bits): its backward normalises the decoded input with the exact statistics, and at 2
  bits the two disagree enough to blow the gradient up on pretrained weights (the real all-MiniLM-L6-v2's post-LN residual
  stream; figures in ``docs/guide-plain.md``). Most HF decoders write their RMSNorm as
  plain ops (``x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``), which no entry
  above sees; the ops inside a module whose class name says it is a norm are treated
  as one ``norm`` call (:class:`ComposedNormCall`), so the rule holds for them too,
  with no per-architecture code. The normalised values such a module saves for its
  weight's gradient keep the module's format: only the weight's gradient sees them,
  summed over every row. The backward is sensitive to the input where the incoming
  gradient lies mostly along the normalised input, which the backward removes: the
  error of the decoded input does not cancel with it (figures in
  ``docs/guide-plain.md``). Recomputing the statistics from the decoded input does
  not remove that error (it is first order in the input's error either way).

The table never makes a tensor less precise than the module's format: "at least 8
bits" is 8 bits when the module's format is 4 or 2 bits, the module's format when it
is 8 bits or fp8, and exact when the module keeps tensors (``None``); "one step up"
is 4 bits at 2, 8 bits at 4, and the module's format at 8 bits or fp8. Masks apply only
when the module's format is lossy.

How ops are seen: while the engine is active, a ``TorchFunctionMode`` notes which of
the functions above is running (an O(1) dict lookup per torch call). A function called
from inside another overridable Python function (``F.multi_head_attention_forward``
calling attention) is attributed to the outer one, which the table does not name.
Inside ``torch.compile``'d code the table does not apply: compiled graphs save their
tensors at run time, outside any op.

Users override the table per op kind with policy keys ``"op:<kind>"``, e.g.
``policy={"op:sdpa": None}`` (keep attention's tensors exact) or ``{"op:relu": 4}``
(4-bit codes instead of masks). The value is a setting as for ``bits``; it replaces the
table's entry for every tensor that op saves, in every module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .dropout_attention import recomputed_attention

#: Prefix of policy keys that name op kinds.
OP_PREFIX = "op:"


@dataclass(frozen=True)
class Treatment:
    """How one saved tensor of a table op is stored.

    ``how`` is ``"default"`` (the module's format), ``"precise"`` (8-bit codes below
    8 bits, bf16 at 8 bits and fp8), ``"step_up"`` (2 -> 4, 4 -> 8 bits),
    ``"at_least_4"``, ``"exact"`` or
    ``"mask"`` or ``"fewbit"``; for masks, ``predicate(t) -> bool tensor`` and the two
    values a true and a false element decode to (checked at encode time to satisfy
    the predicate in the tensor's dtype; otherwise the module's format is used); for
    few-bit derivatives, the ``function`` (see :mod:`memfit.activations.fewbit`).
    """

    how: str
    predicate: Callable[[torch.Tensor], torch.Tensor] | None = None
    true_value: float = 1.0
    false_value: float = 0.0
    function: str | None = None  # for "fewbit": a name in memfit.activations.fewbit.FUNCTIONS


DEFAULT = Treatment("default")
AT_LEAST_4 = Treatment("at_least_4")
#: As fused attention's q and k: 8-bit codes below 8 bits, bf16 at 8 bits and fp8.
PRECISE = Treatment("precise")
#: One step more precise than the module's integer codes: 2 -> 4, 4 -> 8 bits.
STEP_UP = Treatment("step_up")
EXACT = Treatment("exact")
#: Fused attention: q, k and v take the module's format; the output and logsumexp are
#: replaced by those of the attention at the decoded q, k, v (:func:`consistent_attention`).
SDPA_INPUT = Treatment("sdpa_input")
#: The math backend's copies of q and k, and its v (see :func:`_sdpa_math`).
SDPA_QK = Treatment("sdpa_qk")
SDPA_V = Treatment("sdpa_v")
SDPA_OUT = Treatment("sdpa_out")
SDPA_LSE = Treatment("sdpa_lse")


class OpCall:
    """One running call of a table op: its kind, and enough of its arguments to give
    each saved tensor its role (:meth:`treatment`)."""

    __slots__ = ("kind", "_treater", "args", "kwargs", "_inputs", "fused", "broken", "saved", "recomputed",
                 "plain_saved")

    def __init__(self, kind: str, treater: "Treater", args: tuple, kwargs: dict):
        self.kind = kind
        self._treater = treater
        self.args = args
        self.kwargs = kwargs
        self._inputs: dict[tuple, list[str]] | None = None
        # Fused attention only: which kernel runs, the packed q, k, v (by role), their
        # recomputed output and logsumexp, and whether the save order defeated that.
        self.fused: str | None = None
        self.broken = False
        self.saved: dict[str, object] = {}
        self.recomputed: object | None = None  # the engine's recompute, shared by output and lse
        # RecomputedAttention only: which of its inputs' storages plain autograd saves
        self.plain_saved: frozenset[int] = frozenset()

    def _arg(self, i: int, name: str, default: Any = None) -> Any:
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def treatment(self, t: torch.Tensor) -> Treatment:
        return self._treater(self, t)

    def input(self, role: str) -> torch.Tensor | None:
        """The argument of role ``role`` (``"q"``, ``"k"``, ``"v"`` or ``"input"``)."""
        names = _ROLES[self.kind] if self.kind in _ROLES else _ROLES[None]
        for i, (name, param) in enumerate(names):
            if name == role:
                a = self._arg(i, param)
                return a if isinstance(a, torch.Tensor) else None
        return None

    def roles(self, t: torch.Tensor) -> list[str]:
        """The arguments ``t`` is (``"q"``, ``"k"``, ``"v"``, ``"input"``), matched by
        storage position and geometry; empty for anything else (outputs, statistics)."""
        if self._inputs is None:
            self._inputs = {}
            names = _ROLES[self.kind] if self.kind in _ROLES else _ROLES[None]
            for i, (role, param) in enumerate(names):
                a = self._arg(i, param)
                if isinstance(a, torch.Tensor):
                    self._inputs.setdefault(_geometry(a), []).append(role)
        return self._inputs.get(_geometry(t), [])

    def role(self, t: torch.Tensor) -> str | None:
        """The first of :meth:`roles`, or None."""
        found = self.roles(t)
        return found[0] if found else None


_ROLES = {"sdpa": (("q", "query"), ("k", "key"), ("v", "value")), None: (("input", "input"),)}


def _geometry(t: torch.Tensor) -> tuple:
    # the storage's _cdata, not data_ptr(): FakeTensors (memory estimates) have none
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


# --------------------------------------------------------------------------- per kind


def _sdpa(call: OpCall, t: torch.Tensor) -> Treatment:
    if call.fused is None:
        call.fused = _fused_kind(call)
    if call.fused == "recompute":
        # RecomputedAttention saves q, k, v and the mask, nothing else
        role = call.role(t)
        if role in ("q", "k"):
            return SDPA_QK
        return SDPA_V if role == "v" else EXACT
    if call.fused == "math":
        return _sdpa_math(call, t)
    if call.fused == "exact" or call.broken:
        return EXACT
    if call.role(t) is not None:
        return SDPA_INPUT
    q, v = call._arg(0, "query"), call._arg(2, "value")
    if t.is_floating_point() and t.dim() < q.dim():
        return SDPA_LSE
    if tuple(t.shape) == tuple(q.shape[:-1]) + (v.shape[-1],):
        return SDPA_OUT
    return EXACT  # seeds, offsets


def _sdpa_math(call: OpCall, t: torch.Tensor) -> Treatment:
    """The math backend's composed ops save scaled copies and views of q and k (for
    the score matmul), the probabilities and v. Without dropout (a float mask that
    requires grad, as T5's learned position bias, sends SDPA here) the copies of q
    and k get the precision of a fused call's q and k, v that of its v, and the
    probabilities that of q and k. With dropout the call normally runs as
    RecomputedAttention instead; when it cannot (arguments it does not know), the
    copies of q and k get at least 4 bits, v that of a fused call's v, and the
    probabilities, the largest tensors, the module's format."""
    q, k, v = call._arg(0, "query"), call._arg(1, "key"), call._arg(2, "value")
    dropout = float(call._arg(4, "dropout_p", 0.0)) > 0.0
    if t.untyped_storage()._cdata == v.untyped_storage()._cdata:
        return SDPA_V  # v or a view of it
    if t.is_floating_point() and t.numel() in (q.numel(), k.numel()):
        return AT_LEAST_4 if dropout else SDPA_QK
    if t.is_floating_point() and not dropout:
        return PRECISE  # the probabilities
    return DEFAULT


def _fused_kind(call: OpCall) -> str:
    """``"math"`` when SDPA runs as composed ops, ``"fused"`` for a fused kernel whose
    output and logsumexp can be recomputed from the decoded inputs, ``"exact"`` when
    they cannot (dropout in a fused kernel, or inputs that autocast copies)."""
    q, k, v = call._arg(0, "query"), call._arg(1, "key"), call._arg(2, "value")
    mask = call._arg(3, "attn_mask")
    dropout = float(call._arg(4, "dropout_p", 0.0))
    causal = bool(call._arg(5, "is_causal", False))
    device = q.device.type
    cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if cast is not None and any(t.dtype is not cast for t in (q, k, v)):
        # Autocast runs attention on copies in its dtype: probe the kernel choice for
        # those (empty stand-ins of the same layout, nothing is copied).
        q, k, v = (torch.empty_strided(t.shape, t.stride(), dtype=cast, device=t.device) for t in (q, k, v))
    try:
        choice = int(torch._fused_sdp_choice(
            q, k, v, mask, dropout, causal, scale=call.kwargs.get("scale"),
            enable_gqa=bool(call.kwargs.get("enable_gqa", False)),
        ))
    except Exception:  # an unknown backend or an older torch: keep everything exact
        return "exact"
    if choice == 0:
        return "math"
    if dropout > 0 or (cast is not None and any(call._arg(i, n).dtype is not cast
                                                 for i, n in enumerate(("query", "key", "value")))):
        # A fused kernel's dropout mask cannot be redrawn from its saved tensors (such
        # calls normally run as RecomputedAttention, which redraws it from the RNG
        # state); autocast's copies cannot be told apart from the output by their
        # geometry: keep this call's tensors exact.
        return "exact"
    return "fused"


@dataclass(frozen=True)
class AttentionParams:
    """What an attention call needs, besides q, k and v, to be computed again."""

    mask: torch.Tensor | None
    causal: bool
    scale: float | None
    gqa: bool

    @classmethod
    def of(cls, call: "OpCall") -> "AttentionParams":
        return cls(call._arg(3, "attn_mask"), bool(call._arg(5, "is_causal", False)),
                   call.kwargs.get("scale"), bool(call.kwargs.get("enable_gqa", False)))


def consistent_attention(params: AttentionParams, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and logsumexp of the attention ``params`` describe, at ``q``, ``k``,
    ``v`` (the decoded inputs): what a fused backward must be given so that the
    softmax it rebuilds, ``exp(q kᵀ scale - lse)``, is normalised and matches
    ``rowsum(dO * O)``. The engine calls it in backward, when the kernel's backward
    asks for its saved output. The logsumexp is taken row chunk by row chunk, so no
    more than about 1 MB of fp32 scores exist at once."""
    mask, causal, scale, gqa = params.mask, params.causal, params.scale, params.gqa
    # Autocast would run the score matmul below in bf16/fp16: the logsumexp must be
    # computed as precisely as the kernel's own (fp32), and the attention itself
    # runs on the decoded tensors' dtype, as the original call did after its casts.
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        kwargs = {"scale": scale} if scale is not None else {}
        if gqa:
            kwargs["enable_gqa"] = True
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **kwargs)
        if gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        factor = scale if scale is not None else q.shape[-1] ** -0.5
        L, S = q.shape[-2], k.shape[-2]
        rows = max(1, (1 << 18) // max(1, S * (q.numel() // (L * q.shape[-1]))))
        kt = k.transpose(-1, -2).to(torch.float32)
        parts = []
        for r0 in range(0, L, rows):
            r1 = min(L, r0 + rows)
            s = (q[..., r0:r1, :].to(torch.float32) @ kt) * factor
            if mask is not None:
                m = mask[..., r0:r1, :] if mask.dim() >= 2 and mask.shape[-2] == L else mask
                s = s.masked_fill(~m, float("-inf")) if m.dtype is torch.bool else s + m
            if causal:
                keep = torch.ones(r1 - r0, S, dtype=torch.bool, device=s.device).tril(r0)
                s = s.masked_fill(~keep, float("-inf"))
            parts.append(s.logsumexp(-1))
        lse = torch.cat(parts, dim=-1)
    return out, lse


def _relu(call: OpCall, t: torch.Tensor) -> Treatment:
    return Treatment("mask", _positive, 1.0, 0.0)


def _leaky_relu(call: OpCall, t: torch.Tensor) -> Treatment:
    return Treatment("mask", _positive, 1.0, -1.0)


def _positive(t: torch.Tensor) -> torch.Tensor:
    return t > 0


def _hardtanh(call: OpCall, t: torch.Tensor) -> Treatment:
    lo = float(call._arg(1, "min_val", -1.0))
    hi = float(call._arg(2, "max_val", 1.0))
    return Treatment("mask", lambda x: (x > lo) & (x < hi), (lo + hi) / 2, hi + max(1.0, abs(hi)))


def _relu6(call: OpCall, t: torch.Tensor) -> Treatment:
    return Treatment("mask", lambda x: (x > 0.0) & (x < 6.0), 3.0, 7.0)


def _threshold(call: OpCall, t: torch.Tensor) -> Treatment:
    th = float(call._arg(1, "threshold", 0.0))
    return Treatment("mask", lambda x: x > th, th + max(1.0, abs(th)), th)


def _gelu(call: OpCall, t: torch.Tensor) -> Treatment:
    approximate = call._arg(1, "approximate", "none")
    return Treatment("fewbit", function="gelu_tanh" if approximate == "tanh" else "gelu")


def _silu(call: OpCall, t: torch.Tensor) -> Treatment:
    return Treatment("fewbit", function="silu")


def _norm(call: OpCall, t: torch.Tensor) -> Treatment:
    return STEP_UP if call.role(t) == "input" else EXACT


def _batch_norm(call: OpCall, t: torch.Tensor) -> Treatment:
    return AT_LEAST_4 if call.role(t) == "input" else EXACT


class ComposedNormCall(OpCall):
    """One call of a norm module written as plain ops (:func:`is_norm_module`), seen
    as one ``norm`` op: what it saves before its first per-row statistic, and any later
    save of the same storages, is its input; what it saves after (the normalised
    values, kept for the weight's gradient) is not."""

    __slots__ = ("_input_storages", "_input_numel", "_after_statistics")

    def __init__(self) -> None:
        super().__init__("norm", _composed_norm, (), {})
        self._input_storages: set[int] = set()
        self._input_numel = 0
        self._after_statistics = False


def _composed_norm(call: ComposedNormCall, t: torch.Tensor) -> Treatment:
    if 1 in t.shape[1:] and (call._input_numel == 0 or t.numel() < call._input_numel):
        # mean(-1, keepdim=True) and rsqrt of it (or over channels, [N, 1, H, W]):
        # per-row statistics
        call._after_statistics = True
        return EXACT
    storage = t.untyped_storage()._cdata
    if not call._after_statistics or storage in call._input_storages:
        call._input_storages.add(storage)
        call._input_numel = max(call._input_numel, t.numel())
        return STEP_UP
    return DEFAULT


def is_norm_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer by its class name: one ending with
    ``Norm`` (``LlamaRMSNorm``, ``T5LayerNorm``, ``Gemma2RMSNorm``) or ``NormGated``."""
    name = type(module).__name__.lower()
    return name.endswith("norm") or name.endswith("normgated")


#: Activation modules written as elementwise formulas (Hugging Face's), by class name,
#: and the function whose few-bit derivative stands for them. GELUActivation and
#: GELUTanh count only when they run their Python formula: with ``F.gelu`` inside,
#: the ``gelu`` entry sees that call.
COMPOSED_ACTIVATIONS = {
    "NewGELUActivation": "gelu_tanh",  # GPT-2's gelu_new (also GPT-J, CodeGen, Phi, T5 v1.1)
    "FastGELUActivation": "gelu_tanh",
    "AccurateGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "GELUActivation": "gelu",
    "QuickGELUActivation": "quick_gelu",  # CLIP's
}


def composed_activation(module: torch.nn.Module) -> str | None:
    """The few-bit function of an activation module written as an elementwise formula
    (:data:`COMPOSED_ACTIVATIONS`), or None: matched by class name, with no parameters,
    buffers or submodules (a pure function of its input)."""
    function = COMPOSED_ACTIVATIONS.get(type(module).__name__)
    if function is None:
        return None
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()) \
            or any(True for _ in module.children()):
        return None
    return function


class ComposedActivationCall(OpCall):
    """One call of an activation module written as an elementwise formula (GPT-2's
    ``gelu_new``: ``0.5 x (1 + tanh(c (x + 0.044715 x³)))``), seen as one ``gelu`` op.
    Its plain ops save four tensors of the input's size for a backward that needs only
    ``f'(x)``; the engine stores the input once, as a ``gelu`` call's (the few-bit
    derivative), and the four as nothing: the first time backward asks for one, the
    module's forward runs again on the decoded input (:meth:`ActivationCompressor.
    _pack_composed_activation`), so its ops' backward gives ``f'`` at the decoded input."""

    __slots__ = ("module", "function", "x", "state")

    def __init__(self, module: torch.nn.Module, function: str, x: torch.Tensor | None) -> None:
        super().__init__("gelu", _composed_activation, (), {})
        self.module = module
        self.function = function
        self.x = x  # the module's input; None when it has none to recompute from
        self.state: object | None = None  # the engine's recompute, once the first tensor is saved


def _composed_activation(call: ComposedActivationCall, t: torch.Tensor) -> Treatment:
    return Treatment("fewbit", function=call.function)


def _matmul(call: OpCall, t: torch.Tensor) -> Treatment:
    """A product of two activations (one with a weight is :func:`_linear`'s, see
    :class:`OpTracker`): attention written as plain ops. ``softmax(q kᵀ) v`` saves q
    and kᵀ for the scores, the probabilities and v for the output: the scores' operands
    and the probabilities as fused q and k, v one step up, as in SDPA's math backend
    (:func:`_sdpa_math`)."""
    a, b = call._arg(0, "input"), call._arg(1, "other")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return DEFAULT
    if not _from_softmax(a):
        # q kᵀ: a product of matrices; a matrix-vector product (a recurrent scan's
        # state times a vector, per step) is no attention score
        matrices = a.dim() >= 2 and b.dim() >= 2 and a.shape[-2] > 1 and b.shape[-1] > 1
        return PRECISE if matrices else DEFAULT
    storage = t.untyped_storage()._cdata
    if storage == b.untyped_storage()._cdata or (storage != a.untyped_storage()._cdata
                                                 and t.numel() == b.numel() != a.numel()):
        return STEP_UP  # v
    return PRECISE  # the probabilities (or a copy matmul made of them)


def _linear(call: OpCall, t: torch.Tensor) -> Treatment:
    """A product with a weight: its saved input (for the weight's gradient) takes at
    least 4 bits."""
    return AT_LEAST_4


_ADDMM = (torch.addmm, torch.Tensor.addmm)


def _has_weight_operand(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether a product's matrices include a weight (a leaf that requires grad, or a
    view of one: ``x @ W.T``); an ``addmm``'s bias does not count."""
    addmm = func in _ADDMM
    matrices = list(args[1:3] if addmm else args[:2])
    matrices += [kwargs[k] for k in (("mat1", "mat2") if addmm else ("input", "other")) if k in kwargs]
    return any(isinstance(a, torch.Tensor) and _is_weight(a) for a in matrices)


def _is_weight(t: torch.Tensor) -> bool:
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


def _from_softmax(t: torch.Tensor, depth: int = 3) -> bool:
    """Whether ``t`` is a softmax's output, or one of up to ``depth`` ops after it
    (dropout, a dtype cast, a reshape)."""
    fn = t.grad_fn
    for _ in range(depth + 1):
        if fn is None:
            return False
        if "Softmax" in type(fn).__name__:
            return True
        nexts = [n for n, _ in fn.next_functions if n is not None]
        fn = nexts[0] if nexts else None
    return False


def _softmax(call: OpCall, t: torch.Tensor) -> Treatment:
    return PRECISE


Treater = Callable[["OpCall", torch.Tensor], Treatment]


def _functions() -> dict[Callable, tuple[str, Treater]]:
    table: dict[Callable, tuple[str, Treater]] = {F.scaled_dot_product_attention: ("sdpa", _sdpa)}
    for f in (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_):
        table[f] = ("relu", _relu)
    table[F.relu6] = ("hardtanh", _relu6)  # hardtanh on [0, 6], without min/max arguments
    for f in (F.hardtanh, F.hardtanh_):
        table[f] = ("hardtanh", _hardtanh)
    for f in (F.leaky_relu, getattr(F, "leaky_relu_", None)):
        if f is not None:
            table[f] = ("leaky_relu", _leaky_relu)
    for f in (F.threshold, F.threshold_, torch.threshold, getattr(torch, "threshold_", None)):
        if f is not None:
            table[f] = ("threshold", _threshold)
    for f in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm):
        table[f] = ("matmul", _matmul)
    for f in (F.linear, torch.addmm, torch.Tensor.addmm, torch.mm, torch.Tensor.mm):
        table[f] = ("linear", _linear)
    for f in (F.softmax, torch.softmax, torch.Tensor.softmax):
        table[f] = ("softmax", _softmax)
    table[F.gelu] = ("gelu", _gelu)
    table[F.silu] = ("silu", _silu)
    for f in (F.layer_norm, getattr(F, "rms_norm", None)):
        if f is not None:
            table[f] = ("norm", _norm)
    for f in (F.group_norm, F.batch_norm, F.instance_norm):
        table[f] = ("norm", _batch_norm)
    return table


_KIND_OF: dict[Callable, tuple[str, Treater]] = _functions()
_LINEAR: tuple[str, Treater] = ("linear", _linear)

#: The op kinds a policy may name with ``"op:<kind>"``.
OP_KINDS: tuple[str, ...] = tuple(sorted({kind for kind, _ in _KIND_OF.values()}))


def check_kind(kind: str, where: str) -> None:
    """Raise ValueError unless ``kind`` is in :data:`OP_KINDS`."""
    if kind not in OP_KINDS:
        raise ValueError(f"{where}: unknown op kind {kind!r}; known kinds: {', '.join(OP_KINDS)}")


class OpTracker(TorchFunctionMode):
    """Notes which table op is running, so the pack hook can ask :attr:`current`.

    Only the outermost overridable call is seen (a ``TorchFunctionMode`` is not
    re-entered inside its own handler), which is what the table wants: ``F.relu6`` is
    one op even though it calls ``hardtanh`` inside.
    """

    def __init__(self, recompute_dropout: Callable[[], Callable[[int], None] | None] | None = None) -> None:
        super().__init__()
        self.current: OpCall | None = None
        # Asked at each attention call: None to run it as plain, or (where the format
        # is lossy) where to report the bytes plain autograd would have saved, and the
        # call runs as RecomputedAttention if it has dropout (see .dropout_attention).
        self._recompute_dropout = recompute_dropout

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        entry = _KIND_OF.get(func)
        if entry is None or torch.compiler.is_compiling():
            # (a compiled graph saves its own tensors, at run time, outside any op)
            return func(*args, **kwargs)
        if entry[0] in ("matmul", "linear") and func is not F.linear:
            # A product is a linear layer when one operand is a weight (x @ W.T, GPT-2's
            # addmm); torch.mm / addmm of two activations are no table op.
            if _has_weight_operand(func, args, kwargs):
                entry = _LINEAR
            elif entry[0] == "linear":
                return func(*args, **kwargs)
        previous = self.current
        self.current = OpCall(entry[0], entry[1], args, kwargs)
        try:
            if entry[0] == "sdpa":
                report = self._recompute_dropout() if self._recompute_dropout is not None else None
                if report is not None:
                    self.current.fused = "recompute"
                    out = recomputed_attention(args, kwargs, report)
                    if out is not None:
                        return out
                # Decided before the call: inside it, autocast has already cast the
                # inputs and no longer reports itself as enabled.
                self.current.fused = _fused_kind(self.current)
            return func(*args, **kwargs)
        finally:
            self.current = previous
