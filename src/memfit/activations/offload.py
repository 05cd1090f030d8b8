"""Activation offload: saved tensors (or their codes) held in pinned host memory.

A module whose setting is ``"offload"`` (values kept exact) or ``"offload:<bits>"``
(``"offload:8"``, ``"offload:4"``, ``"offload:2"``, ``"offload:fp8"``: coded first, then
the codes offloaded) has what it saves for backward copied to host memory in forward
and copied back before backward needs it. This module owns that copying: the
:class:`Offloader` (one per compressor: pack order, prefetch window, host-memory
bookkeeping) and the transports that move bytes (:class:`CudaTransport`, and any
object with the same three methods, which is how the logic is tested on CPU).

Rules the mechanism follows (the stream synchronisation is the point: the failures of
other offload implementations are races between these steps):

1. A tensor is offloaded in the pack hook, on a side *offload* stream that first waits
   for the compute stream (:meth:`torch.cuda.Stream.wait_stream`), so the copy reads
   the tensor only after the kernels that produce it, which were queued on the
   compute stream before the hook ran.
2. The copy goes into pinned host memory (``non_blocking``), so it overlaps with the
   forward's compute. The device tensor is then marked as used by the offload stream
   (``record_stream``): when the forward frees it, the caching allocator does not hand
   its block to a later allocation of the compute stream before the copy has read it.
   memfit keeps no reference to the device tensor after that.
3. An event recorded on the offload stream after the copy says when the host copy is
   complete; every copy back first waits for it (the host bytes are only valid then).
4. Backward unpacks roughly in the reverse of the pack order. When an entry is
   fetched, the ``prefetch`` entries packed just before it are copied back too
   (those not on the device yet), on a separate *prefetch* stream (a second copy engine:
   copies out of a later forward and copies in can overlap), so their transfer
   overlaps with the backward compute in between. Device memory for prefetches is
   thus bounded by the window, not by the number of saved tensors.
5. Before the compute stream uses a fetched tensor it waits for the event recorded
   after that tensor's copy back; the tensor, allocated on the prefetch stream, is
   marked as used by the compute stream (``record_stream``), so its block is not
   reused until backward's kernels that read it have run.
6. The host copy lives as long as the packed object (a retained graph unpacks it
   again); the device copy is held by memfit only until it is handed to autograd, so
   it is freed as soon as backward is done with it.
7. Host memory is checked before each copy: an offload whose running total would pass
   the limit (90% of the host memory available when the compressor first entered,
   or ``host_limit``) raises :class:`HostMemoryError` with the numbers, instead of
   letting pinned memory swap the machine to death. A step whose previous run
   offloaded more than the limit is refused when its ``with`` block is entered.
8. A tensor already in host memory (a CPU tensor, with the CUDA transport) is kept as
   is: there is nowhere cheaper to put it. Stats count it as ``offload-noop``.
9. Fake tensors (``memfit.estimate``) copy nothing: their host bytes are counted and
   the copy back is an empty tensor of the right size on the device, so the estimate
   sees the device memory that offload frees.

In-place modification of an offloaded tensor before backward raises PyTorch's error,
as for every saved tensor (the engine's version check runs before the fetch).

Limits: a tensor's device memory returns to the allocator once its copy out has
completed (rule 2), so when forward produces faster than the copies drain, more is
alive on the device than ``memfit.estimate`` counts (it frees offloaded tensors at
once). Each process checks its own limit: with several processes on one host (DDP),
give each an ``Offload(host_limit=...)`` share. Host bytes are counted per step: a second forward entered before the first
one's backward has run is checked against the limit on its own. Checked on CPU with a
fake transport only: its CUDA tests (tests/test_cuda.py) and DDP/FSDP2 have not run on
a GPU yet.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .._units import format_bytes
from ..codec import Encoded
from ..codec.blockwise import is_fake

__all__ = ["OFFLOAD", "CudaTransport", "HostMemoryError", "Offload", "Offloader", "Transport",
           "available_host_bytes", "split_offload"]

#: The setting word: ``"offload"`` alone, or ``"offload:<bits>"`` after coding.
OFFLOAD = "offload"



def split_offload(value: Any) -> tuple[Any, bool]:
    """``(inner setting, offloaded)`` of a user setting: ``"offload"`` is ``(None, True)``
    (values kept exact, on the host), ``"offload:4"`` is ``(4, True)``, ``"offload:fp8"``
    is ``("fp8", True)``; any other value is ``(value, False)``. The inner setting is
    checked by the caller, like any setting."""
    if not isinstance(value, str) or not value.lower().startswith(OFFLOAD):
        return value, False
    rest = value[len(OFFLOAD):]
    if rest == "":
        return None, True
    if not rest.startswith(":") or rest == ":":
        raise ValueError(
            f"invalid setting {value!r}; offload settings are 'offload' (exact values on the host) "
            "or 'offload:<bits>' with bits 8, 4, 2 or fp8 (e.g. 'offload:4')"
        )
    inner = rest[1:]
    return (int(inner) if inner.isdigit() else inner), True


class HostMemoryError(MemoryError):
    """Activation offload would need more host memory than its limit
    (:mod:`memfit.activations.offload`, rule 7); the message gives the numbers."""


def available_host_bytes() -> int:
    """Host memory available to new allocations without swapping, in bytes: Linux's
    ``MemAvailable``, else free physical pages (``os.sysconf``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 0


class Transport(Protocol):
    """What moves bytes between a device and the host. ``device_type`` is the device
    whose tensors it offloads; a transfer is any object the transport understands."""

    device_type: str

    def to_host(self, t: torch.Tensor) -> Any:
        """Start copying ``t`` to host memory; returns the transfer (rules 1-3)."""

    def to_device(self, transfer: Any, device: torch.device) -> Any:
        """Start copying a completed-or-queued host transfer back to ``device``."""

    def ready(self, transfer: Any) -> torch.Tensor:
        """The tensor a transfer made, safe to use on the current stream (rule 5)."""


@dataclass
class _CudaTransfer:
    tensor: torch.Tensor
    event: Any  # torch.cuda.Event recorded after the copy


class CudaTransport:
    """Copies on two side streams per device: one out (forward), one in (prefetch)."""

    device_type = "cuda"

    def __init__(self):
        self._streams: dict[int, tuple[Any, Any]] = {}

    def _pair(self, device: torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        pair = self._streams.get(index)
        if pair is None:
            pair = self._streams[index] = (torch.cuda.Stream(index), torch.cuda.Stream(index))
        return pair

    def to_host(self, t: torch.Tensor) -> _CudaTransfer:
        out_stream, _ = self._pair(t.device)
        out_stream.wait_stream(torch.cuda.current_stream(t.device))  # rule 1
        with torch.cuda.stream(out_stream):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)  # rule 2
            event = torch.cuda.Event()
            event.record(out_stream)  # rule 3
        t.record_stream(out_stream)
        return _CudaTransfer(host, event)

    def to_device(self, transfer: _CudaTransfer, device: torch.device) -> _CudaTransfer:
        _, in_stream = self._pair(device)
        in_stream.wait_event(transfer.event)  # rule 3
        with torch.cuda.stream(in_stream):
            dev = torch.empty(transfer.tensor.shape, dtype=transfer.tensor.dtype, device=device)
            dev.copy_(transfer.tensor, non_blocking=True)
            event = torch.cuda.Event()
            event.record(in_stream)
        return _CudaTransfer(dev, event)

    def ready(self, transfer: _CudaTransfer) -> torch.Tensor:
        compute = torch.cuda.current_stream(transfer.tensor.device)
        compute.wait_event(transfer.event)  # rule 5
        transfer.tensor.record_stream(compute)
        return transfer.tensor


@dataclass(frozen=True)
class Offload:
    """Options of activation offload (``memfit.activations(..., offload=Offload(...))``);
    which modules offload is the setting's business (``"offload"`` in ``bits`` or
    ``policy``).

    Attributes:
        prefetch: entries copied back ahead of backward (the module's rule 4); 0
            fetches each one only when backward asks for it.
        host_limit: the most host bytes offload may hold, or None for 90% of the host
            memory available when the compressor is first entered (the module's
            rule 7).
        transport: what moves the bytes; None for :class:`CudaTransport`.
    """

    prefetch: int = 2
    host_limit: int | None = None
    transport: Any = None

    def __post_init__(self):
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"Offload.prefetch must be a non-negative int, got {self.prefetch!r}")
        if self.host_limit is not None and (
            isinstance(self.host_limit, bool) or not isinstance(self.host_limit, int) or self.host_limit <= 0
        ):
            raise ValueError(f"Offload.host_limit must be a positive int (bytes) or None, got {self.host_limit!r}")
        if self.transport is not None and not all(
            hasattr(self.transport, name) for name in ("device_type", "to_host", "to_device", "ready")
        ):
            raise TypeError(
                "Offload.transport must have device_type, to_host, to_device and ready "
                f"(see memfit.activations.offload.Transport), got {type(self.transport).__name__}"
            )


class OffloadedEncoded:
    """An encoding whose tensors live on the host; :meth:`restore` gives the encoding
    back on its device. Held by the packed object (rule 6)."""

    __slots__ = ("skeleton", "names", "host", "device", "order", "index", "offloader", "fake_shapes",
                 "views", "uses", "_incoming", "_held", "__weakref__")

    def __init__(self, skeleton: Encoded, names: tuple[str, ...], host: list | None, device: torch.device,
                 order: list, offloader: "Offloader", fake_shapes: list | None):
        self.skeleton = skeleton  # the encoding with its tensor fields emptied
        self.names = names
        self.host = host  # transfers out, one per name (None for fake tensors)
        self.device = device
        self.order = order  # the pack order of its step (weak references)
        self.index = len(order)  # its position there
        self.offloader = offloader
        self.fake_shapes = fake_shapes  # (shape, dtype) per name, for fake tensors
        self.views = 0  # saved views of it (add_view)
        self.uses = 0  # of which not yet unpacked in this backward pass
        self._incoming: list | None = None  # transfers in, started by a prefetch
        self._held: Encoded | None = None  # on the device, until its last use has unpacked it

    @property
    def on_device(self) -> bool:
        return self._incoming is not None or self._held is not None

    def start_fetch(self) -> None:
        if self._incoming is not None:
            return
        if self.fake_shapes is not None:
            self._incoming = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in self.fake_shapes]
            return
        transport = self.offloader.transport
        self._incoming = [transport.to_device(h, self.device) for h in self.host]

    def restore(self) -> Encoded:
        """The encoding on its device, ready for the current stream (rules 4-6). Copied
        back once for all the views saved of it (held until the last has unpacked, see
        :meth:`unpacked`); a retained graph's next backward pass copies it again."""
        restored = self._held
        if restored is None:
            self.start_fetch()
            incoming, self._incoming = self._incoming, None
            if self.fake_shapes is None:
                tensors = [self.offloader.transport.ready(t) for t in incoming]
            else:
                tensors = incoming
            self.offloader.fetched(self)
            restored = dataclasses.replace(self.skeleton, **dict(zip(self.names, tensors)))
            self._held = restored if self.uses > 0 else None
        return restored

    def add_view(self) -> None:
        """One more saved view will unpack it (the engine calls this as it packs)."""
        self.views += 1
        self.uses += 1

    def unpacked(self) -> None:
        """One saved view of it was unpacked: after the last, memfit lets go of the
        device copy (rule 6), and counts the views again for a retained graph's next
        backward pass."""
        self.uses -= 1
        if self.uses <= 0:
            self._held = None
            self.uses = self.views


class Offloader:
    """Per compressor: offloads encodings in pack order and fetches them back with a
    prefetch window (rules 4, 7). :meth:`begin` starts a step."""

    def __init__(self, options: Offload | None = None):
        options = options or Offload()
        self.options = options
        self.transport = options.transport if options.transport is not None else CudaTransport()
        self.prefetch = options.prefetch
        self.host_limit: int | None = options.host_limit
        self.host_bytes = 0  # held by this step's offloaded entries
        self.last_step_host_bytes = 0
        self._order: list[weakref.ref] = []

    def applies(self, t: torch.Tensor) -> bool:
        """Whether offload moves ``t`` anywhere (rule 8)."""
        return t.device.type == self.transport.device_type

    def begin(self) -> None:
        """Start a step: forget the last one's order and refuse a step whose last run
        needed more host memory than the limit (rule 7)."""
        if self.host_limit is None:
            self.host_limit = int(available_host_bytes() * 0.9)
        self.last_step_host_bytes = max(self.last_step_host_bytes, self.host_bytes)
        if self.last_step_host_bytes > self.host_limit:
            raise HostMemoryError(self._too_much(self.last_step_host_bytes, "the previous step offloaded"))
        self.host_bytes = 0
        self._order = []

    def _too_much(self, need: int, what: str) -> str:
        return (
            f"memfit activation offload: {what} {format_bytes(need)} to host memory, but the limit is "
            f"{format_bytes(self.host_limit)} (90% of the host memory available when it started, "
            f"{format_bytes(available_host_bytes())} available now, or Offload(host_limit=...)); offload "
            "fewer modules (policy), offload codes instead of values ('offload:4'), or add host memory"
        )

    def put(self, encoded: Encoded) -> OffloadedEncoded:
        """Start copying ``encoded``'s tensors to the host (rules 1-3, 7, 9)."""
        # Every tensor the encoding holds, whatever the codec's layout: offload moves them all.
        names = tuple(f.name for f in dataclasses.fields(encoded)
                      if isinstance(getattr(encoded, f.name), torch.Tensor))
        tensors = [getattr(encoded, n) for n in names]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        fake = any(is_fake(t) for t in tensors)
        if not fake and self.host_bytes + nbytes > self.host_limit:
            raise HostMemoryError(self._too_much(self.host_bytes + nbytes, "this step would offload"))
        device = tensors[0].device
        if fake:
            host, shapes = None, [(t.shape, t.dtype) for t in tensors]
        else:
            host, shapes = [self.transport.to_host(t) for t in tensors], None
        self.host_bytes += nbytes
        skeleton = dataclasses.replace(encoded, **{n: None for n in names})
        handle = OffloadedEncoded(skeleton, names, host, device, self._order, self, shapes)
        self._order.append(weakref.ref(handle))
        return handle

    def fetched(self, handle: OffloadedEncoded) -> None:
        """``handle`` was fetched: prefetch the entries packed just before it (rule 4)."""
        order = handle.order
        for i in range(handle.index - 1, max(handle.index - 1 - self.prefetch, -1), -1):
            earlier = order[i]()
            if earlier is not None and not earlier.on_device:
                earlier.start_fetch()
