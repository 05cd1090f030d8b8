"""What the per-rank budget tests of both trainer callbacks share (HF Trainer:
tests/test_integrations_distributed.py; Lightning:
tests/test_integrations_lightning_distributed.py): the workers' pool, a launcher's
environment, the tiny Llama and its data, and the checks every rank makes.

The model is a tiny Llama (2 layers, hidden 64, vocabulary 256) trained on token
sequences that count up (mod 256) from a random start: learnable, so the loss falls
from ln 256 = 5.5; ``PER_RANK`` sequences of ``SEQ`` tokens per rank and step, ``STEPS``
steps.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from _dist import WORLD, Pool

SEQ, VOCAB, PER_RANK, STEPS = 32, 256, 4, 6
FAST_PLAN = {"step_seconds": 0.05, "max_rounds": 4}


@pytest.fixture(scope="module")
def pool():
    import memfit.optim as mo

    mo.backend_name()  # build (or load) the fused kernels once, before the workers race for them
    with Pool() as p:
        yield p


def as_rank(rank: int) -> None:
    """What a launcher (torchrun) sets: the Trainer (or Lightning, which then takes the
    processes as created outside it) joins the existing process group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      NODE_RANK="0", HF_HUB_OFFLINE="1")


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
                       tie_word_embeddings=False)


def llama():
    """The tiny Llama, the same weights on every rank."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(llama_config())


def counting_ids(n: int = WORLD * PER_RANK * STEPS) -> torch.Tensor:
    """``n`` sequences of ``SEQ`` tokens counting up (mod ``VOCAB``) from a random start."""
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (n, 1), generator=g) + torch.arange(SEQ)) % VOCAB


def check_rank_budgets(cb, losses, what: str) -> None:
    """On every rank (a collective): the per-rank budget held on every rank and was
    tight enough to change the plan, the ranks run one plan, the loss fell."""
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
    assert len(cb.meter.step_peaks) == STEPS - 1, (what, cb.meter.step_peaks)
    for r in range(WORLD):
        assert 0 < measured[r] <= ranks.budgets[r], (
            f"{what}: rank {r} peaked at {measured[r]} bytes, over its budget {ranks.budgets[r]}")
    assert "within" in cb.summary() and "OVER" not in cb.summary(), cb.summary()
    # training converges
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.3, f"{what}: the loss did not fall: {losses}"
    if rank == 0:
        print(f"\n{what}: plan {plan.choices}, {plan.state_bits}-bit state; bytes per rank: budgets {ranks.budgets}, "
              f"predicted {ranks.predicted_peaks}, measured {measured}; losses {[round(x, 3) for x in losses]}")
        print(cb.summary())


def check_replicas_equal(params) -> None:
    """DDP replicas stay identical: every rank holds the same parameter values."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    both = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(both, flat)
    assert torch.equal(both[0], both[1]), "DDP: the ranks' parameters differ after training"
