"""Throughput of the codec kernels on CPU: fused C++ (``cpp``) vs eager PyTorch vs a
plain ``x.clone()`` (the cost of one memory copy, allocation included).

GB/s = bytes of the *uncompressed* fp32 tensor (bool tensor for the bit mask) per
second, in both directions, so every number compares directly with clone(). Each
figure is the median over repetitions, and the repetitions are interleaved (one run of
every kernel per round) so that drifting machine load hits them all alike.

    python bench/codec_throughput.py [--sizes 16M 64M] [--reps 7] [--threads N] [--no-eager]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memfit.codec import _cpu, _eager


def _parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


def _cases(n: int, cpp, eager: bool):
    """(label, backend, nbytes, thunk) for one tensor size."""
    x = torch.randn(n, dtype=torch.float32)
    m = torch.rand(n) < 0.5
    cases = [("clone", "torch", x.nbytes, lambda: x.clone())]
    backends = [("cpp", cpp)] + ([("eager", _eager)] if eager else [])
    for bits in (8, 4, 2):
        for rnd in ("nearest", "stochastic"):
            st = rnd == "stochastic"
            for name, k in backends:
                enc = k.quantize_int(x, bits, 256, False, st, 1)
                cases.append((f"int{bits} quantize {rnd}", name, x.nbytes,
                              lambda k=k, b=bits, s=st: k.quantize_int(x, b, 256, False, s, 1)))
                if st:  # decoding does not depend on the rounding
                    continue
                cases.append((f"int{bits} dequantize", name, x.nbytes,
                              lambda k=k, b=bits, e=enc: k.dequantize_int(e[0], e[1], e[2], b, 256, n,
                                                                          torch.float32)))
    for name, k in backends:
        packed = k.pack_bits(m)
        cases.append(("bitmask pack", name, m.nbytes, lambda k=k: k.pack_bits(m)))
        cases.append(("bitmask unpack", name, m.nbytes, lambda k=k, p=packed: k.unpack_bits(p, n)))
    cases.append(("clone (bool)", "torch", m.nbytes, lambda: m.clone()))
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["16M", "64M"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-eager", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpp = _cpu.load()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GB/s of uncompressed bytes, "
          f"median of {args.reps} interleaved reps; 'vs clone' = time / clone time (fp32 clone "
          f"for int rows, bool clone for bitmask rows)")
    for size in args.sizes:
        n = _parse_size(size)
        cases = _cases(n, cpp, not args.no_eager)
        for _, _, _, f in cases:  # warm up (first-touch, lazy init)
            f()
        times = [[] for _ in cases]
        for r in range(args.reps):
            order = range(len(cases)) if r % 2 == 0 else reversed(range(len(cases)))
            for i in order:
                t0 = time.perf_counter()
                cases[i][3]()
                times[i].append(time.perf_counter() - t0)
        med = [statistics.median(t) for t in times]
        clone_f32 = med[0]
        clone_bool = med[-1]
        print(f"\nn = {size} ({n} elements)")
        print(f"{'kernel':<28}{'backend':<8}{'GB/s':>8}{'ms':>10}{'vs clone':>10}")
        for (label, backend, nbytes, _), t in zip(cases, med):
            ref = clone_bool if label.startswith("bitmask") or label == "clone (bool)" else clone_f32
            print(f"{label:<28}{backend:<8}{nbytes / t / 1e9:>8.2f}{t * 1e3:>10.2f}{t / ref:>10.2f}")


if __name__ == "__main__":
    main()
