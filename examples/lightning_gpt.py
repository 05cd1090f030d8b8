"""Train a small GPT (GPT-2 architecture, random init) with PyTorch Lightning inside a
memory budget, offline.

* Model: ``transformers.GPT2LMHeadModel(GPT2Config(...))``, byte-level (vocabulary 256).
* Data: the ``.py`` sources of Python's standard library as bytes
  (:func:`memfit.data.load_text_bytes`), cut into seeded random windows
  (:class:`memfit.data.ByteBatches`): the same data as ``memfit demo``.
* memfit: ``MemfitCallback(budget=...)`` plans the step on the first batch, applies it
  around every training batch, replaces the optimizer ``configure_optimizers`` returns by
  the planned one (same learning rate, weight decay and LR scheduler) and, with
  ``measure=True``, measures the real peak of each batch with ``MemTracker``.

Run::

    pip install "memfit[hf,lightning]"
    python examples/lightning_gpt.py                 # 40% of the plain peak, 60 steps
    python examples/lightning_gpt.py --budget 60MB --steps 200

It prints the plan, the loss before and after (on held-out windows) and the measured
peak against the budget.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from memfit.data import VOCAB_SIZE, ByteBatches, load_text_bytes


def build_model(n_layer: int = 4, n_embd: int = 128, n_head: int = 4, seq_len: int = 128, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def make_module(model, lr: float = 3e-3, steps: int = 100):
    import lightning as L

    class ByteGPT(L.LightningModule):
        """Next-byte prediction; AdamW with a cosine schedule (memfit keeps both and
        swaps in the planned optimizer)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            loss = self.model(input_ids=batch, labels=batch).loss
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return ByteGPT()


@torch.no_grad()
def evaluate(model, batches) -> float:
    was = model.training
    model.eval()
    losses = [float(model(input_ids=b, labels=b).loss) for b in batches]
    model.train(was)
    return sum(losses) / len(losses)


def run(
    budget: int | str = "40%",
    steps: int = 60,
    batch_size: int = 16,
    seq_len: int = 128,
    n_layer: int = 4,
    n_embd: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    max_bytes: int = 4_000_000,
    eval_batches: int = 4,
    measure: bool = True,
    plan_kwargs: dict | None = None,
    verbose: bool = True,
) -> dict:
    """Train for ``steps`` steps under ``budget``; returns the plan, the held-out loss
    before/after, the measured peak and timings."""
    import lightning as L

    from memfit.integrations.lightning import MemfitCallback

    data = load_text_bytes(max_bytes=max_bytes)
    cut = int(len(data) * 0.9)
    train = ByteBatches(data[:cut], seq_len=seq_len, batch_size=batch_size, steps=steps, seed=seed)
    held = ByteBatches(data[cut:], seq_len=seq_len, batch_size=batch_size, steps=eval_batches, seed=seed + 1)
    held = [held[i] for i in range(len(held))]

    model = build_model(n_layer=n_layer, n_embd=n_embd, seq_len=seq_len, seed=seed)
    module = make_module(model, lr=lr, steps=steps)
    loss_before = evaluate(model, held)

    cb = MemfitCallback(budget=budget, measure=measure, plan_kwargs=plan_kwargs, verbose=verbose)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, callbacks=[cb], logger=False, enable_checkpointing=False,
        enable_progress_bar=verbose, enable_model_summary=False, num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(train, batch_size=None, shuffle=False)
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - t0
    loss_after = evaluate(model, held)
    plan = cb.plan
    return {
        "plan": plan,
        "budget_bytes": plan.budget_bytes,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "plain_peak_bytes": plan.plain_peak_bytes,
        "measured_peak_bytes": cb.measured_peak_bytes,
        "measured_steps": len(cb.meter.step_peaks) if cb.meter is not None else 0,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "steps": trainer.global_step,
        "seconds": seconds,
        "params": sum(p.numel() for p in model.parameters()),
        "optimizer": type(cb.optimizer).__name__ if cb.optimizer is not None else None,
        "callback": cb,
    }


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="40%", help="memory budget: 60MB, 0.06GB, 40%% (of the plain peak)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-measure", action="store_true", help="skip MemTracker (faster steps)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = run(budget=a.budget, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, n_layer=a.layers,
            n_embd=a.width, lr=a.lr, seed=a.seed, measure=not a.no_measure)
    print()
    print(f"GPT-2 shape, {r['params'] / 1e6:.2f}M params, stdlib bytes, batch {a.batch_size} x {a.seq_len}, "
          f"{r['steps']} steps in {r['seconds']:.0f} s ({platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__})")
    print(f"  held-out loss      {r['loss_before']:.4f} -> {r['loss_after']:.4f}")
    print(f"  budget             {_mb(r['budget_bytes'])}")
    print(f"  plain PyTorch peak {_mb(r['plain_peak_bytes'])} (estimated)")
    print(f"  planned peak       {_mb(r['predicted_peak_bytes'])}")
    measured = r["measured_peak_bytes"]
    if measured is not None:
        ok = measured <= r["budget_bytes"]
        print(f"  measured peak      {_mb(measured)} (MemTracker, max over {r['measured_steps']} steps): "
              f"{'within' if ok else 'OVER'} the budget, {100 * measured / r['budget_bytes']:.0f}%")
    print(f"  optimizer          {r['optimizer']}")
    good = r["loss_after"] < r["loss_before"] and (measured is None or measured <= r["budget_bytes"])
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
