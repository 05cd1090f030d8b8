"""The Lightning callback with a per-rank budget under DDP (and FSDP2 through
``ModelParallelStrategy``), on 2 gloo processes on CPU (tests/_dist.py's workers).

The workers already hold the process group; each one runs ``L.Trainer(accelerator=
"cpu", devices=2, strategy=...)`` with ``LOCAL_RANK``/``RANK``/``WORLD_SIZE`` set, as a
launcher (torchrun) would, so Lightning joins that group instead of launching
processes. Each trains a tiny Llama (2 layers, hidden 64, vocabulary 256) on sequences
that count up from a random start, 4 x 32 tokens per rank and step; Lightning's
distributed sampler gives each rank its own batches. Checked on every rank: each
rank's measured peak (MemTracker over whole batches, from the second optimizer step
on) is within its budget, the budget made the plan change something, both ranks
applied the same plan (and the callback's record says so), and the loss falls.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from _dist import WORLD, Pool, needs_fsdp2, needs_gloo

pytestmark = [needs_gloo, pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
pytest.importorskip("lightning", reason="memfit.integrations.lightning needs lightning (memfit[lightning])")
pytest.importorskip("transformers")

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
    """What a launcher sets: Lightning then takes the processes as created outside it
    and joins the existing process group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), NODE_RANK="0",
                      HF_HUB_OFFLINE="1")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def _loader():
    g = torch.Generator().manual_seed(1)
    ids = (torch.randint(0, VOCAB, (WORLD * PER_RANK * STEPS, 1), generator=g) + torch.arange(SEQ)) % VOCAB
    return torch.utils.data.DataLoader(list(ids), batch_size=PER_RANK, shuffle=False, drop_last=True)


def _module(shard: bool = False):
    import lightning as L

    class LlamaModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _llama()
            self.losses: list[float] = []

        def configure_model(self):
            if shard:
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                for layer in self.model.model.layers:
                    fully_shard(layer, mesh=mesh)
                fully_shard(self.model, mesh=mesh)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))  # not in training_step: the planner runs it on fake tensors

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    return LlamaModule()


def _fit(module, strategy, budget, plan_kwargs=FAST_PLAN):
    import lightning as L

    from memfit.integrations.lightning import MemfitCallback

    cb = MemfitCallback(budget=budget, measure=True, plan_kwargs=plan_kwargs, verbose=False)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=WORLD, strategy=strategy, callbacks=[cb],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, _loader())
    return cb, trainer


def _check(cb, losses, what: str) -> None:
    """The per-rank budget held on every rank, the ranks applied one plan, the loss fell."""
    rank = dist.get_rank()
    ranks = cb.ranks
    assert ranks is not None and ranks.world_size == WORLD and ranks.rank == rank, what
    plan = cb.plan
    assert plan is not None and not plan.optimizer_in_backward, what
    assert cb.steps == STEPS and cb.compressed_steps >= 1, (what, cb.steps, cb.compressed_steps)
    changed = any(c != "keep" for c in plan.choices.values()) or plan.state_bits < 32
    assert changed, f"{what}: the budget did not make the plan change anything: {plan.choices}"
    assert plan.plain_peak_bytes + ranks.reserved_bytes > ranks.budget_bytes, (
        f"{what}: plain training already fits the budget: nothing tested")
    # the same plan on both ranks, and the optimizer it chose
    configs = [None] * WORLD
    dist.all_gather_object(configs, plan.config.to_dict())
    assert all(c == configs[0] for c in configs), f"{what}: the ranks run different plans: {configs}"
    assert getattr(cb.optimizer, "param_groups", None), what
    # each rank's measured peak within its budget
    measured = ranks.measured_peaks
    assert measured is not None and len(measured) == WORLD and measured[rank] == cb.measured_peak_bytes, what
    assert len(cb.meter.step_peaks) == STEPS - 1, (what, cb.meter.step_peaks)
    for r in range(WORLD):
        assert 0 < measured[r] <= ranks.budgets[r], (
            f"{what}: rank {r} peaked at {measured[r]} bytes, over its budget {ranks.budgets[r]}")
    assert "within" in cb.summary() and "OVER" not in cb.summary(), cb.summary()
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.3, f"{what}: the loss did not fall: {losses}"
    if rank == 0:
        print(f"\n{what}: plan {plan.choices}, {plan.state_bits}-bit state; bytes per rank: budgets {ranks.budgets}, "
              f"predicted {ranks.predicted_peaks}, measured {measured}; losses {[round(x, 3) for x in losses]}")
        print(cb.summary())


def _ddp_job(rank: int) -> None:
    _as_rank(rank)
    module = _module()
    cb, _ = _fit(module, "ddp", "60%")
    _check(cb, module.losses, "Lightning DDP")
    assert cb.ranks.parallel == "ddp" and cb.ranks.reserved_bytes > 0
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    both = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(both, flat)
    assert torch.equal(both[0], both[1]), "DDP: the ranks' parameters differ after training"


def _fsdp_job(rank: int) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from memfit.integrations.distributed import is_fsdp2

    _as_rank(rank)
    module = _module(shard=True)
    strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    # no step_seconds: the plain step is timed on the sharded model before planning
    cb, _ = _fit(module, strategy, "85%", plan_kwargs={"max_rounds": 4})
    assert is_fsdp2(module)
    _check(cb, module.losses, "Lightning FSDP2")
    assert cb.ranks.parallel == "fsdp2" and cb.ranks.reserved_bytes == 0


# ------------------------------------------------------------------ tests


def test_lightning_budget_per_rank_under_ddp(pool):
    """Lightning's own DDP (strategy="ddp", 2 CPU devices): each rank's measured peak,
    DDP's buckets included, within the per-rank budget; one plan on both ranks."""
    pool.run(_ddp_job)


@needs_fsdp2
@pytest.mark.slow
def test_lightning_budget_per_rank_under_fsdp2(pool):
    """ModelParallelStrategy with fully_shard in configure_model: planned on the
    sharded model (fake tensors, FSDP2's state put back), each rank within its budget."""
    pool.run(_fsdp_job)
