"""What PyTorch's CUDA caching allocator reserves for a sequence of allocations.

An out-of-memory error on CUDA happens when the allocator cannot *reserve* a segment
(``torch.cuda.memory_reserved``), not when live tensors (``memory_allocated``) pass
the card's size: the allocator rounds each request and carves requests out of larger
segments, and a freed block stays reserved. :class:`CachingAllocatorModel` replays
allocations and frees with the allocator's default rules (``c10/cuda/
CUDACachingAllocator.cpp``, no ``PYTORCH_CUDA_ALLOC_CONF`` options, one stream):

1. A request is rounded up to a multiple of 512 bytes (512 at least).
2. Requests of at most 1 MiB come from the *small* pool, whose segments are 2 MiB;
   larger ones from the *large* pool.
3. When no free block of the pool fits, a segment is reserved: 2 MiB for a small
   request, 20 MiB for a request under 10 MiB, else the request rounded up to 2 MiB.
4. The smallest free block that fits is used (best fit); it is split when what
   remains is at least 512 bytes (small pool) or more than 1 MiB (large pool), else
   the request takes the whole block.
5. A freed block merges with free neighbours of its segment; segments are never given
   back (no ``empty_cache``), so the reserved total only grows.

It is a pure function of the sizes and their order: no GPU is needed, which is how it
is tested; ``memfit.estimate`` feeds it the step's allocations (on fake tensors) for
:attr:`~memfit.plan.Estimate.reserved_bytes`. Not modelled: several streams (a block
freed on one is not reused on another), expandable segments, ``max_split_size_mb``
and ``roundup_power2_divisions``, the CUDA context (outside the allocator),
library workspaces (cuBLAS) that no op of the step makes as a tensor, and what the
allocator does when the device is full (it frees cached segments and retries): the
figure is what is reserved without memory pressure.
"""

from __future__ import annotations

import bisect
import weakref
from typing import Iterable

import torch
from torch.utils._pytree import tree_flatten

__all__ = ["AllocationTrace", "CachingAllocatorModel", "reserved_bytes", "round_size", "segment_size"]

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20  # requests up to this come from the small pool
SMALL_SEGMENT = 2 << 20
LARGE_SEGMENT = 20 << 20  # reserved for large requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(nbytes: int) -> int:
    """A request's size as the allocator serves it (rule 1)."""
    if nbytes < MIN_BLOCK:
        return MIN_BLOCK
    return -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(rounded: int) -> int:
    """The segment the allocator reserves when no cached block fits (rule 3)."""
    if rounded <= SMALL_SIZE:
        return SMALL_SEGMENT
    if rounded < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-rounded // ROUND_LARGE) * ROUND_LARGE


class _Block:
    __slots__ = ("segment", "offset", "size", "small", "free", "prev", "next")

    def __init__(self, segment: int, offset: int, size: int, small: bool):
        self.segment, self.offset, self.size, self.small = segment, offset, size, small
        self.free = True
        self.prev: _Block | None = None
        self.next: _Block | None = None

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment, self.offset)


class CachingAllocatorModel:
    """Replays :meth:`malloc` / :meth:`free` with the caching allocator's rules; says
    what is reserved (:attr:`reserved`, :attr:`peak_reserved`) and allocated
    (:attr:`allocated`, :attr:`peak_allocated`: rounded sizes, what
    ``torch.cuda.memory_allocated`` counts)."""

    def __init__(self):
        self.reserved = 0
        self.allocated = 0
        self.peak_reserved = 0
        self.peak_allocated = 0
        self._free: dict[bool, list] = {True: [], False: []}  # small pool?: sorted (key, block)
        self._live: dict[int, _Block] = {}
        self._segments = 0
        self._next_handle = 0

    def malloc(self, nbytes: int) -> int:
        """Allocate ``nbytes``; returns a handle for :meth:`free`."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._free[small]
        i = bisect.bisect_left(pool, ((size, -1, -1),))
        if i < len(pool):
            block = pool.pop(i)[1]
        else:
            seg = segment_size(size)
            block = _Block(self._segments, 0, seg, small)
            self._segments += 1
            self.reserved += seg
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remaining = block.size - size
        if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_SIZE):
            rest = _Block(block.segment, block.offset + size, remaining, small)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            bisect.insort(pool, (rest.key(), rest))
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        handle = self._next_handle
        self._next_handle += 1
        self._live[handle] = block
        return handle

    def free(self, handle: int) -> None:
        """Free what :meth:`malloc` returned ``handle`` for (rule 5)."""
        block = self._live.pop(handle, None)
        if block is None:
            raise ValueError(f"handle {handle!r} is not a live allocation")
        self.allocated -= block.size
        pool = self._free[block.small]
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                pool.pop(bisect.bisect_left(pool, (neighbour.key(),)))
                if neighbour is block.prev:
                    neighbour.size += block.size
                    neighbour.next = block.next
                    if block.next is not None:
                        block.next.prev = neighbour
                    block = neighbour
                else:
                    block.size += neighbour.size
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
        bisect.insort(pool, (block.key(), block))


def reserved_bytes(sizes: Iterable[int]) -> int:
    """What the allocator reserves to hold allocations of ``sizes`` (bytes), made in
    this order and all alive at once."""
    model = CachingAllocatorModel()
    for n in sizes:
        model.malloc(n)
    return model.reserved


class AllocationTrace:
    """Replays a step's tensor allocations into a :class:`CachingAllocatorModel`:
    :meth:`observe` is given each op's output (the step tracker calls it, see
    :func:`memfit.step.tracked_steps`' ``observe``) and counts each new storage on
    ``device_type`` (allocated when first seen, freed when its storage dies); :meth:`add`
    names the storages made before the step (parameters, buffers, the batch). It works
    on fake tensors as on real ones; nothing is allocated for it."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.allocator = CachingAllocatorModel()
        self._live: dict[int, tuple] = {}  # id(storage) -> (weakref, handle)

    def add(self, tensors: Iterable) -> None:
        """Count storages that exist before the traced code runs."""
        for t in tensors:
            self._see(t)

    def observe(self, out) -> None:
        """Count the new storages among an op's outputs ``out``."""
        if isinstance(out, torch.Tensor):
            self._see(out)
        elif isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) or t is None for t in out):
            for t in out:
                if t is not None:
                    self._see(t)
        else:
            for t in tree_flatten(out)[0]:
                self._see(t)

    def _see(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type or t.is_sparse:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage of their own
            return
        key = id(storage)
        known = self._live.get(key)
        if known is not None and known[0]() is storage:
            return
        handle = self.allocator.malloc(storage.nbytes())

        def freed(_ref, key=key, handle=handle):
            entry = self._live.get(key)
            if entry is not None and entry[1] == handle:
                del self._live[key]
            self.allocator.free(handle)

        self._live[key] = (weakref.ref(storage, freed), handle)
