"""The saved-tensor engine: compress what autograd keeps for backward, on any model.

How it works
------------
Inside ``with memfit.activations(...)`` every tensor that autograd saves for the
backward pass goes through :meth:`ActivationCompressor._pack` (a
``torch.autograd.graph.saved_tensors_hooks`` pack hook), and comes back through
:meth:`ActivationCompressor._unpack` when backward needs it. Nothing about the model
changes: no module is swapped, so HF transformers, CNNs and hand-written code all
work, including ``F.*`` calls that module-swapping tools miss.

What each saved tensor becomes (what it *is* is decided once, for every pack hook of
memfit, by :func:`memfit.activations.saved.classify`):

* parameters, views of parameters and other leaves that require grad, and dtype
  casts of them (autocast's weight copies, which its cache holds anyway): kept by
  reference (they are alive anyway, a copy would only cost memory);
* tensors autograd cannot re-encode (integer, complex, sparse, quantized, nested,
  tensor subclasses such as DTensor) and tensors under ``min_bytes``: kept as is;
* bool tensors (dropout and ReLU masks): packed losslessly to 1 bit per element;
* float tensors: the format of the module that saved them (8/4/2-bit block-wise
  integer codes, fp8, or kept; integer codes of a tensor with a few outlier channels
  are coded per-channel scaled, see :func:`_channels`), unless the op that
  saves them is in the op table
  (:mod:`memfit.activations.ops`: fused attention, ReLU-like ops, normalisation
  statistics), which says how that op's tensors are stored;
* tensors saved by the plain ops of an activation module written as a formula
  (GPT-2's ``gelu_new``; :class:`~memfit.activations.ops.ComposedActivationCall`):
  nothing; the module's input is stored once, and backward runs the module's forward
  again on it (:meth:`ActivationCompressor._pack_composed_activation`, whose rules
  say how);
* heavy-tailed tensors: one coded at 2 or 4 bits whose predicted rounding error is
  more than :data:`STEP_UP_ERROR` times a Gaussian tensor's at that width (a product
  of activations) is coded again one step up, 4 or 8 bits (``adaptive=False`` turns
  this off); stats count it as ``stepped-up`` and its bytes in ``stepped_up_bytes``.
  The check reads at most 2048 blocks of the tensor (1024 evenly spaced ones of a
  larger tensor) and their scales; a stepped-up tensor is encoded twice.

Rounding noise comes from one stream per compressor, seeded by ``seed``;
:meth:`ActivationCompressor.state_dict` saves its position so a resumed run draws the
same noise as an uninterrupted one.

The loss head stays precise. Tensors saved after the model's last block has run (the
final norm, the output projection, the loss; the blocks are the largest
``nn.ModuleList``, see :func:`~memfit.activations.policy.main_blocks`) get
``head_bits``, 8 by default when ``bits`` is below 8. Their errors reach every layer
through the loss gradient: on the demo's GPT, 2 bits everywhere ends 18% above fp32,
2 bits with an 8-bit head 0.8%, for a few percent of the memory. Modules a policy rule
names keep that rule.

A saved tensor is attributed to the innermost module of ``model`` running when it is
saved (without a model there are no modules: everything gets ``bits``). Several ops
often save the same storage (a linear's input is the previous op's output; q, k and
v are strided views of one projection). Plain autograd keeps such a storage once,
and so does memfit, per representation (codes of one format, or a mask):

* a view of every element of its storage (the tensor itself, a transpose) encodes
  the whole storage once; later saves of any view of it reuse that encoding, and
  unpack rebuilds each view with ``as_strided`` over one shared decoded buffer;
* a view of part of a storage (q of a fused projection, a slice) encodes only its own
  elements, so elements that no op saved never share a quantization block with saved
  ones (they may hold anything, even values near the float limits); the same view
  saved again reuses it.

A mask and codes of the same storage are different representations: a ReLU's mask
never stands in for the values the next linear needs.

Modifying a saved tensor in place before backward raises the same ``RuntimeError``
as plain PyTorch. Hooks normally disable that check, so the engine keeps, per saved
tensor, an empty tensor that shares the original's version counter but not its
memory, and compares versions on unpack.

Under torch.distributed (DDP, FSDP2) each rank compresses its own activations, and
:attr:`ActivationCompressor.stats` describe that rank's. The rank is mixed into the
rounding seed (rank 0 keeps ``seed``'s own stream, as a single process), so ranks draw
independent rounding noise: with one stream on every rank, two ranks' errors on
same-shaped tensors are correlated (about 0.5 at 8 bits) and the noise of the averaged
gradient would shrink by far less than the number of ranks. FSDP2's unsharded
parameters are leaves that require grad, so they are kept by reference (FSDP2 frees
and re-gathers their storage between forward and backward; the reference stays
valid), and a ``DistributedDataParallel`` wrapper is looked through, so module names
(policy globs, stats) are those of the wrapped model.

Limits: double backward (``create_graph=True``) differentiates through the decoded
values, not the originals; tensors saved inside ``torch.utils.checkpoint`` regions
are handled by checkpoint's own hooks, not memfit's.
"""

from __future__ import annotations

import math
import random
import time
import warnings
import weakref
from collections import Counter
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch.autograd.graph import saved_tensors_hooks

from torch._subclasses.fake_tensor import unset_fake_temporarily

from .._units import MB
from ..codec import Encoded, FP8Format, Format, IntFormat, RawFormat, decode, encode
from ..codec.blockwise import is_fake
from ..codec.noise import gaussian_error, predicted_error
from . import fewbit
from .ops import (
    EXACT,
    SDPA_INPUT,
    SDPA_LSE,
    SDPA_OUT,
    SDPA_QK,
    SDPA_V,
    AttentionParams,
    OpCall,
    OpTracker,
    Treatment,
    ComposedActivationCall,
    ComposedNormCall,
    composed_activation,
    consistent_attention,
    is_norm_module,
)
from .offload import OFFLOAD, Offload, OffloadedEncoded, Offloader
from .policy import (
    MASK,
    RAW,
    Setting,
    main_blocks,
    module_formats,
    offloaded_modules,
    resolve_setting,
    split_policy,
)
from .saved import MASK as MASK_KIND

# The representation "cast to bfloat16" for fused attention's q and k (see _op_format).
BF16 = "bf16"
from .saved import FLOAT, NOT_DENSE, OTHER, PARAM, ModuleStack, classify, parameter_storages


# --------------------------------------------------------------------------- stats


@dataclass
class ModuleStats:
    """What one module saved for backward during the last forward pass."""

    original_bytes: int = 0  # what plain autograd would have kept alive
    stored_bytes: int = 0  # what memfit holds instead, on the tensors' device
    host_bytes: int = 0  # what memfit holds in host memory instead (offload)
    stepped_up_bytes: int = 0  # of stored_bytes, what tensors coded one step up hold
    counts: Counter = field(default_factory=Counter)  # saved tensors by kind
    # Host time in the codec's encode (forward) and decode (backward). Measurements,
    # not outcomes: left out of ==, so the same step compares equal across runs.
    encode_seconds: float = field(default=0.0, compare=False)
    decode_seconds: float = field(default=0.0, compare=False)

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.stored_bytes if self.stored_bytes else float("inf")


@dataclass
class ActivationStats:
    """Per-module totals of the last ``with`` block. Bytes count each storage once,
    as autograd does; parameters count as zero (they are not activations).

    ``encode_seconds`` and ``decode_seconds`` are the wall time spent inside the codec
    (decodes are added as backward runs, also after the block has exited). They price
    compression directly, without subtracting two noisy step times. On CPU they are
    the codec's cost; on CUDA they are host time only (kernels run asynchronously)."""

    by_module: dict[str, ModuleStats] = field(default_factory=dict)
    #: The same totals by the op kind of the op table that saved them
    #: (:mod:`memfit.activations.ops`); ``""`` for every op the table does not name.
    #: Counts say what the table did: ``op-mask`` (stored as a 1-bit mask) and
    #: ``op-kept`` (kept exact because of the table).
    by_op: dict[str, ModuleStats] = field(default_factory=dict)

    @property
    def encode_seconds(self) -> float:
        return sum(m.encode_seconds for m in self.by_module.values())

    @property
    def decode_seconds(self) -> float:
        return sum(m.decode_seconds for m in self.by_module.values())

    @property
    def original_bytes(self) -> int:
        return sum(m.original_bytes for m in self.by_module.values())

    @property
    def stored_bytes(self) -> int:
        return sum(m.stored_bytes for m in self.by_module.values())

    @property
    def host_bytes(self) -> int:
        """Bytes offloaded to host memory (``"offload"`` settings); not in ``stored_bytes``."""
        return sum(m.host_bytes for m in self.by_module.values())

    @property
    def stepped_up_bytes(self) -> int:
        """Of ``stored_bytes``, what the tensors coded one step above their format hold
        because their values are heavy-tailed (count kind ``stepped-up``; see
        :data:`~memfit.activations.engine.STEP_UP_ERROR`)."""
        return sum(m.stepped_up_bytes for m in self.by_module.values())

    @property
    def ratio(self) -> float:
        s = self.stored_bytes
        return self.original_bytes / s if s else float("inf")

    @property
    def counts(self) -> Counter:
        total: Counter = Counter()
        for m in self.by_module.values():
            total.update(m.counts)
        return total

    def table(self, top: int | None = None, *, by: str = "module") -> str:
        """A plain-text table, largest rows first: per module (``by="module"``) or per
        op kind of the op table (``by="op"``; ``<other>`` is every op it does not name)."""
        if by not in ("module", "op"):
            raise ValueError(f"by must be 'module' or 'op', got {by!r}")
        source = self.by_module if by == "module" else self.by_op
        unnamed = "<root>" if by == "module" else "<other>"
        rows = sorted(source.items(), key=lambda kv: -kv[1].original_bytes)
        if top is not None:
            rows = rows[:top]
        width = max([len(by)] + [len(n or unnamed) for n, _ in rows])
        lines = [f"{by:<{width}}  {'saved MB':>10}  {'held MB':>10}  {'ratio':>7}  kinds"]
        for name, m in rows:
            kinds = ", ".join(f"{k}:{v}" for k, v in sorted(m.counts.items()))
            lines.append(
                f"{name or unnamed:<{width}}  {m.original_bytes / MB:>10.2f}  "
                f"{m.stored_bytes / MB:>10.2f}  {m.ratio:>7.2f}  {kinds}"
            )
        lines.append(
            f"{'total':<{width}}  {self.original_bytes / MB:>10.2f}  "
            f"{self.stored_bytes / MB:>10.2f}  {self.ratio:>7.2f}"
        )
        if self.host_bytes:
            lines.append(f"{'offloaded to host':<{width}}  {'':>10}  {self.host_bytes / MB:>10.2f}")
        if self.stepped_up_bytes:
            lines.append(f"{'of which stepped up':<{width}}  {'':>10}  {self.stepped_up_bytes / MB:>10.2f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- packed forms


class _Kept:
    """A saved tensor held by reference, with the version it was saved at."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.version = tensor._version


class _StorageEntry:
    """One encoding: of a whole storage (shared by every saved view of it), of one
    view, of one view's mask (decoded to ``mask_values``: the values a true and a
    false element become), or of one view's few-bit derivative levels (decoded
    through ``lookup``)."""

    __slots__ = ("encoded", "storage_ref", "version", "dtype", "stats", "mask_values", "lookup", "view",
                 "offloaded", "_decoded", "__weakref__")

    def __init__(self, encoded: Encoded, storage_ref, version: int, dtype: torch.dtype, stats: ModuleStats,
                 mask_values: tuple[float, float] | None = None, lookup: torch.Tensor | None = None):
        self.encoded = encoded
        self.lookup = lookup  # few-bit levels: codes are indices into this table
        # (size, stride) of the one view this encodes, in its element order, when the
        # view is not laid out contiguously: decoding rebuilds that layout, which
        # compiled backward graphs check.
        self.view: tuple | None = None
        self.storage_ref = storage_ref
        self.version = version
        self.dtype = dtype
        self.stats = stats
        self.mask_values = mask_values
        # The encoding's tensors in host memory (activation offload), or None.
        self.offloaded: OffloadedEncoded | None = None
        self._decoded: weakref.ref | None = None

    def decoded(self) -> torch.Tensor:
        # Views of one storage are unpacked one by one during backward; while any of
        # them is alive, the others reuse its buffer instead of decoding again.
        flat = self._decoded() if self._decoded is not None else None
        if flat is None:
            t0 = time.perf_counter()
            flat = self.decode_uncached()
            self.stats.decode_seconds += time.perf_counter() - t0
            self._decoded = weakref.ref(flat)
        if self.offloaded is not None:
            self.offloaded.unpacked()  # one view fewer that may still need the device copy
        return flat

    def decode_uncached(self) -> torch.Tensor:
        """The buffer the saved views are rebuilt from, decoded now."""
        flat = decode(self.encoded if self.offloaded is None else self.offloaded.restore())
        if self.lookup is not None:
            flat = self.lookup[flat.round().long()]
        if flat.dtype is not self.dtype and flat.dtype is not torch.bool:
            flat = flat.to(self.dtype)  # a cast representation (bf16 q and k)
        if self.mask_values is not None:
            true_value, false_value = self.mask_values
            flat = torch.where(flat, true_value, false_value).to(self.dtype)
        if self.view is not None:
            size, stride = self.view
            laid_out = torch.empty_strided(size, stride, dtype=flat.dtype, device=flat.device)
            laid_out.copy_(flat.view(size))
            flat = laid_out
        return flat


class _AttentionRecompute:
    """A fused attention call's output and logsumexp, computed again from its packed
    q, k, v the first time backward asks for either, and held until the call's
    backward node lets go of its saved tensors."""

    __slots__ = ("inputs", "params", "stats", "_result")

    def __init__(self, inputs: tuple, params: AttentionParams, stats: ModuleStats):
        self.inputs = inputs  # the packed q, k, v: held by the node anyway
        self.params = params
        self.stats = stats
        self._result: tuple[torch.Tensor, torch.Tensor] | None = None

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._result is None:
            t0 = time.perf_counter()
            q, k, v = (_unpack(p) for p in self.inputs)
            self._result = consistent_attention(self.params, q, k, v)
            self.stats.decode_seconds += time.perf_counter() - t0
        return self._result


class _Recomputed:
    """A fused attention's output or logsumexp, stored as nothing (see
    :class:`_AttentionRecompute`), with the layout the kernel saved it in."""

    __slots__ = ("source", "is_lse", "size", "stride", "dtype", "sentinel", "version", "type_name")

    def __init__(self, source: _AttentionRecompute, is_lse: bool, t: torch.Tensor):
        self.source = source
        self.is_lse = is_lse
        self.size = t.size()
        self.stride = t.stride()
        self.dtype = t.dtype
        self.version = t._version
        self.sentinel = _version_sentinel(t)
        self.type_name = t.type()

    def value(self) -> torch.Tensor:
        current = self.sentinel._version
        if current != self.version:
            raise _inplace_error(self.type_name, self.size, current, self.version)
        out, lse = self.source.result()
        if self.is_lse:
            value = _fit_lse(lse, self.size, self.dtype)
        else:
            value = out.to(self.dtype)
        laid_out = torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=value.device)
        return laid_out.copy_(value.view(self.size))


class _ActivationRecompute:
    """The tensors one call of an activation module written as a formula saved,
    computed again from its packed input the first time backward asks for one (see
    :meth:`ActivationCompressor._pack_composed_activation`)."""

    __slots__ = ("module", "x", "device", "autocast", "stats", "count", "pending", "_saved")

    def __init__(self, module: torch.nn.Module, x, device: str, autocast: torch.dtype | None, stats: ModuleStats):
        self.module = module
        self.x = x  # the packed input
        self.device = device
        self.autocast = autocast  # the forward's autocast dtype, None when it was off
        self.stats = stats
        self.count = 0  # tensors the call saved, of every kind
        self.pending = 0  # of those stored as nothing, how many backward has not asked for
        self._saved: list[torch.Tensor] | None = None

    def tensor(self, index: int) -> torch.Tensor:
        if self._saved is None:
            t0 = time.perf_counter()
            self._saved = self._recompute()
            self.stats.decode_seconds += time.perf_counter() - t0
        t = self._saved[index]
        self.pending -= 1
        if self.pending <= 0:  # every one handed out: the nodes hold them now
            self._saved = None
        return t

    def _recompute(self) -> list[torch.Tensor]:
        x = _unpack(self.x).detach().requires_grad_(True)
        saved: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> int:
            saved.append(t.detach())
            return len(saved) - 1

        try:
            cast = (torch.autocast(self.device, dtype=self.autocast) if self.autocast is not None
                    else torch.autocast(self.device, enabled=False))
        except RuntimeError:  # a device type autocast does not know
            cast = _nullcontext()
        with torch.enable_grad(), cast, saved_tensors_hooks(pack, saved.__getitem__):
            self.module.forward(x)
        if len(saved) != self.count:
            raise RuntimeError(
                f"memfit.activations: recomputing {type(self.module).__name__} in backward saved {len(saved)} "
                f"tensors where its forward saved {self.count}; its forward must be a pure function of its input "
                "(keep it exact with policy={'op:gelu': None})"
            )
        return saved


class _ActivationSaved:
    """A tensor an activation module written as a formula saved, stored as nothing."""

    __slots__ = ("source", "index", "size", "dtype", "sentinel", "version", "type_name", "requested")

    def __init__(self, source: _ActivationRecompute, index: int, t: torch.Tensor):
        self.source = source
        self.index = index
        self.size = t.size()
        self.dtype = t.dtype
        self.version = t._version
        self.sentinel = _version_sentinel(t)
        self.type_name = t.type()
        self.requested = False

    def value(self) -> torch.Tensor:
        current = self.sentinel._version
        if current != self.version:
            raise _inplace_error(self.type_name, self.size, current, self.version)
        if self.requested:  # asked again (retain_graph): the pending count is spent
            self.source.pending += 1
        self.requested = True
        value = self.source.tensor(self.index)
        if value.size() != self.size or value.dtype != self.dtype:
            raise RuntimeError(
                f"memfit.activations: recomputing {type(self.source.module).__name__} in backward gave a "
                f"{value.dtype} tensor of size {list(value.size())} where its forward saved {self.dtype} of size "
                f"{list(self.size)}; keep it exact with policy={{'op:gelu': None}}"
            )
        return value


class _Compressed:
    """A saved tensor stored as a view (size, stride, offset) of an encoding."""

    __slots__ = ("entry", "size", "stride", "offset", "sentinel", "version", "type_name")

    def __init__(self, entry: _StorageEntry, t: torch.Tensor, offset: int, stride=None):
        self.entry = entry
        self.size = t.size()
        self.stride = t.stride() if stride is None else stride
        self.offset = offset
        self.version = t._version
        self.sentinel = _version_sentinel(t)
        self.type_name = t.type()


def _version_sentinel(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor sharing ``t``'s version counter but none of its memory."""
    version = t._version
    with torch.no_grad():
        sentinel = t.detach()
        sentinel.set_()  # drops the storage; the version counter stays shared
    torch._C._autograd._unsafe_set_version_counter((sentinel,), (version,))
    return sentinel


def _inplace_error(type_name: str, size, current: int, expected: int) -> RuntimeError:
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an "
        f"inplace operation: [{type_name} {list(size)}] is at version {current}; expected "
        f"version {expected} instead. (memfit kept a compressed copy of it; plain PyTorch "
        "raises the same error.) Hint: enable anomaly detection to find the operation "
        "that failed to compute its gradient, with torch.autograd.set_detect_anomaly(True)."
    )


# --------------------------------------------------------------------------- the engine


class ActivationCompressor:
    """Context manager that compresses the tensors autograd saves inside it.

    Build it with :func:`memfit.activations`. It can be entered once per training
    step; :attr:`stats` describes the latest ``with`` block. Backward may run after the
    block has exited (the usual pattern: forward inside, ``loss.backward()`` outside).
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        bits: Setting = 8,
        *,
        policy: Mapping[str, Setting] | None = None,
        min_bytes: int = 32 * 1024,
        block_size: int = 256,
        rounding: str = "stochastic",
        strict: bool = False,
        seed: int = 0,
        head_bits: Setting = "auto",
        rank: int | None = None,
        offload: Offload | None = None,
        adaptive: bool = True,
    ):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be True or False, got {adaptive!r}")
        self.adaptive = adaptive
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank must be a non-negative int or None, got {rank!r}")
        model = _unwrap_ddp(model)
        if not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f"min_bytes must be a non-negative int, got {min_bytes!r}")
        default = resolve_setting(bits, block_size=block_size, rounding=rounding, where="bits", offload_ok=True)
        self.model = model
        self.default_format = default
        self.min_bytes = min_bytes
        self._block_size = block_size
        self._rounding = rounding
        rules, self._op_formats = split_policy(policy, block_size=block_size, rounding=rounding)
        self._formats, self._ruled = module_formats(
            model, default, rules, block_size=block_size, rounding=rounding, strict=strict
        )
        self._offloaded_modules = offloaded_modules(model, bits, rules)
        if offload is not None and not isinstance(offload, Offload):
            raise TypeError(f"offload must be a memfit.activations.Offload or None, got {type(offload).__name__}")
        self._offloader = Offloader(offload) if self._offloaded_modules else None
        auto_head = isinstance(head_bits, str) and head_bits == "auto"
        if auto_head:
            low = isinstance(default, IntFormat) and default.bits < 8
            self.head_format = IntFormat(bits=8, block_size=block_size, rounding=rounding) if low else None
        else:
            self.head_format = resolve_setting(
                head_bits, block_size=block_size, rounding=rounding, where="head_bits"
            )
        if model is None:
            # Without the model there are no modules, so no loss head to tell apart:
            # every tensor gets ``bits``, as documented.
            if not auto_head and self.head_format != default:
                warnings.warn(
                    "memfit.activations: head_bits has no effect without the model "
                    "(the loss head is found from its modules); every tensor gets bits",
                    UserWarning,
                    stacklevel=3,
                )
            self.head_format = None
        blocks = main_blocks(model) if model is not None and self.head_format is not None else None
        if blocks is None:
            self._first_block = self._last_block = None
        else:
            prefix = f"{blocks[0]}." if blocks[0] else ""
            self._first_block, self._last_block = f"{prefix}0", f"{prefix}{len(blocks[1]) - 1}"
        self._lossy = any(
            not isinstance(f, RawFormat)
            for f in [default, self.head_format or RAW, *self._formats.values(), *self._op_formats.values()]
        )
        self._after_blocks = False
        self._warned_attribution = False
        self._seed = seed
        self._rank = rank
        self._seeds: random.Random | None = None  # made on the first __enter__, for the rank then
        self._stats = ActivationStats()
        self._modules = ModuleStack(on_enter=self._on_module_enter, on_exit=self._on_module_exit)
        self._ops: OpTracker | None = None
        self._entries: dict[tuple, _StorageEntry] = {}
        self._counted: dict[int, weakref.ref] = {}  # storages in original_bytes
        self._held: dict[int, weakref.ref] = {}  # kept storages in stored_bytes
        self._uncounted = False  # while packing a tensor plain autograd would not keep
        self._hooks: saved_tensors_hooks | None = None
        self._param_storages: set[int] = set()
        # Norm modules written as plain ops: the running call of each (see _on_module_enter).
        self._norm_modules = frozenset(
            name for name, m in model.named_modules() if is_norm_module(m)) if model is not None else frozenset()
        self._norm_calls: dict[str, ComposedNormCall] = {}
        # Activation modules written as elementwise formulas: name -> (module, few-bit
        # function), and the running call of each (see _pack_composed_activation).
        self._activation_modules = {
            name: (m, fn) for name, m in model.named_modules() if (fn := composed_activation(m)) is not None
        } if model is not None else {}
        self._activation_calls: dict[str, ComposedActivationCall] = {}
        self._activation_hooks: list = []
        few_bits = {f.bits for f in [default, self.head_format, *self._formats.values(), *self._op_formats.values()]
                    if isinstance(f, IntFormat) and f.bits <= 4}
        for function in {fn for _, fn in self._activation_modules.values()}:
            for b in few_bits:
                fewbit.prepare(function, b)

    # -- public -------------------------------------------------------------------

    @property
    def stats(self) -> ActivationStats:
        return self._stats

    def format_for(self, module_name: str) -> Format:
        """The format of tensors saved while ``module_name`` is innermost (outside the
        loss head and the op table; see :attr:`head_format` and
        :mod:`memfit.activations.ops`)."""
        return self._formats.get(module_name, self.default_format)

    def state_dict(self) -> dict:
        """The position of the stochastic-rounding stream (and the seed and rank it was
        made from), so that a resumed run draws the same rounding noise as an
        uninterrupted one. Save it with the checkpoint; restore it with
        :meth:`load_state_dict` before the first step of the resumed run."""
        return {
            "seed": self._seed,
            "rank": self._rank,
            "stream": self._seeds.getstate() if self._seeds is not None else None,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""
        if not isinstance(state, Mapping) or not {"seed", "stream"} <= set(state):
            raise ValueError(
                "state must be a dict from ActivationCompressor.state_dict() with keys 'seed', 'rank', 'stream'"
            )
        if self._hooks is not None:
            raise RuntimeError("load_state_dict inside the `with` block; call it between steps")
        stream = state["stream"]
        self._seed = state["seed"]
        self._rank = state.get("rank", self._rank)
        if stream is None:
            self._seeds = None
            return
        seeds = random.Random()
        try:
            seeds.setstate(_as_random_state(stream))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state['stream'] is not a rounding-stream state: {exc}") from None
        self._seeds = seeds

    def _format_at(self, module_name: str) -> Format:
        head = self.head_format
        if head is not None and module_name not in self._ruled:
            # Without blocks to go by, the head is the code outside every submodule.
            in_head = self._after_blocks if self._last_block is not None else module_name == ""
            if in_head:
                return head
        return self._formats.get(module_name, self.default_format)

    def __enter__(self) -> "ActivationCompressor":
        if self._hooks is not None:
            raise RuntimeError("this memfit.activations context is already active")
        if self._seeds is None:
            self._seeds = random.Random(_stream_seed(self._seed, self._rank))
        self._stats = ActivationStats()
        self._entries = {}
        self._counted = {}
        self._held = {}
        self._after_blocks = False
        self._norm_calls = {}
        if self.model is not None:
            self._param_storages = parameter_storages(
                list(self.model.parameters()) + list(self.model.buffers())
            )
            self._modules.attach(self.model)
        if self._offloader is not None:
            self._offloader.begin()
        self._hooks = saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        if self._lossy:
            self._ops = OpTracker(recompute_dropout=self._attention_recompute)
            self._ops.__enter__()
            self._activation_calls = {}
            for name, (module, function) in self._activation_modules.items():
                self._activation_hooks.append(module.register_forward_pre_hook(
                    self._activation_hook(name, module, function), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        hooks, self._hooks = self._hooks, None
        ops, self._ops = self._ops, None
        if ops is not None:
            ops.__exit__(*exc)
        self._modules.detach()
        for h in self._activation_hooks:
            h.remove()
        self._activation_hooks = []
        self._activation_calls = {}
        self._entries = {}  # packed objects keep what backward still needs
        self._counted = {}
        self._held = {}
        hooks.__exit__(*exc)
        if exc[0] is None:
            self._check_attribution()

    def _check_attribution(self) -> None:
        """Warn once when per-module rules could not apply because every saved tensor
        came from the root: what a ``torch.compile``'d model looks like, since compiled
        graphs inline submodules and their hooks do not run one by one."""
        if self._warned_attribution or self.model is None:
            return
        per_module = bool(self._ruled - {""}) or self._last_block is not None
        by_module = self._stats.by_module
        if per_module and list(by_module) == [""] and sum(by_module[""].counts.values()) > 1:
            self._warned_attribution = True
            warnings.warn(
                "memfit.activations: every saved tensor was attributed to the root module, "
                "so per-module policy rules and the loss-head rule (head_bits) did not apply; "
                "this happens when the model runs under torch.compile, which inlines "
                "submodules. Tensors were still compressed, but not per module. "
                "To keep per-module choices, compile the blocks one by one "
                "(module.compile() on each) or run those modules eagerly.",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- module attribution --------------------------------------------------------

    def _on_module_enter(self, name: str) -> None:
        if name == "" or name == self._first_block:
            self._after_blocks = False
        if name in self._norm_modules and self._ops is not None:
            self._norm_calls[name] = ComposedNormCall()

    def _on_module_exit(self, name: str) -> None:
        if name == self._last_block:
            self._after_blocks = True
        self._norm_calls.pop(name, None)
        self._activation_calls.pop(name, None)

    def _activation_hook(self, name: str, module: torch.nn.Module, function: str):
        """A forward pre-hook for an activation module written as a formula: notes its
        call and input (runs after the module stack's own pre-hook)."""

        def hook(mod, args, kwargs):
            inputs = list(args) + list(kwargs.values())
            x = inputs[0] if len(inputs) == 1 else None
            if not isinstance(x, torch.Tensor) or torch.compiler.is_compiling():
                x = None
            self._activation_calls[name] = ComposedActivationCall(module, function, x)

        return hook

    def _attention_recompute(self):
        """For an attention call here: None when its tensors are kept exact (it runs as
        plain), else where to report what plain autograd would have saved for it, as
        it runs with dropout as :class:`~.dropout_attention.RecomputedAttention`."""
        fmt = self._op_formats.get("sdpa")
        if fmt is None:
            fmt = self._format_at(self._modules.current)
        if isinstance(fmt, RawFormat) or not self._hooks_on_top():
            return None
        module = self._modules.current

        def report(nbytes: int, inputs_saved: frozenset) -> None:
            # what plain autograd keeps for the call, beyond q, k, v and the mask,
            # which the engine counts when they are packed, if plain saves them too
            for s in self._tally(module, "sdpa"):
                s.original_bytes += nbytes
                s.counts["op-recomputed"] += 1
            if self._ops is not None and self._ops.current is not None:
                self._ops.current.plain_saved = inputs_saved

        return report

    def _hooks_on_top(self) -> bool:
        """Whether memfit's pack hook is the innermost one, so what is saved now is
        memfit's to store: not inside a ``torch.utils.checkpoint`` region, whose own
        hooks take the saved tensors and whose recomputation (outside memfit) must
        save the same ones."""
        try:
            top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        except (AttributeError, RuntimeError, TypeError):  # a torch without it: be safe
            return False
        return top is not None and top[0] == self._pack

    def _tally(self, module: str, op: str) -> tuple[ModuleStats, ModuleStats]:
        by_module, by_op = self._stats.by_module, self._stats.by_op
        m = by_module.get(module)
        if m is None:
            m = by_module[module] = ModuleStats()
        o = by_op.get(op)
        if o is None:
            o = by_op[op] = ModuleStats()
        return m, o

    # -- pack / unpack ---------------------------------------------------------------

    def _pack(self, t: torch.Tensor):
        module = self._modules.current
        call = self._ops.current if self._ops is not None else None
        if call is None and module in self._norm_calls:
            call = self._norm_calls[module]
        if module in self._activation_calls:
            packed = self._pack_composed_activation(self._activation_calls[module], t, module, call)
            if packed is not None:
                return packed
        op = call.kind if call is not None else ""
        kind, key = classify(t, self._param_storages)
        if kind == PARAM:
            for s in self._tally(module, op):
                s.counts["param"] += 1
            return _Kept(t)
        if kind == NOT_DENSE:
            return self._keep(t, module, op, "raw", key=None)
        if kind == OTHER:
            return self._keep(t, module, op, "raw", key)
        treatment = None
        if kind == MASK_KIND:
            fmt = MASK
        else:
            fmt = self._format_at(module)
            if call is not None:
                fmt, treatment = self._op_format(call, t, fmt, module)
                if treatment is SDPA_OUT or treatment is SDPA_LSE:
                    return self._pack_attention_output(call, t, treatment, fmt, key, module, op)
        # RecomputedAttention's q, k, v: what plain autograd keeps is counted when they
        # are its saves too (the math backend saves copies, reported as the call's)
        self._uncounted = (call is not None and call.fused == "recompute"
                           and t.untyped_storage()._cdata not in call.plain_saved)
        try:
            packed = self._store(t, fmt, treatment, key, module, op)
        finally:
            self._uncounted = False
        if treatment is SDPA_INPUT:
            for role in call.roles(t):  # q and k may be one tensor
                call.saved[role] = packed
        return packed

    def _store(self, t, fmt: Format | str, treatment: Treatment | None, key, module: str, op: str):
        """``t`` packed in ``fmt``, and moved to host memory when ``module`` is offloaded."""
        if self._offloader is not None and module in self._offloaded_modules:
            return self._pack_offloaded(t, fmt, treatment, key, module, op)
        return self._pack_as(t, fmt, treatment, key, module, op)

    def _pack_as(self, t, fmt: Format | str, treatment: Treatment | None, key, module: str, op: str):
        if fmt is BF16 and t.dtype in (torch.bfloat16, torch.float16):
            fmt = RAW  # no narrower cast that is precise enough
        if isinstance(fmt, RawFormat):
            return self._keep(t, module, op, "op-kept" if treatment is EXACT else "kept", key)
        storage = t.untyped_storage()
        if storage.nbytes() < self.min_bytes:
            return self._keep(t, module, op, "small", key)
        if fmt is BF16:
            return self._compress_cast(t, torch.bfloat16, key, module, op)
        if treatment is not None and treatment.how == "mask":
            return self._compress_mask(t, storage, key, treatment, module, op)
        if treatment is not None and treatment.how == "fewbit":
            return self._compress_fewbit(t, storage, key, fmt, treatment.function, module, op)
        whole_key = (key, t.dtype, fmt)
        entry = self._entries.get(whole_key)
        if entry is not None and entry.storage_ref() is storage and entry.version == t._version:
            packed = _Compressed(entry, t, t.storage_offset())  # a view of the decoded storage
        else:
            entry = self._entries.get(whole_key + (t.storage_offset(), tuple(t.shape), t.stride()))
            if entry is None or entry.storage_ref() is not storage or entry.version != t._version:
                return self._compress(t, storage, key, fmt, module, op)
            packed = _per_view(entry, t)  # the same view again
        stats = self._tally(module, op)
        self._count_original(storage, key, stats)  # once per storage; a no-op unless its first save was uncounted
        for s in stats:
            s.counts["shared"] += 1
        return packed

    # -- activation offload (the copying itself is .offload's) ----------------------

    def _pack_offloaded(self, t, fmt: Format | str, treatment: Treatment | None, key, module: str, op: str):
        """``t`` packed as in :meth:`_pack_as`, then what it holds moved to host memory:
        the codes of a compressed tensor, or the whole storage of one kept as is."""
        if not self._offloader.applies(t):
            for s in self._tally(module, op):
                s.counts["offload-noop"] += 1
            return self._pack_as(t, fmt, treatment, key, module, op)
        storage = t.untyped_storage()
        if isinstance(fmt, RawFormat) and storage.nbytes() >= self.min_bytes \
                and storage.nbytes() % t.element_size() == 0:
            return self._offload_kept(t, storage, key, module, op)
        packed = self._pack_as(t, fmt, treatment, key, module, op)
        if isinstance(packed, _Compressed):
            stats = self._tally(module, op)
            entry = packed.entry
            # An entry another module made (a shared storage) is that module's to offload.
            if entry.offloaded is None and entry.stats is stats[0]:
                nbytes = entry.encoded.nbytes
                entry.offloaded = self._offloader.put(entry.encoded)
                entry.encoded = entry.offloaded.skeleton
                for s in stats:
                    s.stored_bytes -= nbytes
                    s.host_bytes += nbytes
                    s.counts["offloaded"] += 1
            if entry.offloaded is not None:
                entry.offloaded.add_view()
        return packed

    def _offload_kept(self, t, storage, key, module: str, op: str) -> _Compressed:
        """A tensor kept exact, offloaded: its whole storage, once for every view of it."""
        stats = self._tally(module, op)
        entry_key = (key, t.dtype, OFFLOAD)
        entry = self._entries.get(entry_key)
        if entry is None or entry.storage_ref() is not storage or entry.version != t._version:
            flat = t.detach().as_strided((storage.nbytes() // t.element_size(),), (1,), 0)
            entry = _StorageEntry(encode(flat, RAW), weakref.ref(storage), t._version, t.dtype, stats[0])
            entry.offloaded = self._offloader.put(entry.encoded)
            entry.encoded = entry.offloaded.skeleton
            self._entries[entry_key] = entry
            self._count_original(storage, key, stats)
            for s in stats:
                s.host_bytes += storage.nbytes()
                s.counts["offloaded"] += 1
        else:
            for s in stats:
                s.counts["shared"] += 1
        entry.offloaded.add_view()
        return _Compressed(entry, t, t.storage_offset())

    def _op_format(self, call: OpCall, t: torch.Tensor, fmt: Format,
                   module: str) -> tuple[Format, Treatment | None]:
        """The format of ``t``, saved by the table op ``call`` in ``module``, whose format
        is ``fmt`` (see :mod:`memfit.activations.ops`)."""
        override = self._op_formats.get(call.kind)
        if override is not None:
            if _coarser(override, fmt) and (fmt is self.head_format or module in self._ruled):
                # The more specific setting wins: an op key is a rule for every module,
                # a module rule or head_bits one for these modules, so {"op:linear": 2}
                # leaves lm_head at 8 bits and a module kept with None exact.
                return fmt, None
            return override, None
        if isinstance(fmt, RawFormat):
            return fmt, None
        treatment = call.treatment(t)
        how = treatment.how
        if how == "exact":
            return RAW, EXACT
        if how == "precise":
            return _precise(fmt), treatment
        if how == "step_up":
            return _step_up(fmt), treatment
        if how == "at_least_4":
            if isinstance(fmt, IntFormat) and fmt.bits < 4:
                return IntFormat(bits=4, block_size=fmt.block_size, rounding=fmt.rounding), treatment
            return fmt, treatment
        if how == "mask" and _mask_values_hold(treatment, t.dtype):
            return MASK, treatment
        if how == "fewbit":
            if isinstance(fmt, IntFormat) and fmt.bits <= 4:
                return IntFormat(bits=fmt.bits, block_size=fmt.block_size, rounding="nearest"), treatment
            return fmt, None
        if treatment in (SDPA_INPUT, SDPA_OUT, SDPA_LSE, SDPA_QK, SDPA_V):
            # q and k: 8 bits below 8 bits, bf16 at 8 bits and fp8, where 8-bit codes
            # of these alone would cost more than 8 bits everywhere else; v: one step
            # up (2 -> 4, 4 -> 8 bits), since at the module's bits its error dominates
            # what reaches q and k through sharp softmaxes (docs/guide-plain.md,
            # "Op-aware formats"). The output and logsumexp are not stored at all
            # (_pack_attention_output).
            role = call.role(t) if treatment is SDPA_INPUT else None
            if treatment is SDPA_QK or role in ("q", "k"):
                return _precise(fmt), treatment
            if treatment is SDPA_V or role == "v":
                return _step_up(fmt), treatment
            return fmt, treatment
        return fmt, None

    def _pack_composed_activation(self, call: ComposedActivationCall, t: torch.Tensor, module: str,
                                  table_call: OpCall | None):
        """A tensor saved by the plain ops of an activation module written as a formula
        (:class:`~.ops.ComposedActivationCall`): stored as nothing, recomputed in
        backward from the module's input, which is stored once, as a ``gelu`` call's
        input (its few-bit derivative at 2 and 4 bits). None when the call is not
        composed (its module's format keeps tensors exact, it has no single float
        input, or a table op inside it saves first) or ``t`` is not a float tensor of
        its plain ops: then ``t`` is packed as usual. When ``op:gelu`` keeps the call
        exact (``policy={"op:gelu": None}``), its float tensors are kept as they are.

        Rules:

        1. The input is packed when the call saves its first tensor, with the format
           the op table gives a ``gelu`` call in this module (``op:gelu`` overrides it).
        2. Every tensor the call saves takes a place in save order, whatever its kind,
           so the recompute's saves line up with the forward's; float tensors are
           stored as nothing, others are packed as usual.
        3. The first time backward asks for one, the module's ``forward`` (no hooks)
           runs again on the decoded input, with grad on and the forward's autocast
           state, and the tensors it saves replace the stored nothing; each is handed
           out once, and all are dropped once every one has been.
        """
        state = call.state
        if state is None:
            # a table op inside (GELUActivation running F.gelu): that op's entry applies
            state = call.state = False if table_call is not None else self._start_composed_activation(call, module)
        if state is False:
            return None
        kind, key = classify(t, self._param_storages)
        if state is EXACT:  # op:gelu keeps the call's tensors exact
            return self._pack_as(t, RAW, EXACT, key, module, call.kind) if kind == FLOAT and table_call is None \
                else None
        index = state.count
        state.count += 1
        if kind != FLOAT or table_call is not None:
            return None
        stats = self._tally(module, call.kind)
        self._count_original(t.untyped_storage(), key, stats)
        for s in stats:
            s.counts["op-recomputed"] += 1
        state.pending += 1
        return _ActivationSaved(state, index, t)

    def _start_composed_activation(self, call: ComposedActivationCall, module: str):
        x = call.x
        fmt = self._format_at(module)
        if x is None or isinstance(fmt, RawFormat) or not x.requires_grad:
            return False
        kind, key = classify(x, self._param_storages)
        if kind != FLOAT:
            return False
        xfmt, treatment = self._op_format(call, x, fmt, module)
        if isinstance(xfmt, RawFormat):
            return EXACT  # the plain ops' tensors, as plain autograd keeps them
        packed = self._store(x, xfmt, treatment, key, module, call.kind)
        device = x.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return _ActivationRecompute(call.module, packed, device, autocast, self._tally(module, call.kind)[0])

    def _pack_attention_output(self, call: OpCall, t, treatment: Treatment, fmt: Format, key, module: str, op: str):
        """Store nothing for the fused attention's output or logsumexp: both are
        recomputed in backward from the decoded q, k, v (see :mod:`.ops`), so the
        kernel's backward gets values consistent with the inputs it is given."""
        if not call.broken and not all(role in call.saved for role in ("q", "k", "v")):
            self._make_exact(call)  # saved before its inputs: nothing to be consistent with
        if not call.broken and treatment is SDPA_LSE and _lse_layout(t, call.input("q")) is None:
            self._make_exact(call)
        if call.broken:
            return self._pack_as(t, RAW, EXACT, key, module, op)
        if call.recomputed is None:
            call.recomputed = _AttentionRecompute(
                tuple(call.saved[role] for role in ("q", "k", "v")), AttentionParams.of(call),
                self._tally(module, op)[0],
            )
        stats = self._tally(module, op)
        self._count_original(t.untyped_storage(), key, stats)
        for s in stats:
            s.counts["op-recomputed"] += 1
        return _Recomputed(call.recomputed, treatment is SDPA_LSE, t)

    def _make_exact(self, call: OpCall) -> None:
        """Give up on consistency for one attention call: its inputs packed so far point
        at the exact tensors (alive: the call holds them), the rest are kept exact."""
        call.broken = True
        for role, packed in call.saved.items():
            if isinstance(packed, _Compressed):
                arg = call.input(role)
                packed.entry = _StorageEntry(encode(arg, RAW), weakref.ref(arg.untyped_storage()), arg._version,
                                             arg.dtype, packed.entry.stats)
                packed.offset, packed.stride = arg.storage_offset(), arg.stride()

    def _count_original(self, storage, key: int | None, stats) -> None:
        """Add what plain autograd keeps for ``storage`` (all of it, once)."""
        if key is None or self._uncounted:
            return
        seen = self._counted.get(key)
        if seen is None or seen() is not storage:
            self._counted[key] = weakref.ref(storage)
            for s in stats:
                s.original_bytes += storage.nbytes()

    def _keep(self, t: torch.Tensor, module: str, op: str, kind: str, key: int | None) -> _Kept:
        stats = self._tally(module, op)
        for s in stats:
            s.counts[kind] += 1
        if key is not None:
            storage = t.untyped_storage()
            self._count_original(storage, key, stats)
            held = self._held.get(key)
            if held is None or held() is not storage:  # a kept storage is held once
                self._held[key] = weakref.ref(storage)
                for s in stats:
                    s.stored_bytes += storage.nbytes()
        return _Kept(t)

    def _encode(self, flat: torch.Tensor, fmt: Format, stats: ModuleStats, channels: int | None = None) -> Encoded:
        seed = self._seeds.getrandbits(62) if _is_stochastic(fmt) else 0
        t0 = time.perf_counter()
        encoded = encode(flat, fmt, seed=seed, channels=channels)
        stats.encode_seconds += time.perf_counter() - t0
        return encoded

    def _compress(self, t, storage, key, fmt: Format, module: str, op: str) -> _Compressed:
        stats = self._tally(module, op)
        if _covers_storage(t, storage):
            # A view of every element of its storage (the tensor itself, a transpose):
            # encode the storage in its own order, once, for every view of it.
            whole = storage.nbytes() // t.element_size()
            flat, entry_key = t.as_strided((whole,), (1,), 0), (key, t.dtype, fmt)
        else:
            # A part of a storage (q of a fused qkv projection, a slice): encode only
            # its elements, so elements no one saved never share a block with saved
            # ones (they may hold anything, even values near the float limits).
            flat = t.contiguous()
            entry_key = (key, t.dtype, fmt, t.storage_offset(), tuple(t.shape), t.stride())
        in_order = len(entry_key) > 3 or t.is_contiguous()  # flat holds t's elements in t's order
        channels = _channels(t, fmt) if in_order else None
        encoded = self._encode(flat, fmt, stats[0], channels)
        kind = _kind(fmt)
        if self.adaptive and _heavy_tailed(flat, encoded):
            # Entries stay keyed by the requested format: later saves of the storage
            # share this encoding.
            encoded = self._encode(flat, _step_up(fmt), stats[0], channels)
            kind = "stepped-up"
        entry = _StorageEntry(encoded, weakref.ref(storage), t._version, t.dtype, stats[0])
        self._entries[entry_key] = entry
        self._count_original(storage, key, stats)
        for s in stats:
            s.counts[kind] += 1
            s.stored_bytes += encoded.nbytes
            if kind == "stepped-up":
                s.stepped_up_bytes += encoded.nbytes
        if len(entry_key) == 3:
            return _Compressed(entry, t, 0)
        return _per_view(entry, t)

    def _compress_cast(self, t, dtype: torch.dtype, key, module: str, op: str) -> _Compressed:
        stats = self._tally(module, op)
        storage = t.untyped_storage()
        encoded = encode(t.detach().to(dtype, memory_format=torch.contiguous_format), RAW)
        entry = _StorageEntry(encoded, weakref.ref(storage), t._version, t.dtype, stats[0])
        self._count_original(storage, key, stats)
        for s in stats:
            s.counts["op-" + str(dtype).replace("torch.", "")] += 1
            s.stored_bytes += encoded.nbytes
        return _per_view(entry, t)

    def _compress_fewbit(self, t, storage, key, fmt: IntFormat, function: str, module: str, op: str) -> _Compressed:
        stats = self._tally(module, op)
        levels = fewbit.bucket(function, fmt.bits, t.detach())  # fake under a memory estimate
        lookup = None if is_fake(t) else fewbit.representatives(function, fmt.bits).to(t.device)
        # Level indices are small integers: nearest-rounded codes store them exactly.
        encoded = self._encode(levels, fmt, stats[0])
        entry = _StorageEntry(encoded, weakref.ref(storage), t._version, t.dtype, stats[0], lookup=lookup)
        self._count_original(storage, key, stats)
        for s in stats:
            s.counts[f"op-fewbit{fmt.bits}"] += 1
            s.stored_bytes += encoded.nbytes
        return _per_view(entry, t)

    def _compress_mask(self, t, storage, key, treatment: Treatment, module: str, op: str) -> _Compressed:
        stats = self._tally(module, op)
        with torch.no_grad():
            mask = treatment.predicate(t.detach()).contiguous()
        encoded = self._encode(mask, MASK, stats[0])
        entry = _StorageEntry(encoded, weakref.ref(storage), t._version, t.dtype, stats[0],
                              mask_values=(treatment.true_value, treatment.false_value))
        self._count_original(storage, key, stats)
        for s in stats:
            s.counts["op-mask"] += 1
            s.stored_bytes += encoded.nbytes
        return _per_view(entry, t)

    def _unpack(self, packed) -> torch.Tensor:
        return _unpack(packed)


def _unpack(packed) -> torch.Tensor:
    """The tensor a packed object stands for (the engine's unpack hook)."""
    if isinstance(packed, (_Recomputed, _ActivationSaved)):
        return packed.value()
    if isinstance(packed, _Kept):
        t = packed.tensor
        if t._version != packed.version:
            raise _inplace_error(t.type(), t.size(), t._version, packed.version)
        return t
    current = packed.sentinel._version
    if current != packed.version:
        raise _inplace_error(packed.type_name, packed.size, current, packed.version)
    flat = packed.entry.decoded()
    return flat.as_strided(packed.size, packed.stride, packed.offset)


#: Rows wider than this are vocabularies (the logits), whose columns are not channels:
#: per-channel scaling would only cost them a pass.
_MAX_CHANNELS = 16384


def _channels(t: torch.Tensor, fmt: Format) -> int | None:
    """The channel count to code ``t``'s elements (in order) per-channel scaled
    with (see :func:`memfit.codec.encode`'s ``channels``), or None. Rows of channels are
    what linear layers save, ``[tokens, C]`` and ``[batch, tokens, C]``, laid out in
    order; the last dimension of a 4-D tensor (NCHW width, attention's keys) is no
    channel. Every row counts: a sample would miss the few tokens with massive
    activations that pretrained models have."""
    if not isinstance(fmt, IntFormat) or t.dim() not in (2, 3) or t.shape[-1] > _MAX_CHANNELS:
        return None
    return t.shape[-1]


def _precise(fmt: Format) -> Format | str:
    """8-bit codes when ``fmt`` is coarser; a cast to bf16 when it is 8-bit codes or
    fp8, where 8-bit codes of these few tensors alone would cost more than 8 bits
    everywhere else (see :mod:`.ops`)."""
    if isinstance(fmt, IntFormat) and fmt.bits < 8:
        return IntFormat(bits=8, block_size=fmt.block_size, rounding=fmt.rounding)
    return BF16


#: A tensor coded at 2 or 4 bits whose predicted relative rounding error
#: (:func:`memfit.codec.noise.predicted_error`) is more than this many times a
#: Gaussian tensor's at the same width (:func:`~memfit.codec.noise.gaussian_error`) is
#: coded one step up (see ``adaptive``). The ratio measures heavy tails, not the width:
#: Gaussian-like activations (linear and norm inputs, attention operands) sit near 1
#: by construction, products of two activations (gated MLPs, Mamba's gated scan
#: output) several times higher; one step up divides the error by (15/3)**2 = 25
#: (2 -> 4 bits) or (255/15)**2 = 289 (4 -> 8). Why 3: it steps up the tensors that kept the zoo's Mamba over the
#: fidelity bars and none of GPT-2-small's, whose memory ratios stay as they were
#: (figures in docs/guide-plain.md, "Op-aware formats").
STEP_UP_ERROR = 3.0


def _heavy_tailed(flat: torch.Tensor, encoded: Encoded) -> bool:
    """Whether ``encoded`` (integer codes below 8 bits of ``flat``) carries more than
    :data:`STEP_UP_ERROR` times a Gaussian tensor's rounding error at its width,
    judged on at most 2048 of its blocks (:func:`memfit.codec.noise.predicted_error`);
    never for a fake tensor (a memory estimate has no values to judge)."""
    fmt = encoded.format
    if not isinstance(fmt, IntFormat) or fmt.bits >= 8 or is_fake(flat):
        return False
    return predicted_error(flat, encoded) > STEP_UP_ERROR * gaussian_error(fmt)  # False for NaN


def _precision(fmt: Format) -> float:
    """Bits per element a format keeps of each value, for ordering formats: kept
    tensors above everything, then 8-bit codes and fp8, 4, 2."""
    if isinstance(fmt, IntFormat):
        return fmt.bits
    if isinstance(fmt, FP8Format):
        return 8
    return math.inf


def _coarser(a: Format, b: Format) -> bool:
    """Whether ``a`` keeps less of each value than ``b``."""
    return _precision(a) < _precision(b)


def _step_up(fmt: Format) -> Format:
    """The integer format one step more precise than ``fmt`` (2 -> 4 -> 8 bits);
    ``fmt`` itself when it is 8 bits or not integer codes."""
    if isinstance(fmt, IntFormat) and fmt.bits < 8:
        return IntFormat(bits=2 * fmt.bits, block_size=fmt.block_size, rounding=fmt.rounding)
    return fmt


def _per_view(entry: _StorageEntry, t: torch.Tensor) -> _Compressed:
    """``t`` packed as the one view ``entry`` encodes (its elements in order)."""
    if t.stride() != _contiguous_strides(t.size()):
        entry.view = (t.size(), t.stride())
    return _Compressed(entry, t, 0)


def _lse_layout(saved: torch.Tensor, q: torch.Tensor | None) -> str | None:
    """How a kernel's saved logsumexp relates to the rows of ``q`` (``[..., L, D]``):
    ``"same"`` shape, ``"padded"`` along the last dimension, ``"reshaped"`` (the same
    elements), or None when it is none of these (the call is then kept exact)."""
    if q is None:
        return None
    rows = tuple(q.shape[:-1])
    if tuple(saved.shape) == rows:
        return "same"
    if saved.dim() == len(rows) and tuple(saved.shape[:-1]) == rows[:-1] and saved.shape[-1] > rows[-1]:
        return "padded"
    if saved.numel() == math.prod(rows):
        return "reshaped"
    return None


def _fit_lse(lse: torch.Tensor, size, dtype: torch.dtype) -> torch.Tensor:
    """``lse`` (``[..., L]``) in the kernel's own logsumexp shape ``size`` (see
    :func:`_lse_layout`; padding rows, which kernels never read, are zero)."""
    lse = lse.to(dtype)
    if tuple(size) == tuple(lse.shape):
        return lse
    if len(size) == lse.dim() and tuple(size[:-1]) == tuple(lse.shape[:-1]):
        padded = lse.new_zeros(size)
        padded[..., : lse.shape[-1]] = lse
        return padded
    return lse.reshape(size)


def _mask_values_hold(treatment: Treatment, dtype: torch.dtype) -> bool:
    """Whether the values a mask decodes to, in ``dtype``, give the predicate back."""
    with unset_fake_temporarily():  # also inside a memory estimate: two real numbers
        values = torch.tensor([treatment.true_value, treatment.false_value], dtype=dtype)
        got = treatment.predicate(values)
        return bool(got[0]) and not bool(got[1])


def _covers_storage(t: torch.Tensor, storage) -> bool:
    """Whether ``t`` views every element of ``storage`` exactly once."""
    itemsize = t.element_size()
    nbytes = storage.nbytes()
    if nbytes % itemsize or t.numel() * itemsize != nbytes or t.storage_offset() != 0:
        return False
    expected = 1
    for size, stride in sorted((d for d in zip(t.size(), t.stride()) if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _as_random_state(stream):
    """``random.Random.getstate()``'s tuple, also after a round trip through lists
    (JSON, some checkpoint formats)."""
    version, internal, gauss = stream
    return (version, tuple(internal), gauss)


def _unwrap_ddp(model):
    """The module a ``DistributedDataParallel`` wraps (its hooks fire inside the
    wrapper's forward; its names carry no ``module.`` prefix), else ``model``."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return model
    return model.module if isinstance(model, DistributedDataParallel) else model


def _stream_seed(seed: int, rank: int | None):
    """What seeds the stochastic-rounding stream: ``seed`` itself on rank 0 (and in a
    single process), a value derived from ``seed`` and the rank on other ranks.
    ``rank=None`` means torch.distributed's rank when a process group is initialized."""
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return seed if rank == 0 else f"memfit.activations:{seed}:rank{rank}"


def _contiguous_strides(size) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(size):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _is_stochastic(fmt: Format) -> bool:
    return isinstance(fmt, IntFormat) and fmt.rounding == "stochastic"


def _kind(fmt: Format) -> str:
    if isinstance(fmt, IntFormat):
        return f"int{fmt.bits}"
    if isinstance(fmt, FP8Format):
        return "fp8"
    return "mask" if fmt is MASK else "kept"


def activations(
    model: torch.nn.Module | None = None,
    bits: Setting = 8,
    *,
    policy: Mapping[str, Setting] | None = None,
    min_bytes: int = 32 * 1024,
    block_size: int = 256,
    rounding: str = "stochastic",
    strict: bool = False,
    seed: int = 0,
    head_bits: Setting = "auto",
    rank: int | None = None,
    offload: Offload | None = None,
    adaptive: bool = True,
) -> ActivationCompressor:
    """Compress the activations autograd saves for backward, on any model.

    Usage::

        mf = memfit.activations(model, bits=4)
        for batch in loader:
            with mf:
                loss = model(**batch).loss
            loss.backward()
            print(mf.stats.ratio)

    Args:
        model: the model, needed for per-module ``policy`` rules and per-module
            stats; without it every tensor gets ``bits`` (no loss head either) and
            stats go to ``""``.
        bits: the default setting: 8, 4 or 2 (block-wise integer codes), ``"fp8"``
            (e4m3), ``None`` (keep everything; gradients are then bit-identical to
            plain PyTorch), a :mod:`memfit.codec` format, ``"offload"`` (kept exact in
            pinned host memory, copied back before backward needs it) or
            ``"offload:<bits>"`` (``"offload:4"``: coded, then the codes offloaded); see
            :mod:`memfit.activations.offload`. Offload moves CUDA tensors; tensors
            already in host memory stay where they are (counted as ``offload-noop``).
        policy: per-module rules, ``{glob: setting}`` on qualified module names, e.g.
            ``{"transformer.h.*.attn": 8, "*.mlp": 2, "lm_head": None}``. The first
            matching rule wins; modules no rule matches inherit their parent's; a glob
            that matches no module warns once. Keys ``"op:<kind>"`` (a kind of
            :data:`memfit.activations.OP_KINDS`) replace the op table's entry for that
            op in every module, e.g. ``{"op:sdpa": None}`` keeps fused attention exact,
            except that they never store a tensor coarser than a module rule or
            ``head_bits`` sets for its module (the more specific setting wins:
            ``{"op:linear": 2}`` leaves ``lm_head``'s input at 8 bits).
            Must be a mapping (``ValueError`` otherwise).
        min_bytes: storages smaller than this are kept as they are.
        block_size: elements per quantization block.
        rounding: ``"stochastic"`` (unbiased; default) or ``"nearest"``.
        strict: raise ``ValueError`` if a policy glob matches no module (instead of
            warning).
        seed: seeds the stochastic-rounding noise (never the global RNG).
        head_bits: the setting for the loss head: tensors saved after the last block
            of the model's largest ``nn.ModuleList`` has run (final norm, output
            layer, the loss), or, in a model without one, saved outside every
            submodule. ``"auto"`` (default) means 8 when ``bits`` is 4 or 2, else no
            special case; pass ``head_bits=bits`` for the same bits everywhere. Modules
            that a ``policy`` rule names (or inherit one) keep their rule.
        rank: mixed into ``seed`` so that each process of a distributed run draws its
            own rounding noise (rank 0 uses ``seed`` as is). None (default): the
            torch.distributed rank when the context is first entered, 0 without a
            process group. Pass it to reproduce one rank's noise in a single process.
        offload: options of the ``"offload"`` settings (:class:`Offload`: prefetch
            window, host-memory limit, transport); None for the defaults.
        adaptive: code a tensor one step up (2 -> 4, 4 -> 8 bits) when its values
            are so heavy-tailed that its predicted rounding error is more than
            :data:`~memfit.activations.engine.STEP_UP_ERROR` times a Gaussian
            tensor's at its width (a product of activations, such as Mamba's gated
            scan output); ``stats`` count such tensors as ``stepped-up`` and their
            bytes in ``stepped_up_bytes``. ``False`` codes every tensor at its
            format.

    The op that saves a tensor can change its format (fused attention, ReLU-like ops,
    GELU/SiLU, normalisation statistics): see :mod:`memfit.activations.ops`. For an
    exact resume, save :meth:`ActivationCompressor.state_dict` with the checkpoint.

    ``model`` may be a ``DistributedDataParallel`` wrapper: the module it wraps is
    used (same names for policy rules and stats). Under FSDP2 pass the model after
    ``fully_shard``; its gathered parameters are kept by reference, never compressed.
    """
    return ActivationCompressor(
        model,
        bits,
        policy=policy,
        min_bytes=min_bytes,
        block_size=block_size,
        rounding=rounding,
        strict=strict,
        seed=seed,
        head_bits=head_bits,
        rank=rank,
        offload=offload,
        adaptive=adaptive,
    )
