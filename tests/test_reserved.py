"""The CUDA caching allocator model (memfit.plan.reserved): pure functions of sizes."""

import random

import pytest

from memfit.plan.reserved import CachingAllocatorModel, reserved_bytes, round_size, segment_size

KiB, MiB = 1 << 10, 1 << 20


def test_round_size_is_512_byte_blocks():
    assert round_size(0) == 512
    assert round_size(1) == 512
    assert round_size(512) == 512
    assert round_size(513) == 1024
    assert round_size(10 * MiB + 1) == 10 * MiB + 512


def test_segment_sizes_follow_the_pools():
    assert segment_size(512) == 2 * MiB
    assert segment_size(MiB) == 2 * MiB  # 1 MiB is still small
    assert segment_size(MiB + 512) == 20 * MiB
    assert segment_size(10 * MiB - 512) == 20 * MiB
    assert segment_size(10 * MiB) == 10 * MiB
    assert segment_size(10 * MiB + 512) == 12 * MiB  # rounded up to 2 MiB


def test_small_requests_pack_into_2mib_segments():
    assert reserved_bytes([4 * KiB] * 512) == 2 * MiB  # exactly one segment's worth
    assert reserved_bytes([4 * KiB] * 513) == 4 * MiB
    assert reserved_bytes([MiB, MiB, MiB]) == 4 * MiB  # two per segment
    assert reserved_bytes([100]) == 2 * MiB


def test_mid_sized_requests_share_a_20mib_segment():
    # 1-10 MiB requests split a 20 MiB segment while more than 1 MiB would remain.
    assert reserved_bytes([4 * MiB] * 5) == 20 * MiB
    assert reserved_bytes([4 * MiB] * 6) == 40 * MiB
    # 19.5 MiB used leaves 0.5 MiB, not more than 1 MiB: the next one takes a new segment.
    assert reserved_bytes([9 * MiB + 768 * KiB, 9 * MiB + 768 * KiB, 2 * MiB]) == 40 * MiB


def test_large_requests_get_their_own_rounded_segment():
    assert reserved_bytes([100 * MiB + 1]) == 102 * MiB
    assert reserved_bytes([64 * MiB, 64 * MiB]) == 128 * MiB


def test_freed_blocks_are_reused_and_merged_never_returned():
    m = CachingAllocatorModel()
    a = m.malloc(6 * MiB)
    b = m.malloc(6 * MiB)
    assert m.reserved == 20 * MiB and m.allocated == 12 * MiB
    m.free(a)
    m.free(b)
    assert m.reserved == 20 * MiB and m.allocated == 0  # kept reserved
    # a and b merged with the rest: one 20 MiB block serves a 19 MiB request.
    m.malloc(19 * MiB)
    assert m.reserved == 20 * MiB
    # A small request never uses the large pool.
    m.malloc(512)
    assert m.reserved == 22 * MiB


def test_best_fit_picks_the_smallest_free_block():
    m = CachingAllocatorModel()
    big = m.malloc(30 * MiB)
    small = m.malloc(12 * MiB)
    m.free(big)
    m.free(small)
    m.malloc(12 * MiB)  # into the 12 MiB block, not the 30 MiB one
    m.malloc(30 * MiB)
    assert m.reserved == 42 * MiB


def test_reserved_bounds_against_a_random_trace():
    rng = random.Random(0)
    m = CachingAllocatorModel()
    live = []
    for _ in range(2000):
        if live and rng.random() < 0.45:
            m.free(live.pop(rng.randrange(len(live))))
        else:
            live.append(m.malloc(rng.choice([rng.randrange(1, 4096), rng.randrange(1, 2 * MiB),
                                             rng.randrange(1, 40 * MiB)])))
        assert m.allocated <= m.reserved
        assert m.peak_allocated <= m.peak_reserved == m.reserved
    for h in live:
        m.free(h)
    assert m.allocated == 0
    # Everything merged back: each segment is one free block again, so replaying the
    # same segments' worth fits without reserving more.
    before = m.reserved
    pools = m._free
    assert sum(size for (size, _, _), _ in pools[True] + pools[False]) == before


def test_bad_input():
    m = CachingAllocatorModel()
    with pytest.raises(ValueError, match="nbytes"):
        m.malloc(-1)
    with pytest.raises(ValueError, match="handle"):
        m.free(7)


def test_trace_replays_the_storages_ops_make():
    import torch

    from memfit.plan.reserved import AllocationTrace

    trace = AllocationTrace("cpu")
    a = torch.empty(3 * MiB, dtype=torch.uint8)
    b = torch.empty(100, dtype=torch.uint8)
    a_view = a[10:]  # a view: no new storage
    c = torch.empty(12 * MiB, dtype=torch.uint8)
    trace.add([a])
    trace.observe((b, a_view, None))
    trace.observe({"c": c, "again": a})
    trace.observe(torch.empty(2, device="meta"))  # another device: not counted
    assert trace.allocator.reserved == reserved_bytes([3 * MiB, 100, 12 * MiB])
    assert trace.allocator.allocated == 3 * MiB + 512 + 12 * MiB
    del a
    assert trace.allocator.allocated == 3 * MiB + 512 + 12 * MiB  # the view keeps it
    del a_view, b, c
    assert trace.allocator.allocated == 0


def test_estimate_reports_reserved_and_host_bytes():
    import torch

    import memfit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    batch = torch.randn(64, 256)
    loss = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    plain = memfit.estimate(model, batch, loss_fn=loss)
    assert plain.reserved_bytes >= plain.peak_bytes
    assert plain.reserved_bytes % (2 * MiB) == 0  # whole segments
    assert "CUDA allocator would reserve" in str(plain)
    # A CPU model's tensors stay in host memory under offload: nothing moves.
    off = memfit.estimate(model, batch, loss_fn=loss, policy="offload")
    assert off.host_bytes == 0 and off.peak_bytes == plain.peak_bytes
