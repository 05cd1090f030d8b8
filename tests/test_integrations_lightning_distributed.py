"""The Lightning callback with a per-rank budget under DDP (and FSDP2 through
``ModelParallelStrategy``), on 2 gloo processes on CPU (tests/_dist.py's workers).

The workers already hold the process group; each one runs ``L.Trainer(accelerator=
"cpu", devices=2, strategy=...)`` with ``LOCAL_RANK``/``RANK``/``WORLD_SIZE`` set, as a
launcher (torchrun) would, so Lightning joins that group instead of launching
processes. Each trains tests/_rank_budget.py's tiny Llama on its counting sequences;
Lightning's distributed sampler gives each rank its own batches. Checked on every rank
(``check_rank_budgets``): each rank's measured peak (MemTracker over whole batches,
from the second optimizer step on) is within its budget, the budget made the plan
change something, both ranks applied the same plan (and the callback's record says
so), and the loss falls; under DDP the replicas stay identical.
"""

from __future__ import annotations

import pytest
import torch
from _dist import WORLD, needs_fsdp2, needs_gloo
from _rank_budget import FAST_PLAN, PER_RANK, STEPS, as_rank, check_rank_budgets, check_replicas_equal, counting_ids
from _rank_budget import llama, pool  # noqa: F401 (pool: the module's fixture)

pytestmark = [needs_gloo, pytest.mark.filterwarnings("ignore::RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]
pytest.importorskip("lightning", reason="memfit.integrations.lightning needs lightning (memfit[lightning])")
pytest.importorskip("transformers")


def _loader():
    return torch.utils.data.DataLoader(list(counting_ids()), batch_size=PER_RANK, shuffle=False, drop_last=True)


def _module(shard: bool = False):
    import lightning as L

    class LlamaModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = llama()
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
    """The shared per-rank checks, and the callback ran every batch under the plan
    with the planned optimizer."""
    check_rank_budgets(cb, losses, what)
    assert cb.steps == STEPS and cb.compressed_steps >= 1, (what, cb.steps, cb.compressed_steps)
    assert getattr(cb.optimizer, "param_groups", None), what


def _ddp_job(rank: int) -> None:
    as_rank(rank)
    module = _module()
    cb, _ = _fit(module, "ddp", "60%")
    _check(cb, module.losses, "Lightning DDP")
    assert cb.ranks.parallel == "ddp" and cb.ranks.reserved_bytes > 0
    check_replicas_equal(module.parameters())


def _fsdp_job(rank: int) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from memfit.integrations.distributed import is_fsdp2

    as_rank(rank)
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
