"""Activation offload (memfit.activations.offload): the logic, on CPU.

The copies themselves need a GPU (tests/test_cuda.py runs them there); here a fake
transport that treats CPU tensors as the "device" copies through clones and logs every
call, so ordering, the prefetch window, bookkeeping, errors and gradients are checked.
"""

import gc
import weakref

import pytest
import torch

import memfit
from memfit.activations import HostMemoryError, Offload
from memfit._units import format_bytes
from memfit.activations.offload import available_host_bytes, split_offload


class FakeTransport:
    """Moves CPU tensors "to the host" by cloning them; logs (what, id of the host copy)."""

    device_type = "cpu"

    def __init__(self):
        self.log = []
        self.host_ids = {}

    def to_host(self, t):
        host = t.detach().clone()
        self.log.append(("out", id(host)))
        return host

    def to_device(self, host, device):
        self.log.append(("in", id(host)))
        return (id(host), host.clone().to(device))

    def ready(self, transfer):
        key, t = transfer
        self.log.append(("ready", key))
        return t


def make_model(width=64, depth=4):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


def grads(model, x, mf=None, *, retain=False):
    model.zero_grad(set_to_none=True)
    if mf is None:
        loss = model(x).pow(2).mean()
    else:
        with mf:
            loss = model(x).pow(2).mean()
    loss.backward(retain_graph=retain)
    out = [p.grad.clone() for p in model.parameters()]
    return (out, loss) if retain else out


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


X = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))


def test_offload_exact_gives_plain_gradients_and_counts_host_bytes():
    model = make_model()
    plain = grads(model, X)
    transport = FakeTransport()
    mf = memfit.activations(model, "offload", offload=Offload(transport=transport), min_bytes=1024)
    assert same(grads(model, X, mf), plain)
    st = mf.stats
    assert st.host_bytes > 0 and st.counts["offloaded"] > 0
    # Everything large enough went to the host: the device holds only what was small.
    assert st.host_bytes + st.stored_bytes == st.original_bytes
    outs = [k for w, k in transport.log if w == "out"]
    readies = [k for w, k in transport.log if w == "ready"]
    assert sorted(outs) == sorted(readies)  # every offloaded entry came back exactly once
    assert "offloaded to host" in st.table()


def test_offload_after_coding_equals_coding_alone():
    model = make_model()
    coded = memfit.activations(model, 4, min_bytes=1024, seed=3)
    g_coded = grads(model, X, coded)
    off = memfit.activations(model, "offload:4", min_bytes=1024, seed=3, offload=Offload(transport=FakeTransport()))
    g_off = grads(model, X, off)
    assert same(g_off, g_coded)
    # The codes moved: what 4-bit held on the device is now on the host.
    assert off.stats.host_bytes == coded.stats.stored_bytes - off.stats.stored_bytes
    assert off.stats.host_bytes > 0.9 * coded.stats.stored_bytes
    assert off.stats.original_bytes == coded.stats.original_bytes


def test_offloaded_formula_activation_moves_its_stored_input():
    # GPT-2's gelu_new stores only its input (as few-bit levels): offload moves those
    # codes to the host, and the gradients equal coding alone.
    activations = pytest.importorskip("transformers.activations")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), activations.NewGELUActivation(), torch.nn.Linear(256, 64))
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    coded = memfit.activations(model, 4, min_bytes=1024, seed=3)
    g_coded = grads(model, x, coded)
    off = memfit.activations(model, "offload:4", min_bytes=1024, seed=3, offload=Offload(transport=FakeTransport()))
    g_off = grads(model, x, off)
    assert same(g_off, g_coded)
    act, act_off = coded.stats.by_module["1"], off.stats.by_module["1"]
    assert act.counts["op-fewbit4"] == 1 and act.counts["op-recomputed"] >= 2
    assert act_off.host_bytes == act.stored_bytes > 0 and act_off.stored_bytes == 0


def test_cpu_tensors_with_the_cuda_transport_are_kept_and_say_so():
    model = make_model()
    plain = grads(model, X)
    mf = memfit.activations(model, "offload", min_bytes=1024)
    assert same(grads(model, X, mf), plain)
    assert mf.stats.host_bytes == 0
    assert mf.stats.counts["offload-noop"] > 0 and mf.stats.counts["offloaded"] == 0


def test_offloaded_tensor_is_released_by_memfit():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(128, 64)

    def run(mf):
        with mf:
            a = x @ w
            ref = weakref.ref(a)
            b = a.sin()  # saves a
            del a
        gc.collect()
        alive = ref() is not None
        b.sum().backward()
        return alive

    assert run(memfit.activations(None, None, min_bytes=0))  # kept: autograd holds it
    assert not run(memfit.activations(None, "offload", min_bytes=0, offload=Offload(transport=FakeTransport())))


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_backward_fetches_in_reverse_order_within_the_prefetch_window(prefetch):
    model = make_model(depth=6)
    transport = FakeTransport()
    mf = memfit.activations(model, "offload", min_bytes=1024, offload=Offload(prefetch=prefetch, transport=transport))
    grads(model, X, mf)
    outs = [k for w, k in transport.log if w == "out"]
    assert len(outs) >= 6
    started, ready_order, in_flight_max = set(), [], 0
    for what, key in transport.log:
        if what == "in":
            started.add(key)
        elif what == "ready":
            assert key in started  # fetched before being handed out
            ready_order.append(key)
        in_flight_max = max(in_flight_max, len(started) - len(ready_order))
    # Backward needs the last-packed first: fetches run in the reverse of the pack order.
    assert ready_order == list(reversed(outs))
    # Copies back not yet handed out never exceed the window (or the one fetched on
    # demand, without a window).
    assert in_flight_max == max(prefetch, 1)
    # Each copy back is issued ahead of its use by the window (prefetch 0: on demand).
    first_in = [k for w, k in transport.log if w == "in"][: prefetch + 1]
    assert first_in == list(reversed(outs))[: prefetch + 1]


def test_retained_graph_unpacks_twice_and_holds_no_device_copy_between():
    model = make_model()
    transport = FakeTransport()
    mf = memfit.activations(model, "offload", min_bytes=1024, offload=Offload(transport=transport))
    model.zero_grad(set_to_none=True)
    with mf:
        loss = model(X).pow(2).mean()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    fetched_once = sum(1 for w, _ in transport.log if w == "in")
    model.zero_grad(set_to_none=True)
    loss.backward()
    assert same([p.grad for p in model.parameters()], first)
    # memfit let go of every device copy after its last use: the second pass copies
    # each entry back again (from the host copies it kept).
    assert sum(1 for w, _ in transport.log if w == "in") == 2 * fetched_once


def test_inplace_modification_of_an_offloaded_tensor_raises():
    w = torch.randn(64, 64, requires_grad=True)
    mf = memfit.activations(None, "offload", min_bytes=0, offload=Offload(transport=FakeTransport()))
    with mf:
        a = torch.randn(128, 64) @ w
        b = a.sin()
        a.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        b.sum().backward()


def test_offload_under_autocast_matches_plain_autocast():
    model = make_model()

    def run(mf):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if mf is None:
                loss = model(X).float().pow(2).mean()
            else:
                with mf:
                    loss = model(X).float().pow(2).mean()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = run(None)
    mf = memfit.activations(model, "offload", min_bytes=1024, offload=Offload(transport=FakeTransport()))
    assert same(run(mf), plain)
    assert mf.stats.host_bytes > 0


def test_per_module_offload_follows_policy_inheritance():
    model = make_model()
    mf = memfit.activations(model, None, policy={"2": "offload", "6": "offload:8"}, min_bytes=1024,
                            offload=Offload(transport=FakeTransport()))
    grads(model, X, mf)
    by = mf.stats.by_module
    assert by["2"].host_bytes > 0 and by["6"].host_bytes > 0
    assert all(m.host_bytes == 0 for name, m in by.items() if name not in ("2", "6"))
    assert by["6"].host_bytes < by["2"].host_bytes  # codes, not values


def test_host_memory_limit_refuses_with_numbers():
    model = make_model()
    mf = memfit.activations(model, "offload", min_bytes=1024, offload=Offload(host_limit=4096, transport=FakeTransport()))
    with pytest.raises(HostMemoryError, match=rf"this step would offload .* but the limit is {format_bytes(4096)}"):
        grads(model, X, mf)
    # A step whose previous run needed more than the limit is refused on entry.
    roomy = memfit.activations(model, "offload", min_bytes=1024,
                               offload=Offload(host_limit=10**9, transport=FakeTransport()))
    grads(model, X, roomy)
    roomy._offloader.host_limit = roomy.stats.host_bytes - 1
    with pytest.raises(HostMemoryError, match="previous step offloaded"):
        with roomy:
            pass


def test_default_limit_comes_from_available_host_memory():
    assert available_host_bytes() > 0
    model = make_model()
    mf = memfit.activations(model, "offload", min_bytes=1024, offload=Offload(transport=FakeTransport()))
    grads(model, X, mf)
    assert mf._offloader.host_limit == pytest.approx(0.9 * available_host_bytes(), rel=0.2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits="offload:3"), "offload:<8|4|2|fp8>"),
    (dict(bits="offloads"), "offload settings are"),
    (dict(bits="offload:"), "offload settings are"),
    (dict(bits=8, policy={"op:sdpa": "offload"}), "op keys and head_bits"),
    (dict(bits=4, head_bits="offload"), "op keys and head_bits"),
    (dict(bits="keep"), "'offload'"),
])
def test_bad_settings_name_the_known_ones(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memfit.activations(make_model(), **kwargs)


def test_bad_offload_options():
    with pytest.raises(ValueError, match="prefetch"):
        Offload(prefetch=-1)
    with pytest.raises(ValueError, match="host_limit"):
        Offload(host_limit=0)
    with pytest.raises(TypeError, match="to_host"):
        Offload(transport=object())
    with pytest.raises(TypeError, match="Offload"):
        memfit.activations(make_model(), "offload", offload={"prefetch": 2})


def test_split_offload():
    assert split_offload("offload") == (None, True)
    assert split_offload("offload:4") == (4, True)
    assert split_offload("offload:fp8") == ("fp8", True)
    assert split_offload(8) == (8, False)
    assert split_offload("fp8") == ("fp8", False)


def test_step_config_accepts_an_offload_policy():
    assert memfit.StepConfig(policy="offload:4").policy == "offload:4"
    with pytest.raises(ValueError, match="offload"):
        memfit.StepConfig(policy="offload:5")


def test_fake_cuda_tensors_count_host_bytes_without_copying():
    # What memfit.estimate sees for a CUDA model: no copy, host bytes counted, the
    # copy back an empty tensor of the right size on the device (rule 9). Fake CUDA
    # tensors need no GPU (autograd on them does, so the Offloader is driven directly).
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memfit.activations.offload import Offloader
    from memfit.codec import Encoded, IntFormat

    with FakeTensorMode():
        shape = torch.Size([64, 1024])
        enc = Encoded(IntFormat(bits=4), shape, torch.float32,
                      codes=torch.empty(32 * 1024, dtype=torch.uint8, device="cuda"),
                      scale=torch.empty(256, device="cuda"), lo=torch.empty(256, device="cuda"))
        offloader = Offloader(Offload(host_limit=1))  # fake bytes never hit the limit
        offloader.begin()
        handle = offloader.put(enc)
        assert offloader.host_bytes == enc.nbytes > 0
        assert handle.skeleton.nbytes == 0  # nothing left on the device
        handle.add_view()
        back = handle.restore()
        handle.unpacked()
        assert back.codes.shape == enc.codes.shape and back.codes.device.type == "cuda"
        assert back.scale.shape == enc.scale.shape


def test_every_tensor_of_an_encoding_moves_and_comes_back():
    # Whatever the codec's layout (here codes, block scales and offsets, and the
    # per-channel scales of outlier channels): nothing is left on the device.
    from memfit.activations.offload import Offloader
    from memfit.codec import IntFormat, decode, encode

    x = torch.randn(64, 32)
    x[:, 3] *= 50  # an outlier channel
    enc = encode(x, IntFormat(bits=4, rounding="nearest"), channels=32)
    assert enc.channel_scale is not None
    offloader = Offloader(Offload(transport=FakeTransport()))
    offloader.begin()
    handle = offloader.put(enc)
    assert set(handle.names) >= {"codes", "scale", "lo", "channel_scale"}
    assert handle.skeleton.nbytes == 0 and offloader.host_bytes == enc.nbytes
    handle.add_view()
    assert torch.equal(decode(handle.restore()), decode(enc))
