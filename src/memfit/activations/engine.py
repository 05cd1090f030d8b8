"""The saved-tensor engine: compress what autograd keeps for backward, on any model.

How it works
------------
Inside ``with memfit.activations(...)`` every tensor that autograd saves for the
backward pass goes through :meth:`ActivationCompressor._pack` (a
``torch.autograd.graph.saved_tensors_hooks`` pack hook), and comes back through
:meth:`ActivationCompressor._unpack` when backward needs it. Nothing about the model
changes: no module is swapped, so HF transformers, CNNs and hand-written code all
work, including ``F.*`` calls that module-swapping tools miss.

What each saved tensor becomes:

* parameters, views of parameters and other leaves that require grad: kept by
  reference (they are alive anyway, a copy would only cost memory);
* tensors autograd cannot re-encode (integer, complex, sparse, quantized, nested,
  tensor subclasses such as DTensor) and tensors under ``min_bytes``: kept as is;
* bool tensors (dropout and ReLU masks): packed losslessly to 1 bit per element;
* float tensors: the format of the module that saved them (8/4/2-bit block-wise
  integer codes, fp8, or kept).

The loss head stays precise. Tensors saved after the model's last block has run (the
final norm, the output projection, the loss; the blocks are the largest
``nn.ModuleList``, see :func:`~memfit.activations.policy.main_blocks`) get
``head_bits``, 8 by default when ``bits`` is below 8. Their errors reach every layer
through the loss gradient: on the demo's GPT, 2 bits everywhere ends 18% above fp32,
2 bits with an 8-bit head 0.8%, for a few percent of the memory. Modules a policy rule
names keep that rule.

A saved tensor is attributed to the innermost module of ``model`` running when it is
saved. Several ops often save the same storage (a linear's input is the previous
op's output; q, k and v are strided views of one projection). Plain autograd keeps
such a storage once, and so does memfit: the first save encodes the whole storage,
later saves of any view of it reuse that encoding, and unpack rebuilds each view with
``as_strided`` over one shared decoded buffer.

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

import random
import time
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch.autograd.graph import saved_tensors_hooks

from ..codec import Encoded, FP8Format, Format, IntFormat, RawFormat, decode, encode, is_plain_dense
from .policy import MASK, Setting, main_blocks, module_formats, resolve_setting

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- stats


@dataclass
class ModuleStats:
    """What one module saved for backward during the last forward pass."""

    original_bytes: int = 0  # what plain autograd would have kept alive
    stored_bytes: int = 0  # what memfit holds instead
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
    def ratio(self) -> float:
        s = self.stored_bytes
        return self.original_bytes / s if s else float("inf")

    @property
    def counts(self) -> Counter:
        total: Counter = Counter()
        for m in self.by_module.values():
            total.update(m.counts)
        return total

    def table(self, top: int | None = None) -> str:
        """A plain-text table, largest modules first."""
        rows = sorted(self.by_module.items(), key=lambda kv: -kv[1].original_bytes)
        if top is not None:
            rows = rows[:top]
        width = max([len("module")] + [len(n or "<root>") for n, _ in rows])
        lines = [f"{'module':<{width}}  {'saved MB':>10}  {'held MB':>10}  {'ratio':>7}  kinds"]
        for name, m in rows:
            kinds = ", ".join(f"{k}:{v}" for k, v in sorted(m.counts.items()))
            lines.append(
                f"{name or '<root>':<{width}}  {m.original_bytes / 2**20:>10.2f}  "
                f"{m.stored_bytes / 2**20:>10.2f}  {m.ratio:>7.2f}  {kinds}"
            )
        lines.append(
            f"{'total':<{width}}  {self.original_bytes / 2**20:>10.2f}  "
            f"{self.stored_bytes / 2**20:>10.2f}  {self.ratio:>7.2f}"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- packed forms


class _Kept:
    """A saved tensor held by reference, with the version it was saved at."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.version = tensor._version


class _StorageEntry:
    """One encoded storage, shared by every saved view of it."""

    __slots__ = ("encoded", "storage_ref", "version", "dtype", "stats", "_decoded", "__weakref__")

    def __init__(self, encoded: Encoded, storage_ref, version: int, dtype: torch.dtype, stats: ModuleStats):
        self.encoded = encoded
        self.storage_ref = storage_ref
        self.version = version
        self.dtype = dtype
        self.stats = stats
        self._decoded: weakref.ref | None = None

    def decoded(self) -> torch.Tensor:
        # Views of one storage are unpacked one by one during backward; while any of
        # them is alive, the others reuse its buffer instead of decoding again.
        flat = self._decoded() if self._decoded is not None else None
        if flat is None:
            t0 = time.perf_counter()
            flat = decode(self.encoded)
            self.stats.decode_seconds += time.perf_counter() - t0
            self._decoded = weakref.ref(flat)
        return flat


class _Compressed:
    """A saved tensor stored as a view (size, stride, offset) of an encoded storage."""

    __slots__ = ("entry", "size", "stride", "offset", "sentinel", "version", "type_name")

    def __init__(self, entry: _StorageEntry, t: torch.Tensor, offset: int):
        self.entry = entry
        self.size = t.size()
        self.stride = t.stride()
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
    ):
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"rank must be a non-negative int or None, got {rank!r}")
        model = _unwrap_ddp(model)
        if not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f"min_bytes must be a non-negative int, got {min_bytes!r}")
        default = resolve_setting(bits, block_size=block_size, rounding=rounding, where="bits")
        self.model = model
        self.default_format = default
        self.min_bytes = min_bytes
        self._formats, self._ruled = module_formats(
            model, default, policy, block_size=block_size, rounding=rounding, strict=strict
        )
        if isinstance(head_bits, str) and head_bits == "auto":
            low = isinstance(default, IntFormat) and default.bits < 8
            self.head_format = IntFormat(bits=8, block_size=block_size, rounding=rounding) if low else None
        else:
            self.head_format = resolve_setting(
                head_bits, block_size=block_size, rounding=rounding, where="head_bits"
            )
        blocks = main_blocks(model) if model is not None and self.head_format is not None else None
        if blocks is None:
            self._first_block = self._last_block = None
        else:
            prefix = f"{blocks[0]}." if blocks[0] else ""
            self._first_block, self._last_block = f"{prefix}0", f"{prefix}{len(blocks[1]) - 1}"
        self._after_blocks = False
        self._warned_attribution = False
        self._seed = seed
        self._rank = rank
        self._seeds: random.Random | None = None  # made on the first __enter__, for the rank then
        self._stats = ActivationStats()
        self._module_stack: list[str] = []
        self._entries: dict[tuple, _StorageEntry] = {}
        self._seen_kept: dict[tuple, weakref.ref] = {}
        self._handles: list = []
        self._hooks: saved_tensors_hooks | None = None
        self._param_storages: set[int] = set()

    # -- public -------------------------------------------------------------------

    @property
    def stats(self) -> ActivationStats:
        return self._stats

    def format_for(self, module_name: str) -> Format:
        """The format of tensors saved while ``module_name`` is innermost (outside the
        loss head; see :attr:`head_format`)."""
        return self._formats.get(module_name, self.default_format)

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
        self._module_stack = []
        self._entries = {}
        self._seen_kept = {}
        self._after_blocks = False
        if self.model is not None:
            self._param_storages = {
                _storage_id(t.untyped_storage())
                for t in list(self.model.parameters()) + list(self.model.buffers())
                if is_plain_dense(t)
            }
            for name, module in self.model.named_modules():
                self._handles.append(module.register_forward_pre_hook(self._enter_module(name)))
                self._handles.append(
                    module.register_forward_hook(self._exit_module(name), always_call=True)
                )
        self._hooks = saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        hooks, self._hooks = self._hooks, None
        for h in self._handles:
            h.remove()
        self._handles = []
        self._entries = {}  # packed objects keep what backward still needs
        self._seen_kept = {}
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

    def _enter_module(self, name: str):
        starts_forward = name in ("", self._first_block)

        def hook(module, args):
            self._module_stack.append(name)
            if starts_forward:
                self._after_blocks = False

        return hook

    def _exit_module(self, name: str):
        ends_blocks = name == self._last_block

        def hook(module, args, output):
            if ends_blocks:
                self._after_blocks = True
            stack = self._module_stack
            if stack and stack[-1] == name:
                stack.pop()
            elif name in stack:  # an exception unwound inner modules without their hooks
                del stack[stack.index(name) :]

        return hook

    def _module_stats(self, name: str) -> ModuleStats:
        m = self._stats.by_module.get(name)
        if m is None:
            m = self._stats.by_module[name] = ModuleStats()
        return m

    # -- pack / unpack ---------------------------------------------------------------

    def _is_parameter_like(self, t: torch.Tensor, dense: bool) -> bool:
        if t.requires_grad and t.is_leaf:
            return True
        base = t._base
        if base is not None and base.requires_grad and base.is_leaf:
            return True
        return dense and _storage_id(t.untyped_storage()) in self._param_storages

    def _pack(self, t: torch.Tensor):
        module = self._module_stack[-1] if self._module_stack else ""
        dense = is_plain_dense(t)
        if self._is_parameter_like(t, dense):
            self._module_stats(module).counts["param"] += 1
            return _Kept(t)
        if not dense:
            return self._keep(t, module, "raw", dense=False)
        fmt = MASK if t.dtype is torch.bool else self._format_at(module)
        if isinstance(fmt, RawFormat):
            return self._keep(t, module, "kept")
        if t.dtype is not torch.bool and t.dtype not in _FLOAT:
            return self._keep(t, module, "raw")
        storage = t.untyped_storage()
        if storage.nbytes() < self.min_bytes:
            return self._keep(t, module, "small")
        key = (_storage_id(storage), t.device, t.dtype)
        entry = self._entries.get(key)
        if entry is not None and entry.storage_ref() is storage and entry.version == t._version:
            self._module_stats(module).counts["shared"] += 1
            return _Compressed(entry, t, t.storage_offset())
        return self._compress(t, storage, key, fmt, module)

    def _keep(self, t: torch.Tensor, module: str, kind: str, dense: bool = True) -> _Kept:
        stats = self._module_stats(module)
        stats.counts[kind] += 1
        if dense:
            storage = t.untyped_storage()
            key = (_storage_id(storage), t.device)
            seen = self._seen_kept.get(key)
            if seen is None or seen() is not storage:
                self._seen_kept[key] = weakref.ref(storage)
                stats.original_bytes += storage.nbytes()
                stats.stored_bytes += storage.nbytes()
        return _Kept(t)

    def _compress(self, t, storage, key, fmt: Format, module: str) -> _Compressed:
        itemsize = t.element_size()
        whole = storage.nbytes() // itemsize
        span = _span(t)
        if t.is_contiguous() and t.storage_offset() == 0 and t.numel() == whole:
            flat, offset, shared = t, 0, True
        elif span * 2 >= whole and storage.nbytes() % itemsize == 0:
            # A view covering much of its storage (q/k/v of a fused projection, a
            # transpose): encode the whole storage once, so sibling views dedupe.
            flat, offset, shared = t.as_strided((whole,), (1,), 0), t.storage_offset(), True
        else:
            # A small window into a big storage: encode only the window.
            flat, offset, shared = t.contiguous(), None, False
        seed = self._seeds.getrandbits(62) if _is_stochastic(fmt) else 0
        stats = self._module_stats(module)
        t0 = time.perf_counter()
        encoded = encode(flat, fmt, seed=seed)
        stats.encode_seconds += time.perf_counter() - t0
        entry = _StorageEntry(encoded, weakref.ref(storage), t._version, t.dtype, stats)
        if shared:
            self._entries[key] = entry
        stats.counts[_kind(fmt)] += 1
        stats.original_bytes += storage.nbytes() if shared else t.numel() * itemsize
        stats.stored_bytes += encoded.nbytes
        packed = _Compressed(entry, t, offset if offset is not None else 0)
        if offset is None:  # the window was made contiguous: rebuild it as such
            packed.stride = _contiguous_strides(t.size())
        return packed

    def _unpack(self, packed) -> torch.Tensor:
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


def _storage_id(storage) -> int:
    """Identifies a storage while it is alive: its data pointer, or for the storage of
    a FakeTensor (no data; its pointer is 0 for all) the storage object's address."""
    return storage._cdata if storage.device.type == "meta" else storage.data_ptr()


def _span(t: torch.Tensor) -> int:
    """Number of storage elements between the first and last element of a view."""
    if t.numel() == 0:
        return 0
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.size(), t.stride()))


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
            stats; without it every tensor gets ``bits`` and stats go to ``""``.
        bits: the default setting: 8, 4 or 2 (block-wise integer codes), ``"fp8"``
            (e4m3), ``None`` (keep everything; gradients are then bit-identical to
            plain PyTorch), or a :mod:`memfit.codec` format.
        policy: per-module rules, ``{glob: setting}`` on qualified module names, e.g.
            ``{"transformer.h.*.attn": 8, "*.mlp": 2, "lm_head": None}``. The first
            matching rule wins; modules no rule matches inherit their parent's.
        min_bytes: storages smaller than this are kept as they are.
        block_size: elements per quantization block.
        rounding: ``"stochastic"`` (unbiased; default) or ``"nearest"``.
        strict: raise ``ValueError`` if a policy glob matches no module.
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
    )
