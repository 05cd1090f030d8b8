"""Compile memfit's Triton kernels for a CUDA target (sm_90) without a GPU and check
their PTX: no fused multiply-add, no approximate division or square root, any of which
would break bit-identity with the eager path. Run by tests/test_triton_kernels.py in a
child process, because it needs triton in compiled mode (TRITON_INTERPRET unset).

Prints ``kernels compiled: N`` and exits 0 when every kernel passes.
"""

from __future__ import annotations

import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from memfit.codec import _triton as codec_triton  # noqa: E402
from memfit.optim import _triton as optim_triton  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FORBIDDEN = {
    "fused multiply-add": r"\bfma\.",
    "approximate division": r"\bdiv\.(approx|full)\.",
    "approximate square root": r"\bsqrt\.approx\.",
    "approximate reciprocal": r"\brcp\.approx\.",
}


def _signature(fn, types: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = types.get(name, "*fp32")
        else:
            sig[name] = types.get(name, "i32")
    return sig


def _cases():
    q = dict(BITS=4, PB=2, BLOCK=64, SYMMETRIC=False, MID=7, TOP=15, STOCHASTIC=True, WIDE=False, IN_BF16=True, ROWS=64,
             BYTES_P2=32)
    yield "quantize_int", codec_triton._quantize_int_kernel, {"x_ptr": "*i16", "codes_ptr": "*u8", "nf_ptr": "*u8", "seed": "i64"}, q
    d = dict(BITS=4, PB=2, BLOCK=64, SYMMETRIC=False, MID=7, OUT_BF16=True, ROWS=64, BYTES_P2=32)
    yield "dequantize_int", codec_triton._dequantize_int_kernel, {"codes_ptr": "*u8", "out_ptr": "*i16"}, d
    # AdamW: the step with the most arithmetic (SGD and Lion are the same kernel, other branches)
    s = dict(ALGO=0, BITS=4, PB=2, BLOCK=128, SGD_WD=False, SGD_NESTEROV=False, SGD_FIRST=False, ROWS=32,
             BYTES_P2=64)
    types = {"c0_ptr": "*u8", "c1_ptr": "*u8", "redo_ptr": "*u8", **{f"h{i}": "fp32" for i in range(9)}}
    yield "step_adamw", optim_triton._step_kernel, types, s


def main() -> int:
    only = set(sys.argv[1:])
    failures, count = [], 0
    for name, fn, types, consts in _cases():
        if only and name not in only:
            continue
        src = ASTSource(fn, _signature(fn, types, consts), consts)
        ptx = triton.compile(src, target=TARGET, options={"enable_fp_fusion": False, "num_warps": 4}).asm["ptx"]
        count += 1
        for what, pattern in FORBIDDEN.items():
            hits = len(re.findall(pattern, ptx))
            if hits:
                failures.append(f"{name}: {hits} x {what}")
    print("\n".join(failures) if failures else f"kernels compiled: {count}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
