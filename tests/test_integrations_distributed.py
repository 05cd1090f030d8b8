"""The HF Trainer callback with a per-rank budget under DDP and FSDP2 (gloo, CPU, 2
processes: tests/_dist.py's workers).

Each test trains a tiny Llama (2 layers, hidden 64, vocabulary 256) with
``MemfitTrainer`` and ``MemfitCallback(budget=..., measure=True)`` on sequences that
count up from a random start (learnable: the loss falls from ln 256 = 5.5), 4 x 32
tokens per rank and step; the Trainer's distributed sampler gives each rank its own
batches. What is checked on every rank:

* each rank's measured peak (MemTracker over whole optimizer steps, from the second
  on: DDP re-allocates its gradient buckets in that step, its one-time bucket rebuild,
  so they are counted) is within its budget, and the budget is tight enough that the
  plan had to change something;
* both ranks adopted the same plan, and the callback's record says so;
* training converges: the loss goes down; under DDP the parameters are bit-identical
  across ranks after training.

Under DDP the model is the Trainer's own DDP wrapping; under FSDP2 it is sharded when
loaded (``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2))``,
transformers' native FSDP2, which the Trainer leaves as it is), so the plan is made on
the very model that trains, on fake tensors, and that model then trains.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from _dist import WORLD, Pool, needs_fsdp2, needs_gloo

pytestmark = [needs_gloo, pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

SEQ, VOCAB, PER_RANK, STEPS = 32, 256, 4, 6
FAST_PLAN = {"step_seconds": 0.05, "max_rounds": 4}


@pytest.fixture(scope="module")
def pool():
    import memfit.optim as mo

    mo.backend_name()  # build (or load) the fused kernels once, before the workers race for them
    with Pool() as p:
        yield p


# ------------------------------------------------------------------ pieces run on every rank


def _as_rank(rank: int) -> None:
    """What a launcher (torchrun) sets, so that the Trainer sees the process group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      HF_HUB_OFFLINE="1")


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
                       tie_word_embeddings=False)


def _llama():
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(_llama_config())


class Counting(torch.utils.data.Dataset):
    """Token sequences that count up (mod 256) from a random start."""

    def __init__(self, n: int = WORLD * PER_RANK * STEPS):
        g = torch.Generator().manual_seed(1)
        self.ids = (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(model, out_dir: str, budget, plan_kwargs=FAST_PLAN):
    from transformers import TrainingArguments

    from memfit.integrations.transformers import MemfitCallback, MemfitTrainer

    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=PER_RANK, max_steps=STEPS,
                             learning_rate=3e-3, lr_scheduler_type="constant", report_to="none", use_cpu=True,
                             save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_drop_last=True)
    cb = MemfitCallback(budget=budget, measure=True, plan_kwargs=plan_kwargs, verbose=False)
    trainer = MemfitTrainer(model=model, args=args, train_dataset=Counting(), callbacks=[cb])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return cb, losses


def _check(cb, losses, what: str) -> None:
    """The per-rank budget held on every rank, the ranks agreed, the loss fell."""
    rank = dist.get_rank()
    ranks = cb.ranks
    assert ranks is not None and ranks.world_size == WORLD and ranks.rank == rank, what
    plan = cb.plan
    assert plan is not None and not plan.optimizer_in_backward, what
    changed = any(c != "keep" for c in plan.choices.values()) or plan.state_bits < 32
    assert changed, f"{what}: the budget did not make the plan change anything: {plan.choices}"
    assert ranks.predicted_peaks[rank] > 0 and plan.plain_peak_bytes + ranks.reserved_bytes > ranks.budget_bytes, (
        f"{what}: plain training already fits the budget: nothing tested")
    # the same plan on both ranks
    configs = [None] * WORLD
    dist.all_gather_object(configs, plan.config.to_dict())
    assert all(c == configs[0] for c in configs), f"{what}: the ranks run different plans: {configs}"
    # each rank's measured peak within its budget
    measured = ranks.measured_peaks
    assert measured is not None and len(measured) == WORLD and measured[rank] == cb.measured_peak_bytes, what
    assert len(cb.meter.step_peaks) == STEPS - 1, what
    for r in range(WORLD):
        assert measured[r] <= ranks.budgets[r], (
            f"{what}: rank {r} peaked at {measured[r]} bytes, over its budget {ranks.budgets[r]}")
    assert "within" in cb.summary() and "OVER" not in cb.summary(), cb.summary()
    # training converges
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.3, f"{what}: the loss did not fall: {losses}"
    if rank == 0:
        print(f"\n{what}: plan {plan.choices}, {plan.state_bits}-bit state; bytes per rank: budgets {ranks.budgets}, "
              f"predicted {ranks.predicted_peaks}, measured {measured}; losses {[round(x, 3) for x in losses]}")
        print(cb.summary())


def _ddp_job(rank: int, out_dir: str) -> None:
    _as_rank(rank)
    cb, losses = _train(_llama(), out_dir, "60%")
    _check(cb, losses, "DDP")
    assert cb.ranks.parallel == "ddp" and cb.ranks.reserved_bytes > 0
    # DDP replicas stay identical
    flat = torch.cat([p.detach().reshape(-1) for p in cb._trainer.model.parameters()])
    both = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(both, flat)
    assert torch.equal(both[0], both[1]), "DDP: the ranks' parameters differ after training"


def _fsdp_job(rank: int, out_dir: str) -> None:
    from transformers import LlamaForCausalLM
    from transformers.distributed import DistributedConfig

    from memfit.integrations.distributed import is_fsdp2

    _as_rank(rank)
    path = os.path.join(out_dir, "tiny-llama")
    if rank == 0:
        _llama().save_pretrained(path)
    dist.barrier()
    model = LlamaForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=WORLD))
    assert is_fsdp2(model)
    # no step_seconds: the plain step is timed on the sharded model before planning
    cb, losses = _train(model, out_dir, "85%", plan_kwargs={"max_rounds": 4})
    _check(cb, losses, "FSDP2")
    assert cb.ranks.parallel == "fsdp2" and cb.ranks.reserved_bytes == 0


def _ddp_planning(rank: int, rows: int, budget):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from memfit.integrations import MemfitSettings
    from memfit.integrations.distributed import plan_per_rank

    model = _llama()
    x = Counting().ids[:rows]
    batch = {"input_ids": x, "labels": x}
    settings = MemfitSettings(budget, plan_kwargs=FAST_PLAN)
    return model, batch, plan_per_rank(settings, model, batch, None, wrapped=DDP(model), grad_accumulation=1,
                                       clip_grad_norm=None)


def _agree_job(rank: int) -> None:
    """Rank 1's batch is three times rank 0's: the ranks plan differently, and adopt
    the plan that fits both (rank 1's), not the cheaper one that fits rank 0 only."""
    import memfit

    big = {"input_ids": Counting().ids[:6], "labels": Counting().ids[:6]}
    plain_big = memfit.estimate(_llama(), big).peak_bytes
    reserve = 4 * sum(p.numel() for p in _llama().parameters())
    budget = int(0.6 * plain_big) + reserve
    model, batch, (plan, ranks) = _ddp_planning(rank, (2, 6)[rank], budget)
    assert ranks.distinct_plans == 2 and ranks.adopted_from == 1, (ranks, plan.choices)
    assert ranks.reserved == [reserve] * WORLD
    mine = memfit.estimate(model, batch, config=plan.config).peak_bytes
    assert mine + reserve == ranks.predicted_peaks[rank] <= budget, (mine, ranks)
    configs = [None] * WORLD
    dist.all_gather_object(configs, plan.config.to_dict())
    assert configs[0] == configs[1]
    assert any(c != "keep" for c in plan.choices.values()) or plan.state_bits < 32


def _too_small_job(rank: int) -> None:
    """A budget only rank 1 cannot meet: both ranks raise, naming rank 1; one that does
    not even hold DDP's buckets says so."""
    import memfit

    with pytest.raises(memfit.BudgetTooSmall, match="rank 1: no plan fits"):
        _ddp_planning(rank, 2, ("4MB", "1MB")[rank])
    with pytest.raises(memfit.BudgetTooSmall, match="rank 1: .*DDP's gradient buckets"):
        _ddp_planning(rank, 2, ("4MB", "100kB")[rank])


# ------------------------------------------------------------------ tests


@pytest.mark.slow
def test_ranks_adopt_the_plan_that_fits_every_rank(pool):
    pool.run(_agree_job)


@pytest.mark.slow
def test_a_rank_that_cannot_plan_stops_every_rank(pool):
    pool.run(_too_small_job)



def test_hf_budget_per_rank_under_ddp(pool, tmp_path):
    """The Trainer's own DDP; each rank's measured peak (DDP's buckets included)
    stays within the per-rank budget, the ranks agree on one plan, the loss falls
    and the replicas stay identical."""
    pool.run(_ddp_job, str(tmp_path))


@needs_fsdp2
@pytest.mark.slow
def test_hf_budget_per_rank_under_fsdp2(pool, tmp_path):
    """A model sharded at load time with FSDP2; planned on the model that trains
    (fake tensors, FSDP2's state put back), each rank within its budget."""
    pool.run(_fsdp_job, str(tmp_path))
