"""What time the planner prices its choices with: throughput probes of the codec and
the optimizers on this machine, and per-unit forward times from a short profile.

This module owns :func:`codec_seconds_per_byte`,
:func:`optimizer_seconds_per_param` and :func:`offload_seconds_per_byte` (the
host<->device copy bandwidth, on CUDA only) (measured once per process, cached in
``_PROBE_CACHE``), :func:`unit_times` (forward time per unit, the plain step's time,
what compressing adds to it) and :func:`codec_costs` (seconds per compressible byte).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections import Counter
from typing import Mapping

import torch

from ..step import StepConfig, make_optimizer
from .units import Trace

__all__ = ["codec_costs", "codec_seconds_per_byte", "offload_seconds_per_byte", "optimizer_seconds_per_param",
           "unit_times"]

_PROBE_CACHE: dict = {}


def offload_seconds_per_byte(device: torch.device, n_bytes: int = 64 * 2**20, reps: int = 5) -> float | None:
    """Seconds per byte copied one way between pinned host memory and ``device``
    (the slower of the two directions, median of ``reps``), measured once per process;
    None where there is no such copy (a CPU device: its tensors already are in host
    memory), so the planner does not offer offload there."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    key = ("offload", str(device), n_bytes)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    host = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    per_direction = []
    for dst, src in ((host, dev), (dev, host)):
        dst.copy_(src, non_blocking=True)  # warm up
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        per_direction.append(statistics.median(times) / n_bytes)
    _PROBE_CACHE[key] = max(per_direction)
    return _PROBE_CACHE[key]


def codec_seconds_per_byte(n_bytes: int = 32 * 2**20, reps: int = 5) -> dict[int, float]:
    """Seconds per uncompressed byte to encode (stochastic rounding) and decode, at
    8, 4 and 2 bits, on this machine (measured once per process, on ``n_bytes``).

    This is the codec alone, in a loop: :func:`memfit.plan` prices compression from the
    codec's time inside real steps instead (``Profile.codec_seconds``), and uses
    these figures only when it does not profile (``step_seconds`` given). Every
    width is warmed up twice before any is timed: the first decodes into fresh
    memory run at a third of the speed (page faults), which made whichever width
    came first look three times dearer than the others."""
    key = ("codec", torch.get_num_threads(), n_bytes)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    from ..codec import IntFormat, decode, encode

    x = torch.randn(n_bytes // 4)
    formats = {bits: IntFormat(bits=bits, block_size=256, rounding="stochastic") for bits in (8, 4, 2)}
    for _ in range(2):  # warm up: kernels, and the allocator's pages
        for fmt in formats.values():
            decode(encode(x, fmt, seed=1))
    out = {}
    for bits, fmt in formats.items():
        times = []
        for r in range(reps):
            t0 = time.perf_counter()
            enc = encode(x, fmt, seed=r)
            decode(enc)
            times.append(time.perf_counter() - t0)
        out[bits] = statistics.median(times) / x.nbytes
    _PROBE_CACHE[key] = out
    return out


def optimizer_seconds_per_param(optimizer: str, n: int = 2**20, reps: int = 3) -> dict[int, float]:
    """Seconds per parameter element of one optimizer step at 32, 8 and 4 state bits
    (:func:`~memfit.plan.make_optimizer`'s optimizers), measured once per process."""
    key = ("optim", optimizer, torch.get_num_threads())
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for bits in (32, 8, 4):
            probe = torch.nn.Module()
            probe.w = torch.nn.Parameter(torch.randn(n // 1024, 1024) * 0.02)
            cfg = StepConfig(optimizer=optimizer, state_bits=bits)
            opt = make_optimizer(probe, cfg)
            probe.w.grad = torch.randn_like(probe.w) * 1e-3
            opt.step()  # state, kernels
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
            out[bits] = statistics.median(times) / n
            del opt, probe
    _PROBE_CACHE[key] = out
    return out



def unit_times(model, batch, loss_fn, names, trace: Trace, steps: int, step_seconds: float | None, optimizer: str,
               autocast: str | None = None):
    """``(forward seconds per unit (inclusive), forward+backward seconds, optimizer-step
    seconds or None, what compressing every activation at 4 bits adds to
    forward+backward or None)`` from :func:`memfit.plan.profile` (real steps, fp32
    optimizer; then the same with ``policy=4``; both under ``autocast``, as the step
    will run). With ``step_seconds`` given, no profile: forward ~ a third of it, spread
    over units by their saved bytes.

    On CPU the compression cost is the codec time measured inside the compressed
    steps (``Profile.codec_seconds``). Elsewhere the codec runs asynchronously, so it
    is the difference of the two profiles' step times, which is noisy: one step each
    by default, and a 5% swing of either step moves the planner's choice between
    compressed activations and compressed optimizer state."""
    if step_seconds is None:
        from .profile import profile as _profile

        prof = _profile(model, batch, loss_fn=loss_fn, steps=steps, config=StepConfig(optimizer=optimizer, autocast=autocast))
        fwd = {n: float(prof.modules[n].forward_seconds) for n in names if n in prof.modules}
        fb = float(prof.forward_seconds + prof.backward_seconds)
        if fb > 0:
            added = None
            if sum(c["float"] for c in trace.saved.values()) > 0:
                p4 = _profile(model, batch, loss_fn=loss_fn, steps=steps,
                              config=StepConfig(optimizer=optimizer, policy=4, autocast=autocast))
                on_cpu = all(p.device.type == "cpu" for p in model.parameters())
                if on_cpu and p4.codec_seconds > 0:
                    added = float(p4.codec_seconds)
                else:
                    added = max(0.0, float(p4.forward_seconds + p4.backward_seconds) - fb)
            return fwd, fb, float(prof.optimizer_seconds) or None, added
        step_seconds = float(prof.step_seconds) or 1.0
    total_saved = sum(c["total"] for c in trace.saved.values()) or 1
    fwd = {n: step_seconds / 3 * trace.saved.get(n, Counter())["total"] / total_saved for n in names}
    return fwd, step_seconds, None, None


def codec_costs(probe: Mapping[int, float], compressed_seconds: float | None, trace: Trace) -> dict[int, float]:
    """Seconds per compressible byte that compressing costs a step, per width: what
    compressing every activation at 4 bits added to a step (:func:`unit_times`), per
    compressible byte, for every width (the codec is memory-bound: in a step 8, 4 and
    2 bits cost the same per input byte to within the measurement's noise), at least
    2% of the codec-alone figure so that it is never free; the probe alone without a
    measurement."""
    floats = sum(c["float"] for c in trace.saved.values())
    if compressed_seconds is None or floats <= 0:
        return dict(probe)
    measured = compressed_seconds / floats
    return {b: max(measured, 0.02 * probe[b]) for b in probe}

