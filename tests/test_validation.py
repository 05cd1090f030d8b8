"""Bad input gets the same clear error everywhere (memfit._validate): bit widths,
optimizer hyperparameters, loaded optimizer state, parameters on the meta device."""

from __future__ import annotations

import math

import pytest
import torch

from memfit.codec import FP8Format, IntFormat
from memfit.optim import SGD, AdamW, Lion

OPTIMIZERS = [
    (AdamW, {}),
    (SGD, {"momentum": 0.9}),
    (SGD, {}),  # momentum 0 keeps no state: its options are checked all the same
    (Lion, {}),
]


def _param(n=64):
    return torch.nn.Parameter(torch.randn(n))


@pytest.mark.parametrize("cls, kw", OPTIMIZERS)
@pytest.mark.parametrize("bits, error", [(8.0, TypeError), (True, TypeError), ("8", TypeError), (16, ValueError)])
def test_state_bits_are_refused_alike_by_every_optimizer(cls, kw, bits, error):
    with pytest.raises(error) as info:
        cls([_param()], state_bits=bits, **kw)
    msg = str(info.value)
    assert msg.startswith("state_bits must be") and "32, 8 or 4" in msg and repr(bits) in msg


@pytest.mark.parametrize("cls, kw", OPTIMIZERS)
def test_param_group_options_are_checked_like_the_defaults(cls, kw):
    with pytest.raises(TypeError, match="state_bits must be an int"):
        cls([{"params": [_param()], "state_bits": 4.0}], **kw)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got nan"):
        cls([{"params": [_param()], "lr": math.nan}], **kw)


@pytest.mark.parametrize("cls, kw", OPTIMIZERS)
@pytest.mark.parametrize("lr", [math.nan, math.inf, -1e-3, torch.tensor(math.nan)])
def test_lr_must_be_finite_and_non_negative(cls, kw, lr):
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        cls([_param()], lr=lr, **kw)


@pytest.mark.parametrize("cls", [AdamW, Lion])
@pytest.mark.parametrize("betas, index", [((1.0, 0.99), 0), ((0.9, 1.0), 1), ((0.9, math.nan), 1), ((-0.1, 0.9), 0)])
def test_betas_must_be_in_0_1(cls, betas, index):
    with pytest.raises(ValueError, match=rf"betas\[{index}\] must be in \[0, 1\)"):
        cls([_param()], betas=betas)


@pytest.mark.parametrize("cls", [AdamW, Lion])
def test_betas_must_be_a_pair(cls):
    with pytest.raises(TypeError, match="betas must be a pair"):
        cls([_param()], betas=0.9)


def test_other_hyperparameters():
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        AdamW([_param()], eps=math.nan)
    for cls in (AdamW, SGD, Lion):
        with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
            cls([_param()], weight_decay=-1.0)
    with pytest.raises(ValueError, match="momentum must be a finite number >= 0"):
        SGD([_param()], momentum=math.inf)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0 and dampening = 0"):
        SGD([_param()], nesterov=True)
    with pytest.raises(TypeError, match="min_quantized_numel must be an int"):
        AdamW([_param()], min_quantized_numel=10.0)


def test_loading_a_state_dict_checks_its_groups():
    opt = Lion([_param()])
    sd = opt.state_dict()
    sd["param_groups"][0]["betas"] = (1.0, 0.99)
    with pytest.raises(ValueError, match=r"parameter group 0: betas\[0\] must be in \[0, 1\)"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf])
@pytest.mark.parametrize("cls, kw", [(AdamW, {}), (SGD, {"momentum": 0.9}), (Lion, {})])
def test_loaded_state_with_a_bad_scale_is_refused_naming_the_parameter(cls, kw, bad):
    params = [_param(16), _param(600)]
    opt = cls(params, min_quantized_numel=0, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    name = cls([_param()], **kw)._STATE_NAMES[0]
    sd["state"][1][f"{name}_absmax"][1] = bad
    fresh = cls([_param(16), _param(600)], min_quantized_numel=0, **kw)
    with pytest.raises(ValueError, match=f"parameter 1: {name}_absmax holds NaN, infinite or negative scales"):
        fresh.load_state_dict(sd)
    assert not fresh.state  # nothing was loaded


@pytest.mark.parametrize("cls, kw", [(AdamW, {}), (SGD, {"momentum": 0.9}), (Lion, {})])
def test_a_meta_parameter_with_quantized_state_gets_a_clear_error(cls, kw):
    w = torch.nn.Parameter(torch.empty(8192, device="meta"))
    w.grad = torch.empty(8192, device="meta")
    opt = cls([w], **kw)
    with pytest.raises(ValueError, match="on the meta device.*to_empty.*state_bits=32"):
        opt.step()


@pytest.mark.parametrize("bits, error", [(8.0, TypeError), (True, TypeError), (3, ValueError), (16, ValueError)])
def test_int_format_bits(bits, error):
    with pytest.raises(error, match="IntFormat bits must be"):
        IntFormat(bits=bits)


def test_format_block_sizes_and_options():
    with pytest.raises(ValueError, match="block_size must be an int"):
        IntFormat(block_size=256.0)
    with pytest.raises(ValueError, match="block_size must be an int"):
        FP8Format(block_size="256")
    with pytest.raises(ValueError, match="multiple of 8"):
        IntFormat(block_size=100)
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        IntFormat(symmetric=1)
    with pytest.raises(ValueError, match="rounding must be 'stochastic' or 'nearest'"):
        IntFormat(rounding="floor")
    assert IntFormat(bits=4, block_size=64).bits == 4

