"""memfit.optim under DDP and FSDP2 (gloo, CPU, 2 processes) and with torch.distributed.checkpoint.

The tests run in two worker processes (``torch.multiprocessing`` spawn, MASTER_ADDR=127.0.0.1
and a free port, gloo, one intra-op thread each; tests/_dist.py, shared with the other
distributed tests), started once per module, which do the work and the checks
themselves; a worker's exception fails the test with its traceback, and a test that
outlives its timeout has the workers killed and fails, so a hang cannot stall CI.

How the distributed runs are compared with a single process (a tiny MLP, 10 steps):

* Exactly. With two ranks the gradient DDP and FSDP2 produce is ``g0/2 + g1/2`` (g_r the
  gradient of rank r's half batch; halving is exact and a sum of two is commutative), so
  a single process that backpropagates the two halves separately and steps on
  ``g0/2 + g1/2`` must give bit-identical parameters and losses under DDP. Under FSDP2
  each rank quantizes its own shard, so the exact single-process reference also splits
  every parameter's optimizer state into the same row chunks (the parameter split like
  ``torch.chunk(p, 2)``, fp32 or quantized as decided by the *full* parameter's size).
* Within tolerance, against a plain single process on the concatenated batch (the usual
  way to check DDP). There the gradient differs in the last bits, and quantized state is
  discontinuous in the gradient: a 1-ulp change can move a state element across a code
  boundary (a code step is up to 1.4% of its block's absmax at 8 bits, 22% at 4), and
  under FSDP2 the blocks themselves differ from the single process's. The difference
  is then another draw of quantization noise, of the size of the quantization error
  itself, so the bound is relative to that error, measured in the same test as the gap
  between the single process's quantized and fp32 runs (``qerr``, for parameters and
  for losses): DDP (same blocks, rare code flips) must stay within ``0.5 * qerr``,
  FSDP2 (other blocks: two independent draws differ by ~sqrt(2) * qerr) within
  ``3 * qerr``, and both within 1e-5 when the state is fp32. Measured here: DDP at most
  0.18 * qerr (SGD, 8 bits), FSDP2 at most 1.5 * qerr for parameters (AdamW, 8 bits) and
  1.8 * qerr for losses (Lion, 4 bits). It is the exact comparisons that catch a lost,
  reset or mis-sharded state; these bounds show that a distributed run stays as close
  to ordinary training as quantization allows.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from _dist import WORLD, Pool, needs_fsdp2, needs_gloo
from _dist import fully_shard as _fully_shard
from _dist import mesh as _mesh

import memfit.optim as mo

pytestmark = needs_gloo


@pytest.fixture(scope="module")
def pool():
    mo.backend_name()  # build (or load) the fused kernel once, before the workers race for it
    with Pool() as p:
        yield p


# ------------------------------------------------------------------ model, data, training

CONFIGS = [  # (optimizer, kwargs); each is run with state_bits 32, 8 and 4
    ("AdamW", dict(lr=1e-2, weight_decay=0.01)),
    ("SGD", dict(lr=5e-2, momentum=0.9)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
]
STEPS = 10


def _mlp() -> torch.nn.Module:
    # weights of 6000 and 10000 elements are quantized (>= 4096); their 2-rank shards of
    # 3000 and 5000 are not multiples of the block size, so FSDP2 blocks differ from a
    # single process's. The last layer and the biases keep fp32 state.
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(30, 200), torch.nn.Tanh(), torch.nn.Linear(200, 50), torch.nn.Tanh(), torch.nn.Linear(50, 4)
    )


def _batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 30, generator=g), torch.randn(16, 4, generator=g)) for _ in range(steps)]


def _half(t: torch.Tensor, rank: int) -> torch.Tensor:
    n = t.shape[0] // WORLD
    return t[rank * n : (rank + 1) * n]


def _loss(model, x, y) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def _train_distributed(model, opt, rank: int, batches) -> list[float]:
    """Each rank steps on its half of every batch; returns the global (mean) losses."""
    losses = []
    for x, y in batches:
        loss = _loss(model, _half(x, rank), _half(y, rank))
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total / WORLD))
    return losses


def _train_concat(model, opt, batches) -> list[float]:
    """Single process, whole batch."""
    losses = []
    for x, y in batches:
        loss = _loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _halves_grads(model, x, y) -> float:
    """Set ``p.grad = g0/2 + g1/2`` (what 2-rank DDP/FSDP2 produce); the mean loss."""
    grads, losses = [], []
    for r in range(WORLD):
        model.zero_grad()
        loss = _loss(model, _half(x, r), _half(y, r))
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        losses.append(loss.detach())
    for p, g0, g1 in zip(model.parameters(), *grads):
        p.grad = g0 / 2 + g1 / 2
    return float((losses[0] + losses[1]) / WORLD)


def _train_halves(model, opt, batches) -> list[float]:
    losses = []
    for x, y in batches:
        losses.append(_halves_grads(model, x, y))
        opt.step()
        opt.zero_grad()
    return losses


def _train_halves_sharded_state(name, kw, bits, batches) -> tuple[torch.nn.Module, list[float]]:
    """The exact single-process twin of a 2-rank FSDP2 run: gradients as
    :func:`_halves_grads`, and the optimizer sees every parameter as its ``WORLD`` row
    chunks (as FSDP2 shards it), each quantized on its own when the whole parameter is
    big enough to be quantized."""
    model = _mlp()
    chunks = {n: torch.chunk(p.detach(), WORLD) for n, p in model.named_parameters()}
    leaves = {n: [c.clone().requires_grad_(True) for c in cs] for n, cs in chunks.items()}
    big = [leaf for n, p in model.named_parameters() if p.numel() >= 4096 for leaf in leaves[n]]
    small = [leaf for n, p in model.named_parameters() if p.numel() < 4096 for leaf in leaves[n]]
    opt = getattr(mo, name)(
        [dict(params=big, min_quantized_numel=0), dict(params=small, state_bits=32)], state_bits=bits, **kw
    )
    losses = []
    for x, y in batches:
        losses.append(_halves_grads(model, x, y))
        for n, p in model.named_parameters():
            for leaf, g in zip(leaves[n], torch.chunk(p.grad, WORLD)):
                leaf.grad = g.clone()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.cat([leaf.detach() for leaf in leaves[n]]))
        model.zero_grad()
    return model, losses


def _max_diff(a, b) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))


def _full(params) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]


def _check_against_single(what, dist_params, dist_losses, exact_params, exact_losses, concat, qerr, factor):
    """Bit-identical to the exact reference; within ``factor * qerr`` (1e-5 at fp32) of
    the whole-batch single process."""
    assert dist_losses == exact_losses, f"{what}: losses differ from the exact single-process reference"
    for i, (a, b) in enumerate(zip(dist_params, exact_params)):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0, msg=lambda m: f"{what}: parameter {i}: {m}")
    cparams, closses, cq_losses = concat
    tol = 1e-5 if qerr == 0.0 else factor * qerr
    err = _max_diff(dist_params, cparams)
    assert err <= tol, f"{what}: parameters differ from the whole-batch single process by {err:.3g} > {tol:.3g}"
    lerr = max(abs(a - b) for a, b in zip(dist_losses, closses))
    ltol = 1e-5 if qerr == 0.0 else 1e-5 + factor * max(abs(a - b) for a, b in zip(closses, cq_losses))
    assert lerr <= ltol, f"{what}: losses differ from the whole-batch single process by {lerr:.3g} > {ltol:.3g}"


def _concat_runs(name, kw, batches):
    """Whole-batch single-process runs per state_bits: (params, losses) and qerr."""
    runs = {}
    for bits in (32, 8, 4):
        model = _mlp()
        losses = _train_concat(model, getattr(mo, name)(model.parameters(), state_bits=bits, **kw), batches)
        runs[bits] = (list(model.parameters()), losses)
    qerr = {bits: _max_diff(runs[bits][0], runs[32][0]) for bits in runs}
    return runs, qerr


# ------------------------------------------------------------------ DDP


def _ddp_vs_single(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    batches = _batches()
    for name, kw in CONFIGS:
        runs, qerr = _concat_runs(name, kw, batches)
        for bits in (32, 8, 4):
            what = f"DDP {name}(state_bits={bits})"
            model = _mlp()
            ddp = DDP(model)
            losses = _train_distributed(ddp, getattr(mo, name)(ddp.parameters(), state_bits=bits, **kw), rank, batches)
            ref = _mlp()
            ref_losses = _train_halves(ref, getattr(mo, name)(ref.parameters(), state_bits=bits, **kw), batches)
            concat = (runs[bits][0], runs[bits][1], runs[32][1])
            _check_against_single(what, list(model.parameters()), losses, list(ref.parameters()), ref_losses,
                                  concat, qerr[bits], 0.5)


def test_ddp_matches_single_process(pool):
    """AdamW, SGD and Lion at 32, 8 and 4 bits under DDP: bit-identical to the exact
    single-process reference, within 0.5 * qerr of whole-batch training."""
    pool.run(_ddp_vs_single)


# ------------------------------------------------------------------ FSDP2


def _fsdp_vs_single(rank: int) -> None:
    fully_shard = _fully_shard()
    batches = _batches()
    for name, kw in CONFIGS:
        runs, qerr = _concat_runs(name, kw, batches)
        for bits in (32, 8, 4):
            what = f"FSDP2 {name}(state_bits={bits})"
            model = _mlp()
            fully_shard(model, mesh=_mesh())
            opt = getattr(mo, name)(model.parameters(), state_bits=bits, **kw)
            losses = _train_distributed(model, opt, rank, batches)
            if bits != 32:  # the two big weights have quantized state on every rank
                assert sum("qbits" in s for s in opt.state.values()) == 2, what
            ref, ref_losses = _train_halves_sharded_state(name, kw, bits, batches)
            concat = (runs[bits][0], runs[bits][1], runs[32][1])
            _check_against_single(what, _full(model.parameters()), losses, list(ref.parameters()), ref_losses,
                                  concat, qerr[bits], 3.0)


@needs_fsdp2
def test_fsdp2_matches_single_process(pool):
    """The same under FSDP2: bit-identical to a single process whose optimizer state is
    split like the shards, within 3 * qerr of whole-batch training."""
    pool.run(_fsdp_vs_single)


# ------------------------------------------------------------------ FSDP2: size rule, checkpoints


class _Odd(torch.nn.Module):
    """Parameters whose 2-rank FSDP2 shards (dim 0, ``torch.chunk``) are even, uneven
    and empty, on both sides of the 4096-element rule."""

    QUANTIZED = {"inp.weight": 3000, "mix": (4000, 2000), "row": (5000, 0)}  # local elements per rank
    FP32 = {"small": 1500, "inp.bias": 100, "out.weight": 100, "out.bias": 2}

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(30, 200)  # weight 6000 elements: 3000 + 3000
        self.mix = torch.nn.Parameter(torch.randn(3, 2000) / 15)  # 6000: 2 rows + 1 row
        self.small = torch.nn.Parameter(torch.randn(30, 100) / 6)  # 3000: 1500 + 1500, fp32 state
        self.row = torch.nn.Parameter(torch.randn(1, 5000) / 10)  # 5000: all on rank 0, none on rank 1
        self.out = torch.nn.Linear(50, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(h @ self.mix.reshape(200, 30))
        h = torch.tanh(h @ self.small)
        h = torch.tanh(h @ self.row.reshape(100, 50))
        return self.out(h)


def _odd_fsdp(name: str, kw: dict, bits: int, mesh_shape: tuple[int, ...] = (WORLD,)):
    model = _Odd()
    _fully_shard()(model, mesh=_mesh(mesh_shape))  # a 2-D mesh: HSDP, placements (Replicate, Shard(0))
    return model, getattr(mo, name)(model.parameters(), state_bits=bits, **kw)


def _step(model, opt, rank: int, x, y, poison: bool = False) -> float:
    loss = _loss(model, _half(x, rank), _half(y, rank))
    loss.backward()
    if poison and rank == 1:  # an Inf gradient: Lion keeps the parameter finite, the moment Inf
        with torch.no_grad():
            model.inp.weight.grad.to_local()[3, 7] = math.inf
    opt.step()
    opt.zero_grad()
    return loss.item()


def _size_rule(rank: int) -> None:
    x, y = _batches(1)[0]
    for name, kw in CONFIGS:
        for bits in (8, 4):
            what = f"{name}(state_bits={bits}) rank {rank}"
            model, opt = _odd_fsdp(name, kw, bits)
            assert {n for n, _ in model.named_parameters()} == set(_Odd.QUANTIZED) | set(_Odd.FP32)
            for _ in range(2):
                _step(model, opt, rank, x, y)
            params = dict(model.named_parameters())
            for n, local in _Odd.QUANTIZED.items():
                p, st = params[n], opt.state[params[n]]
                n_local = local if isinstance(local, int) else local[rank]
                assert p.to_local().numel() == n_local, (what, n)
                assert st.get("qbits") == bits, f"{what}: {n} ({p.numel()} elements, {n_local} here) is not quantized"
                assert st["numel"] == n_local and st["shape"] == list(p.shape), (what, n, st["numel"], st["shape"])
                assert torch.isfinite(p.to_local()).all(), (what, n)
            for n, local in _Odd.FP32.items():
                p, st = params[n], opt.state[params[n]]
                assert p.to_local().numel() == local, (what, n)
                assert "qbits" not in st, f"{what}: {n} ({p.numel()} elements, {local} here) got quantized state"
                for v in st.values():
                    if isinstance(v, torch.Tensor) and v.dim():  # fp32 states are placed like the parameter
                        assert type(v) is type(p) and v.placements == p.placements and v.shape == p.shape, (what, n)
            assert set(map(id, opt.quantized_params())) == {id(params[n]) for n in _Odd.QUANTIZED}, what


@needs_fsdp2
def test_fsdp2_size_rule_counts_the_whole_tensor(pool):
    """min_quantized_numel (4096) is applied to the whole parameter, never to a shard:
    6000-element parameters split 3000 + 3000, 4000 + 2000 and 5000 + 0 are quantized
    on both ranks, a 3000-element one (1500 + 1500) keeps fp32 state on both."""
    pool.run(_size_rule)


def _local_snapshot(opt) -> dict:
    """Every rank's optimizer state in local form (plain tensors), for exact comparison."""
    def copy(v):
        if isinstance(v, torch.Tensor):
            return (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
        return v

    sd = torch.optim.Optimizer.state_dict(opt)
    return {k: {n: copy(v) for n, v in e.items()} for k, e in sd["state"].items()}


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].keys() == b[k].keys(), (what, k, sorted(a[k]), sorted(b[k]))
        for n, v in a[k].items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(
                    b[k][n], v, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {k}.{n}: {m}"
                )
            else:
                assert b[k][n] == v, (what, k, n)


CKPT_CONFIGS = [  # (optimizer, kwargs, state_bits, poison, mesh shape)
    ("AdamW", dict(lr=1e-2, weight_decay=0.01), 8, False, (WORLD,)),
    # a poisoned gradient: rank 1 alone gets a side-table entry (Lion keeps an Inf moment)
    ("Lion", dict(lr=1e-3, weight_decay=0.1), 4, True, (WORLD,)),
    ("SGD", dict(lr=5e-2, momentum=0.9, nesterov=True), 8, False, (1, WORLD)),
]


def _dcp_resume(rank: int, root: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    batches = _batches(6)
    for name, kw, bits, poison, mesh in CKPT_CONFIGS:
        what = f"{name}(state_bits={bits}) mesh {mesh} rank {rank}"
        path = os.path.join(root, name)
        model, opt = _odd_fsdp(name, kw, bits, mesh)
        assert len(model.inp.weight.placements) == len(mesh), what
        for i, (x, y) in enumerate(batches[:3]):
            _step(model, opt, rank, x, y, poison=poison and i == 1)
        if poison:
            nf = opt.state[model.inp.weight]["nf_idx"].numel()
            assert nf == (1 if rank == 1 else 0), f"{what}: side table has {nf} entries"
        saved = _local_snapshot(opt)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
        losses = [_step(model, opt, rank, x, y) for x, y in batches[3:]]
        expected = [p.to_local().clone() for p in model.parameters()]

        model2, opt2 = _odd_fsdp(name, kw, bits, mesh)  # a fresh run, resumed from the checkpoint
        sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model2, sd["model"])
        set_optimizer_state_dict(model2, opt2, sd["optim"])
        _assert_same_state(saved, _local_snapshot(opt2), f"{what}: state loaded by DCP")
        losses2 = [_step(model2, opt2, rank, x, y) for x, y in batches[3:]]
        assert losses2 == losses, f"{what}: resumed losses {losses2} != uninterrupted {losses}"
        for (n, p), e in zip(model2.named_parameters(), expected):
            torch.testing.assert_close(p.to_local(), e, rtol=0, atol=0, msg=lambda m: f"{what}: {n}: {m}")

        if name == "AdamW":  # documented limit: a full (gathered) state dict is refused, not mis-loaded
            full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
            before = _local_snapshot(opt2)
            with pytest.raises(ValueError, match="full_state_dict"):
                set_optimizer_state_dict(model2, opt2, full, options=StateDictOptions(full_state_dict=True))
            _assert_same_state(before, _local_snapshot(opt2), f"{what}: state after a refused load")


@needs_fsdp2
def test_dcp_save_load_resumes_bit_identically(pool, tmp_path):
    """dcp.save / dcp.load of get_optimizer_state_dict / set_optimizer_state_dict under
    FSDP2 (uneven and empty shards, a non-finite side-table entry on one rank only):
    the loaded state equals the saved state on every rank, and the resumed run's next
    steps are bit-identical to the uninterrupted run's."""
    pool.run(_dcp_resume, str(tmp_path))


def _weights_only(rank: int, root: str) -> None:
    for name, kw, bits, poison, mesh in CKPT_CONFIGS:
        what = f"{name}(state_bits={bits}) mesh {mesh} rank {rank}"
        batches = _batches(4)
        model, opt = _odd_fsdp(name, kw, bits, mesh)
        for i, (x, y) in enumerate(batches[:2]):
            _step(model, opt, rank, x, y, poison=poison and i == 1)
        path = os.path.join(root, f"{name}-rank{rank}.pt")
        torch.save(opt.state_dict(), path)
        loaded = torch.load(path, weights_only=True)
        entry = loaded["state"][0]  # inp.weight: quantized, in the sharded form (DTensors)
        codes = entry[f"{opt._STATE_NAMES[0]}_codes"]
        assert entry["shards"] == WORLD and codes.placements == model.inp.weight.placements, what
        model2, opt2 = _odd_fsdp(name, kw, bits, mesh)
        with torch.no_grad():
            for p2, p in zip(model2.parameters(), model.parameters()):
                p2.to_local().copy_(p.to_local())
        opt2.load_state_dict(loaded)
        _assert_same_state(_local_snapshot(opt), _local_snapshot(opt2), f"{what}: weights_only state dict")
        if name == "AdamW":  # another number of shards (mesh (2, 1): replicated, 1 shard) is refused
            model3, opt3 = _odd_fsdp(name, kw, bits, (WORLD, 1))
            with pytest.raises(ValueError, match="saved over 2 shards, the parameter has 1"):
                opt3.load_state_dict(loaded)
            # fp32 export: torch's AdamW takes it, states placed like the parameters
            ref = torch.optim.AdamW(model.parameters())
            ref.load_state_dict(opt.to_torch_state_dict())
            for p in model.parameters():
                assert ref.state[p]["exp_avg"].placements == p.placements, what
        for x, y in batches[2:]:
            assert _step(model2, opt2, rank, x, y) == _step(model, opt, rank, x, y), what
        for (n, p2), p in zip(model2.named_parameters(), model.parameters()):
            torch.testing.assert_close(p2.to_local(), p.to_local(), rtol=0, atol=0, msg=lambda m: f"{what}: {n}: {m}")


@needs_fsdp2
def test_fsdp2_state_dict_loads_with_weights_only(pool, tmp_path):
    """Each rank's ``torch.save(opt.state_dict())`` (DTensors, ints, strings, lists)
    loads with ``torch.load(weights_only=True)`` and resumes bit-identically."""
    pool.run(_weights_only, str(tmp_path))
