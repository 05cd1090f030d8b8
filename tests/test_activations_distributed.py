"""memfit.activations under DDP and FSDP2 (gloo, CPU, 2 processes), with memfit.optim's
8-bit AdamW, and memfit.plan budgets per rank.

The two worker processes, their timeouts and the propagation of tracebacks are
tests/_dist.py's (shared with tests/test_optim_distributed.py). The model is a tiny GPT-2
(2 layers, n_embd 64, vocabulary 256, 64 positions, no dropout), trained for 10 steps on
8 x 64-token batches, each rank on its half (4 x 64); activations at 8, 4 and 2 bits
(stochastic rounding), AdamW with 8-bit state.

How the distributed runs are compared with one process:

* Exactly, with activation compression on. Two ranks' gradient is ``g0/2 + g1/2``
  under DDP and FSDP2 alike (g_r from rank r's half batch; halving is exact, a sum of
  two commutes), and rank r draws its rounding noise from memfit's stream for rank r
  (``memfit.activations(..., rank=r)``; rank 0's stream is the single-process one).
  So a single process that runs the two halves with two compressors made with
  ``rank=0`` and ``rank=1`` and steps on ``g0/2 + g1/2`` must give bit-identical
  losses and parameters, and each rank's ``mf.stats`` must equal its half's
  compressor's stats. The model's quantized parameters shard into multiples of 256
  elements (the 8-bit state's block), so under FSDP2 the optimizer's blocks are the
  single process's too. This is what shows that each rank compresses exactly its own
  activations, that FSDP2's gathered parameters are kept by reference (they are
  counted as parameters, never compressed or copied) and that nothing breaks when
  FSDP2 frees and re-gathers them (reshard_after_forward=True).
* bits=None: the DDP run is bit-identical to plain DDP (no memfit at all).
* Within rounding noise, against ordinary training (one process, whole batch, the
  same init and data). There the activations are rounded with other random draws
  (other tensors: the whole batch, not halves), so the loss trajectories differ by
  rounding noise, and that noise is the yardstick: the spread between single
  processes that differ only in memfit's seed (0, 1, 2; the largest loss difference
  over the 10 steps and the 3 pairs). The DDP run is one more draw of the same kind,
  so its largest difference from each of those runs must stay within
  ``NOISE_FACTOR`` (3) times that spread: one more exchangeable draw lands beyond
  the spread about half the time, but rarely far beyond; 3x leaves room for other
  machines' draws while a DDP-specific error (a rank compressing the wrong tensors,
  a lost or doubled gradient) moves the losses by far more. Measured here at 8 bits
  (losses 5.5 -> 4.2): spread 2.4e-3, DDP 0.27x, 0.99x and 0.32x of it from the three
  runs; DDP's distance to the fp32-activation run 7.3e-4, a single 8-bit run's up to
  1.7e-3 (required: within 3x of the larger of those and the spread). With
  bits=None the DDP run is within the spread of fp32 (measured 4.3e-6: only the
  8-bit optimizer state reacts to the last-bit gradient differences).

Budgets are per rank: a plan made on rank 0 for the per-rank batch (and broadcast,
so that every rank runs the same plan) keeps every rank's measured peak (MemTracker;
FSDPMemTracker under FSDP2) within the budget, when the DDP gradient buckets (4 bytes
per parameter) are kept out of the budget given to the planner (under FSDP2 the plan
is made on a sharded copy of the model, which the estimator runs with FSDP2's own
hooks).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
import torch.distributed as dist
from _dist import WORLD, Pool, fully_shard, mesh, needs_fsdp2, needs_gloo

import memfit
import memfit.optim as mo

pytestmark = [needs_gloo, pytest.mark.filterwarnings("ignore::RuntimeWarning")]
transformers = pytest.importorskip("transformers")

STEPS = 10
BATCH, SEQ, VOCAB = 8, 64, 256
LR = 3e-3
NOISE_FACTOR = 3.0


@pytest.fixture(scope="module")
def pool():
    mo.backend_name()  # build (or load) the fused optimizer kernel once, before the workers race for it
    with Pool() as p:
        yield p


# ------------------------------------------------------------------ model, data, training


def _gpt() -> torch.nn.Module:
    """Parameters of 4096 elements and more get 8-bit AdamW state; all of them have 64
    or 256 rows, so their 2-rank FSDP2 shards (dim 0) hold multiples of 256 elements."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, use_cache=False, bos_token_id=None, eos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
    model.loss_type = "ForCausalLM"
    return model


def _batches(steps: int = STEPS, batch: int = BATCH) -> list[torch.Tensor]:
    """Sequences that count up (mod 256) from a random start: learnable, so the loss
    falls (from ln 256 = 5.5 to about 4.2 in 10 steps) and the trajectories have
    somewhere to go."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, VOCAB, (batch, 1), generator=g) + torch.arange(SEQ)) % VOCAB for _ in range(steps)]


def _half(x: torch.Tensor, rank: int) -> torch.Tensor:
    n = x.shape[0] // WORLD
    return x[rank * n : (rank + 1) * n]


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def _compressor(model, bits, **kw):
    return memfit.activations(model, bits=bits, **kw) if bits != "plain" else None


def _train(model, opt, xs, mf=None) -> list[float]:
    """One process (or one rank) steps on ``xs``; returns its own losses."""
    losses = []
    for x in xs:
        with mf if mf is not None else contextlib.nullcontext():
            loss = _loss(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _mean_over_ranks(losses: list[float]) -> list[float]:
    t = torch.tensor(losses, dtype=torch.float32)
    dist.all_reduce(t)
    return (t / WORLD).tolist()


def _twin(bits, batches, steps: int = STEPS):
    """The exact single-process twin of a 2-rank run: both halves, each with its rank's
    compressor, and a step on ``g0/2 + g1/2``. Returns the model, the mean losses and
    the two compressors (whose stats are each rank's)."""
    model = _gpt()
    opt = mo.AdamW(model.parameters(), lr=LR, state_bits=8)
    mfs = [memfit.activations(model, bits=bits, rank=r) for r in range(WORLD)]
    losses = []
    for x in batches[:steps]:
        grads, ls = [], []
        for r in range(WORLD):
            with mfs[r]:
                loss = _loss(model, _half(x, r))
            loss.backward()
            grads.append([p.grad for p in model.parameters()])
            ls.append(loss.detach().float())
            model.zero_grad(set_to_none=True)
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = g0 / 2 + g1 / 2
        opt.step()
        opt.zero_grad()
        losses.append(float((ls[0] + ls[1]) / WORLD))
    return model, losses, mfs


def _assert_same_params(a, b, what: str) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0, msg=lambda m: f"{what}: {n}: {m}")


def _assert_same_stats(mine, twin, what: str) -> None:
    assert mine.by_module == twin.by_module, (
        f"{what}: this rank's stats differ from its half batch's single-process compressor:\n"
        f"{mine.table()}\nvs\n{twin.table()}"
    )


# ------------------------------------------------------------------ DDP


def _ddp_run(bits, batches, steps: int = STEPS):
    """2-rank DDP, AdamW 8-bit state, ``bits`` activations ("plain": no memfit)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank = dist.get_rank()
    model = _gpt()
    ddp = DDP(model)
    mf = _compressor(ddp, bits)  # the wrapper is looked through: names are the model's
    opt = mo.AdamW(ddp.parameters(), lr=LR, state_bits=8)
    losses = _train(ddp, opt, [_half(x, rank) for x in batches[:steps]], mf)
    return model, _mean_over_ranks(losses), mf


def _single_run(bits, batches, seed: int = 0) -> list[float]:
    model = _gpt()
    opt = mo.AdamW(model.parameters(), lr=LR, state_bits=8)
    mf = memfit.activations(model, bits=bits, seed=seed, rank=0)
    return _train(model, opt, batches, mf)


def _max_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def _ddp_job(rank: int) -> None:
    batches = _batches()
    runs, models = {}, {}
    for bits in (None, 8, 4, 2):
        steps = STEPS if bits in (None, 8) else 3
        what = f"DDP, activations bits={bits}, AdamW state_bits=8"
        model, losses, mf = _ddp_run(bits, batches, steps)
        twin, twin_losses, mfs = _twin(bits, batches, steps)
        assert losses == twin_losses, f"{what}: losses {losses} != exact single-process twin {twin_losses}"
        _assert_same_params(model, twin, what)
        _assert_same_stats(mf.stats, mfs[rank].stats, what)
        kinds = mf.stats.counts
        assert kinds["param"] > 0 and kinds["param"] == mfs[rank].stats.counts["param"], what
        if bits is not None:
            at_bits = kinds[f"int{bits}"] + kinds[f"op-fewbit{bits}"]  # codes or derivative levels
            assert at_bits > 0 and mf.stats.ratio > 2, f"{what}: nothing compressed? {dict(kinds)}"
        runs[bits], models[bits] = losses, model

    # bits=None changes nothing: bit-identical to plain DDP
    plain_model, plain_losses, _ = _ddp_run("plain", batches)
    assert runs[None] == plain_losses, "DDP with memfit.activations(bits=None) differs from plain DDP"
    _assert_same_params(models[None], plain_model, "bits=None vs plain DDP")

    # 8 bits: within the rounding noise of one process on the whole batch (the four
    # single-process runs are shared out between the ranks)
    mine = [_single_run(bits, batches, seed) for bits, seed in ((8, 0), (8, 1), (8, 2), (None, 0))[rank::WORLD]]
    shared = [None] * WORLD
    dist.all_gather_object(shared, mine)
    *single, fp32 = [run for i in range(2) for run in (shared[0][i], shared[1][i])]
    spread = max(_max_gap(a, b) for a, b in itertools.combinations(single, 2))
    gaps = [_max_gap(runs[8], s) for s in single]
    assert spread > 0, "stochastic rounding with different seeds gave identical runs"
    assert single[0][-1] < single[0][0] - 0.5, f"the model did not learn: {single[0]}"
    assert max(gaps) <= NOISE_FACTOR * spread, (
        f"DDP 8-bit losses differ from single-process 8-bit runs by {max(gaps):.3g}, more than "
        f"{NOISE_FACTOR} x their own seed-to-seed spread {spread:.3g}"
    )
    # the fp32 trajectory is reached no worse than a single process reaches it
    to_fp32 = _max_gap(runs[8], fp32)
    single_to_fp32 = max(_max_gap(s, fp32) for s in single)
    assert to_fp32 <= NOISE_FACTOR * max(spread, single_to_fp32), (to_fp32, single_to_fp32, spread)
    assert _max_gap(runs[None], fp32) <= spread, "bits=None DDP vs single process"
    if rank == 0:
        print(f"8-bit: seed spread {spread:.3g}, DDP gaps {[f'{g / spread:.2f}x' for g in gaps]}, "
              f"DDP-fp32 {to_fp32:.3g}, single-fp32 {single_to_fp32:.3g}, None-fp32 {_max_gap(runs[None], fp32):.3g}")


def test_ddp_matches_single_process(pool):
    """DDP with activations at None/8/4/2 bits and 8-bit AdamW: bit-identical to the
    exact single-process twin (each half with its rank's compressor), per-rank stats
    equal to the twin's; bits=None bit-identical to plain DDP; at 8 bits within
    NOISE_FACTOR x the seed-to-seed spread of whole-batch single-process training."""
    pool.run(_ddp_job)


# ------------------------------------------------------------------ FSDP2


def _shard(model, reshard: bool = True):
    fs = fully_shard()
    for block in model.transformer.h:
        fs(block, mesh=mesh(), reshard_after_forward=reshard)
    fs(model, mesh=mesh(), reshard_after_forward=reshard)
    return model


def _freed_unsharded(block) -> list[bool] | None:
    """Whether each gathered parameter of an FSDP2 block has its storage freed now;
    None where FSDP2's internals are not as expected (a private API)."""
    try:
        params = block._get_fsdp_state()._fsdp_param_group.fsdp_params
        return [p._unsharded_param.untyped_storage().size() == 0 for p in params]
    except AttributeError:
        return None


def _fsdp_job(rank: int) -> None:
    batches = _batches()
    for bits, reshard, steps in ((8, True, STEPS), (8, False, 3), (4, True, 3), (2, True, 3)):
        what = f"FSDP2 (reshard_after_forward={reshard}), activations bits={bits}, AdamW state_bits=8"
        model = _shard(_gpt(), reshard)
        mf = memfit.activations(model, bits=bits)
        opt = mo.AdamW(model.parameters(), lr=LR, state_bits=8)
        for n, p in model.named_parameters():
            local = p.to_local().numel()
            assert p.numel() < 4096 or local % 256 == 0, f"{n}: shard of {local} is not block-aligned"
        losses = []
        for x in batches[:steps]:
            with mf:
                loss = _loss(model, _half(x, rank))
            freed = _freed_unsharded(model.transformer.h[0])
            if freed is not None:  # the kept parameters' storage really is released after forward
                assert all(freed) == reshard, f"{what}: block 0 gathered parameters freed: {freed}"
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        losses = _mean_over_ranks(losses)
        n_big = sum(p.numel() >= 4096 for p in model.parameters())
        assert sum("qbits" in s for s in opt.state.values()) == n_big, f"{what}: 8-bit state missing"
        twin, twin_losses, mfs = _twin(bits, batches, steps)
        assert losses == twin_losses, f"{what}: losses {losses} != exact single-process twin {twin_losses}"
        _assert_same_params(model, twin, what)
        _assert_same_stats(mf.stats, mfs[rank].stats, what)
        at_bits = mf.stats.counts[f"int{bits}"] + mf.stats.counts[f"op-fewbit{bits}"]  # codes or levels
        assert mf.stats.counts["param"] > 0 and at_bits > 0, what


@needs_fsdp2
def test_fsdp2_matches_single_process(pool):
    """FSDP2 (fully_shard per block and root) with activations at 8/4/2 bits and 8-bit
    AdamW: bit-identical to the exact single-process twin, per-rank stats equal to the
    twin's (gathered parameters counted as parameters: kept by reference), with the
    gathered parameters freed after forward and gathered again for backward."""
    pool.run(_fsdp_job)


# ------------------------------------------------------------------ per-rank stats


def _per_rank_job(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # uneven per-rank batches: 3 sequences on rank 0, 5 on rank 1
    x = _batches(1, batch=8)[0]
    mine = x[:3] if rank == 0 else x[3:]
    ddp = DDP(_gpt())
    mf = memfit.activations(ddp, bits=4)
    with mf:
        loss = _loss(ddp, mine)
    loss.backward()
    alone = _gpt()
    ref = memfit.activations(alone, bits=4, rank=rank)
    with ref:
        _loss(alone, mine).backward()
    _assert_same_stats(mf.stats, ref.stats, f"rank {rank}")
    sizes = [None] * WORLD
    dist.all_gather_object(sizes, (mf.stats.original_bytes, mf.stats.stored_bytes))
    (o0, s0), (o1, s1) = sizes
    assert 1.4 < o1 / o0 < 5 / 3 + 0.01 and 1.4 < s1 / s0 < 5 / 3 + 0.01, sizes  # per rank, not global
    assert mf.stats.table().splitlines()[0].startswith("module")

    # each rank draws its own rounding noise: the same tensor, rounded on both ranks
    a = torch.randn(1 << 15, generator=torch.Generator().manual_seed(3), requires_grad=True)
    mf = memfit.activations(bits=2)
    with mf:
        y = a.exp()  # exp saves its result
    err = (y.grad_fn._saved_result - y).detach()
    errs = [torch.empty_like(err) for _ in range(WORLD)]
    dist.all_gather(errs, err)
    corr = float(torch.corrcoef(torch.stack(errs))[0, 1])
    assert abs(corr) < 0.1, f"ranks' rounding errors are correlated ({corr:.2f}): same noise stream on both?"


def test_stats_are_per_rank(pool):
    """Each rank's stats describe its own activations (uneven per-rank batches: they
    equal a single process's on that rank's batch), and ranks draw independent
    rounding noise (with one stream, errors on same-shaped tensors correlate ~0.5)."""
    pool.run(_per_rank_job)


# ------------------------------------------------------------------ budgets per rank


def _tracked_peak(tracker, model_for_forward, opt, x, plan, steps: int = 2) -> int:
    """The peak over ``steps`` steps (the second one has the optimizer state)."""
    for _ in range(steps):
        with tracker:
            tracker.reset_mod_stats()
            with plan if plan is not None else contextlib.nullcontext():
                loss = _loss(model_for_forward, x)
            loss.backward()
            opt.step()
            opt.zero_grad()
    snap = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return int(next(v for k, v in snap.items() if str(k) == "Total"))


def _from_rank0(make):
    """``make()`` run on rank 0 only, its result sent to every rank."""
    obj = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _ddp_peak(plan_json: str | None, x: torch.Tensor) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _gpt()
    plan = memfit.Plan.from_json(plan_json, model=model) if plan_json else None
    opt = plan.optimizer(lr=LR) if plan else torch.optim.AdamW(model.parameters(), lr=LR)
    mt = MemTracker()
    mt.track_external(model, opt, x)
    with mt:  # DDP's buckets are counted: made inside the tracker
        ddp = DDP(model)
    return _tracked_peak(mt, ddp, opt, x, plan)


def _plan_ddp_job(rank: int) -> None:
    x = _half(_batches(1)[0], rank)  # the per-rank batch
    batch = {"input_ids": x, "labels": x}
    grad_bytes = 4 * sum(p.numel() for p in _gpt().parameters())  # DDP's buckets: fp32 gradients

    def make():
        model = _gpt()
        budget = int(0.65 * memfit.estimate(model, batch).peak_bytes)  # this rank's budget
        plan = memfit.plan(model, batch, budget - grad_bytes, optimizer_in_backward=False, step_seconds=0.05)
        return plan.to_json(), budget

    plan_json, budget = _from_rank0(make)
    plan = memfit.Plan.from_json(plan_json)
    assert any(c != "keep" for c in plan.choices.values()), f"the plan changes nothing: {plan.choices}"
    assert not plan.optimizer_in_backward
    peak = _ddp_peak(plan_json, x)
    plain_peak = _ddp_peak(None, x)
    alone = memfit.plan.measure_peak(_gpt(), batch, plan.config).peak_bytes
    peaks = [None] * WORLD
    dist.all_gather_object(peaks, (peak, plain_peak, alone))
    for r, (p, pp, a) in enumerate(peaks):
        assert pp > budget, f"rank {r}: plain DDP ({pp}) already fits the budget ({budget}): nothing tested"
        assert p <= budget, f"rank {r}: peak {p} under DDP exceeds the per-rank budget {budget}"
        extra = p - a  # DDP's buckets, and a few kB of its own bookkeeping
        assert extra <= grad_bytes + 16384, f"rank {r}: DDP adds {extra} bytes to one process's peak, buckets {grad_bytes}"
    if rank == 0:
        print(f"DDP plan: budget {budget}, peaks {peaks}, buckets {grad_bytes}")


def test_plan_budget_is_per_rank_under_ddp(pool):
    """A plan made on rank 0 for the per-rank batch, within the per-rank budget less
    DDP's gradient buckets, broadcast to every rank: every rank's measured DDP peak
    (MemTracker, DDP built inside it so its buckets count) stays within the budget."""
    pool.run(_plan_ddp_job)


def _plan_fsdp_job(rank: int) -> None:
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    x = _half(_batches(1)[0], rank)
    batch = {"input_ids": x, "labels": x}
    # the planner estimates a step of the sharded model (FSDP2's hooks run on fake
    # tensors); it is given a sharded copy: estimating leaves FSDP2's internal buffers fake
    copy = _shard(_gpt())

    def make():
        plain = memfit.estimate(copy, batch).peak_bytes
        return memfit.plan(copy, batch, int(0.7 * plain), optimizer_in_backward=False, step_seconds=0.05).to_json()

    plan_json = _from_rank0(make)
    model = _shard(_gpt())
    plan = memfit.Plan.from_json(plan_json, model=model)
    assert any(c != "keep" for c in plan.choices.values()), f"the plan changes nothing: {plan.choices}"
    opt = plan.optimizer(lr=LR)
    mt = FSDPMemTracker(model, opt)
    mt.track_inputs((x,))
    peak = _tracked_peak(mt, model, opt, x, plan)
    peaks = [None] * WORLD
    dist.all_gather_object(peaks, peak)
    assert max(peaks) <= plan.budget_bytes, f"FSDP2 peaks {peaks} exceed the per-rank budget {plan.budget_bytes}"
    if rank == 0:
        print(f"FSDP2 plan: budget {plan.budget_bytes}, predicted {plan.predicted_peak_bytes}, peaks {peaks}")


@needs_fsdp2
def test_plan_budget_is_per_rank_under_fsdp2(pool):
    """A plan made on rank 0 for a sharded copy of the model and the per-rank batch
    keeps every rank's FSDP2 peak (FSDPMemTracker) within the per-rank budget."""
    pool.run(_plan_fsdp_job)
