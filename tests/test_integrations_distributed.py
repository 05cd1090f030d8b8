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
from _dist import WORLD, needs_fsdp2, needs_gloo
from _rank_budget import FAST_PLAN, PER_RANK, STEPS, as_rank, check_rank_budgets, check_replicas_equal, counting_ids
from _rank_budget import llama, pool  # noqa: F401 (pool: the module's fixture)

pytestmark = [needs_gloo, pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")



class Counting(torch.utils.data.Dataset):
    """The counting sequences, as the Trainer's dataset."""

    def __init__(self):
        self.ids = counting_ids()

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


def _ddp_job(rank: int, out_dir: str) -> None:
    as_rank(rank)
    cb, losses = _train(llama(), out_dir, "60%")
    check_rank_budgets(cb, losses, "DDP")
    assert cb.ranks.parallel == "ddp" and cb.ranks.reserved_bytes > 0
    check_replicas_equal(cb._trainer.model.parameters())


def _fsdp_job(rank: int, out_dir: str) -> None:
    from transformers import LlamaForCausalLM
    from transformers.distributed import DistributedConfig

    from memfit.integrations.distributed import is_fsdp2

    as_rank(rank)
    path = os.path.join(out_dir, "tiny-llama")
    if rank == 0:
        llama().save_pretrained(path)
    dist.barrier()
    model = LlamaForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=WORLD))
    assert is_fsdp2(model)
    # no step_seconds: the plain step is timed on the sharded model before planning
    cb, losses = _train(model, out_dir, "85%", plan_kwargs={"max_rounds": 4})
    check_rank_budgets(cb, losses, "FSDP2")
    assert cb.ranks.parallel == "fsdp2" and cb.ranks.reserved_bytes == 0


def _ddp_planning(rank: int, rows: int, budget):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from memfit.integrations import MemfitSettings
    from memfit.integrations.distributed import plan_per_rank

    model = llama()
    x = counting_ids()[:rows]
    batch = {"input_ids": x, "labels": x}
    settings = MemfitSettings(budget, plan_kwargs=FAST_PLAN)
    return model, batch, plan_per_rank(settings, model, batch, None, wrapped=DDP(model), grad_accumulation=1,
                                       clip_grad_norm=None)


def _agree_job(rank: int) -> None:
    """Rank 1's batch is three times rank 0's: the ranks plan differently, and adopt
    the plan that fits both (rank 1's), not the cheaper one that fits rank 0 only."""
    import memfit

    ids = counting_ids()[:6]
    big = {"input_ids": ids, "labels": ids}
    plain_big = memfit.estimate(llama(), big).peak_bytes
    reserve = 4 * sum(p.numel() for p in llama().parameters())
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
