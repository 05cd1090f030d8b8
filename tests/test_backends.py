"""memfit._backends: the one place that chooses the codec's and the optimizers' kernels.

``MEMFIT_KERNELS=auto`` picks the best available per device (and warns once when the
fused CPU kernels cannot be had); an explicit backend that cannot run raises an error
naming the fix; a ``triton`` module under the protocol's names is loaded and used by
both the codec and the optimizers (shown with stand-in modules that delegate to the
eager reference and record their calls).
"""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

import memfit
from memfit import _backends
from memfit.codec import IntFormat, _eager, decode, encode
from memfit.optim import _qstate


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    """Each test starts with nothing loaded, nothing warned and no override."""
    monkeypatch.setattr(_backends, "_loads", {})
    monkeypatch.setattr(_backends, "_warned", set())
    monkeypatch.delenv("MEMFIT_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_unknown_choice_names_the_accepted_values(monkeypatch):
    monkeypatch.setenv("MEMFIT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MEMFIT_KERNELS='cuda': expected one of auto, eager, cpu, triton"):
        memfit.codec.backend_name("cpu")


def test_eager_is_chosen_everywhere_when_asked(monkeypatch):
    monkeypatch.setenv("MEMFIT_KERNELS", "eager")
    assert memfit.codec.backend_name("cpu") == "eager" and memfit.optim.backend_name("cpu") == "eager"
    assert memfit.codec.kernels.backend_for(torch.device("cpu")) is _eager


def test_auto_on_other_devices_is_eager():
    assert memfit.codec.backend_name("meta") == "eager"
    assert memfit.optim.backend_name("meta") == "eager"


def test_auto_falls_back_to_eager_with_one_warning_per_family(monkeypatch):
    from memfit.codec import _cpu
    from memfit.optim import _kernels

    def broken():
        raise OSError("no compiler here")

    monkeypatch.setattr(_cpu, "load", broken)
    monkeypatch.setattr(_kernels, "load", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randn(300)
        for _ in range(3):
            decode(encode(x, IntFormat(bits=4)))
            assert memfit.codec.backend_name("cpu") == "eager"
            assert memfit.optim.backend_name("cpu") == "eager"
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 2, msgs
    assert msgs[0].startswith("memfit: fused CPU kernels unavailable (OSError: no compiler here)")
    assert msgs[1].startswith("memfit.optim: fused CPU step unavailable (OSError: no compiler here)")
    assert all("pip install ninja" in m for m in msgs)


def test_cpu_asked_for_but_not_buildable_raises_naming_the_fix(monkeypatch):
    from memfit.codec import _cpu

    monkeypatch.setattr(_cpu, "load", lambda: (_ for _ in ()).throw(OSError("no compiler here")))
    monkeypatch.setenv("MEMFIT_KERNELS", "cpu")
    with pytest.raises(_backends.KernelBackendError, match="MEMFIT_KERNELS=cpu: .*no compiler here.*ninja.*unset"):
        encode(torch.randn(100), IntFormat())


def test_cpu_asked_for_on_another_device_raises():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMFIT_KERNELS", "cpu")
        with pytest.raises(_backends.KernelBackendError, match="CPU tensors only, got a meta tensor"):
            memfit.codec.backend_name("meta")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("MEMFIT_KERNELS", "triton")
    with pytest.raises(_backends.KernelBackendError, match="CUDA tensors.*TRITON_INTERPRET=1.*unset MEMFIT_KERNELS"):
        encode(torch.randn(100), IntFormat())
    with pytest.raises(_backends.KernelBackendError, match="TRITON_INTERPRET=1"):
        memfit.optim.backend_name("cpu")


def test_triton_without_triton_installed_names_the_extra(monkeypatch):
    monkeypatch.setenv("MEMFIT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    monkeypatch.setitem(sys.modules, "memfit.codec._triton", None)
    monkeypatch.setitem(sys.modules, "memfit.optim._triton", None)
    with pytest.raises(_backends.KernelBackendError, match=r"pip install 'memfit\[triton\]'"):
        memfit.codec.backend_name("cpu")
    with pytest.raises(_backends.KernelBackendError, match=r"pip install 'memfit\[triton\]'"):
        memfit.optim.backend_name("cpu")


def test_auto_skips_a_missing_triton_quietly(monkeypatch):
    monkeypatch.setitem(sys.modules, "memfit.codec._triton", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends.backend("codec", "cuda").name == "eager"  # no CUDA needed to choose


def _stand_in_codec(calls: list) -> types.ModuleType:
    mod = types.ModuleType("memfit.codec._triton")
    mod.NAME = "triton"
    mod.available = lambda: True
    for fn in ("quantize_int", "dequantize_int", "quantize_fp8", "dequantize_fp8", "pack_bits", "unpack_bits"):
        def call(*args, _fn=fn):
            calls.append(_fn)
            return getattr(_eager, _fn)(*args)
        setattr(mod, fn, call)
    return mod


def _stand_in_optim(calls: list) -> types.ModuleType:
    mod = types.ModuleType("memfit.optim._triton")
    mod.NAME = "triton"
    mod.available = lambda: True

    def step(algo, p, g, codes, absmax, values, table, mids, tparams, bits, block, redo, hp):
        calls.append((algo, bits, block, redo.numel()))
        redo.fill_(1)  # decline every block: the eager step redoes them
    mod.step = step
    return mod


def test_a_triton_module_under_the_protocol_names_is_used_by_codec_and_optim(monkeypatch):
    codec_calls, optim_calls = [], []
    monkeypatch.setitem(sys.modules, "memfit.codec._triton", _stand_in_codec(codec_calls))
    monkeypatch.setitem(sys.modules, "memfit.optim._triton", _stand_in_optim(optim_calls))
    monkeypatch.setenv("MEMFIT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert memfit.codec.backend_name("cpu") == "triton" and memfit.optim.backend_name("cpu") == "triton"

    x = torch.randn(1000)
    y = decode(encode(x, IntFormat(bits=8, rounding="nearest")))
    assert codec_calls == ["quantize_int", "dequantize_int"]
    codes, scale, lo, _ = _eager.quantize_int(x, 8, 256, False, False, 0)
    assert torch.equal(y, _eager.dequantize_int(codes, scale, lo, 8, 256, 1000, torch.float32))

    w = torch.nn.Parameter(torch.randn(600))
    ref = torch.nn.Parameter(w.detach().clone())
    opt = memfit.optim.AdamW([w], lr=1e-2, min_quantized_numel=0)
    g = torch.randn(600)
    w.grad, ref.grad = g.clone(), g.clone()
    opt.step()
    assert optim_calls == [(_qstate.ALGO_ADAMW, 8, 256, 3)]
    monkeypatch.setenv("MEMFIT_KERNELS", "eager")
    ref_opt = memfit.optim.AdamW([ref], lr=1e-2, min_quantized_numel=0)
    ref_opt.step()
    assert torch.equal(w, ref)
    assert torch.equal(opt.state[w]["exp_avg_codes"], ref_opt.state[ref]["exp_avg_codes"])
