"""Chunked causal-LM loss: the output layer and cross-entropy without full logits.

A causal LM's loss head makes the largest tensors of a training step at small model
sizes: the logits are ``tokens x vocab`` fp32 (GPT-2 at 4 x 256 tokens: 206 MB), and
the step holds two or three of them at once (the logits, the log-softmax that
cross-entropy saves, their gradients in backward). No activation policy can shrink
them, because they are made and consumed inside the head.

:func:`causal_lm_loss` returns a ``loss_fn(model, batch)`` that runs the model's base
(everything up to the last hidden state), then the output layer and cross-entropy on a
few hundred tokens at a time, in one autograd function that keeps no logits: backward
makes each chunk's logits again, turns them into their gradient in place and adds the
output layer's weight gradient into a single tensor (``addmm_``), so backward holds one
weight-sized gradient however many chunks there are. Peak logits memory drops from
``tokens x vocab`` to ``chunk x vocab``; the cost is one more output-layer matmul per
token in backward. The loss equals the model's own ``model(**batch).loss`` (the mean
over labels != -100 of the next-token cross-entropy) up to fp32 summation order.

Use it wherever a ``loss_fn`` is taken (:func:`memfit.estimate`, :func:`memfit.plan`,
:func:`memfit.profile`) and in the training loop::

    loss_fn = memfit.causal_lm_loss()
    plan = memfit.plan(model, batch, "2GiB", loss_fn=loss_fn)
    with plan:
        loss = loss_fn(model, batch)
    loss.backward()

It supports Hugging Face causal LMs (``MODEL_FOR_CAUSAL_LM_MAPPING``) whose output
layer is a plain ``nn.Linear`` applied directly to the base model's last hidden state
(GPT-2, LLaMA, Mistral, Qwen2, ...), also inside a ``peft`` wrapper (a LoRA
fine-tune: the adapters live in the base model's layers and train as usual; the output
layer must carry none), and refuses, with a ``ValueError``, the others: prompt-learning
adapters, models with a transform before the output layer (RoBERTa-style LM heads),
masked LMs, and models that transform the logits (soft-capping, logit scaling). Auxiliary losses a
model adds inside its own forward (e.g. Mixtral's router loss with
``output_router_logits``) are not included. The output layer's weight is used directly
(``F.linear``): module hooks on it do not run. An output layer whose frozen weight
:mod:`memfit.weights` holds compressed (a plan's frozen-weight choice) is called
instead, chunk by chunk, so that it decodes its weight itself.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

__all__ = ["causal_lm_loss"]

IGNORE_INDEX = -100
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum over rows of cross_entropy(linear(h, weight, bias).float(), y)``, ``per_chunk``
    rows at a time, saving only its inputs. Rows whose label is ``IGNORE_INDEX`` add
    nothing. No data-dependent shapes (it runs on fake tensors for the estimator)."""

    @staticmethod
    def forward(ctx, h, y, weight, bias, per_chunk: int):
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], per_chunk):
            logits = F.linear(h[start:start + per_chunk], weight, bias).float()
            total = total + F.cross_entropy(logits, y[start:start + per_chunk], ignore_index=IGNORE_INDEX,
                                            reduction="sum")
            del logits
        ctx.save_for_backward(h, y, weight, bias)
        ctx.per_chunk = per_chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, y, weight, bias = ctx.saved_tensors
        need_h, _, need_w, need_b, _ = ctx.needs_input_grad
        grad_h = torch.empty_like(h) if need_h else None
        # fp32 sums (for half-precision weights they are cast once, at the end)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, h.shape[0], ctx.per_chunk):
            stop = start + ctx.per_chunk
            hc, yc = h[start:stop], y[start:stop]
            g = _logits_grad_(F.linear(hc, weight, bias).float(), yc, grad_total)
            if need_b:
                grad_b += g.sum(0)
            if need_w:
                grad_w.addmm_(g.t(), hc.float())
            if need_h:
                torch.mm(g.to(weight.dtype), weight, out=grad_h[start:stop])
            del g
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and grad_b.dtype != bias.dtype:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, None, grad_w, grad_b, None


def _logits_grad_(logits: torch.Tensor, y: torch.Tensor, grad_total: torch.Tensor) -> torch.Tensor:
    """``grad_total * d(sum of cross-entropy)/d(logits)`` = ``softmax - one_hot(label)``,
    0 on ignored rows, computed in place in the fp32 ``logits``."""
    logits.sub_(logits.logsumexp(dim=-1, keepdim=True)).exp_()  # softmax, in place
    valid = (y != IGNORE_INDEX).unsqueeze(1).to(logits.dtype)
    logits.scatter_add_(1, y.clamp(min=0).unsqueeze(1), -valid)
    return logits.mul_(valid * grad_total)


class _CodedHeadCrossEntropy(torch.autograd.Function):
    """:class:`_LinearCrossEntropy` for an output layer whose weight
    :mod:`memfit.weights` holds compressed (a frozen head: nothing of it trains). The
    logits come from the layer's forward as memfit.weights bound it (it decodes the
    weight), and the hidden states' gradient from that forward's backward (it decodes
    it again); per chunk, saving only the inputs. ``forward`` is called, not the
    module: module hooks would see one call per chunk (MemTracker refuses that), as
    the plain path's ``F.linear`` runs none either."""

    @staticmethod
    def forward(ctx, h, y, head_forward: Callable[[torch.Tensor], torch.Tensor], per_chunk: int):
        total = h.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], per_chunk):
            logits = head_forward(h[start:start + per_chunk]).float()
            total = total + F.cross_entropy(logits, y[start:start + per_chunk], ignore_index=IGNORE_INDEX,
                                            reduction="sum")
            del logits
        ctx.save_for_backward(h, y)
        ctx.head_forward, ctx.per_chunk = head_forward, per_chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, y = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad_h = torch.empty_like(h)
        for start in range(0, h.shape[0], ctx.per_chunk):
            stop = start + ctx.per_chunk
            hc = h[start:stop].detach().requires_grad_()
            with torch.enable_grad():
                out = ctx.head_forward(hc)
            g = _logits_grad_(out.detach().float(), y[start:stop], grad_total)
            grad_h[start:stop] = torch.autograd.grad(out, hc, g.to(out.dtype))[0]
            del out, g
        return grad_h, None, None, None


def _is_causal_lm(model: torch.nn.Module) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except Exception:  # pragma: no cover - transformers is an extra
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _without_adapters_wrapper(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a ``peft`` wrapper (``PeftModel``,
    ``PeftModelForCausalLM``): adapter methods such as LoRA inject their layers into
    that model, so running it runs the adapters. Prompt-learning methods (prefix or
    prompt tuning) add virtual tokens in the wrapper's own forward instead: refused."""
    get_base_model = getattr(model, "get_base_model", None)
    if not type(model).__module__.startswith("peft.") or not callable(get_base_model):
        return model
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            f"causal_lm_loss: {type(model).__name__} uses a prompt-learning adapter "
            f"({getattr(config, 'peft_type', 'prompt learning')}), which adds virtual tokens inside the peft "
            "wrapper's forward; the chunked loss supports adapters injected into the model's layers (LoRA, "
            "DoRA, IA3, ...). Use the model's own loss."
        )
    return get_base_model()


def _parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The base model and the output layer, when the logits are exactly
    ``output_layer(base(**inputs)[0])``: a Hugging Face causal LM (or a ``peft``
    adapter model around one) whose output embedding is a plain ``nn.Linear`` and a
    direct child of the model (no dense / activation / norm transform in between, as
    RoBERTa's or BERT's LM heads have; no adapter on the output layer itself)."""
    wrapper, model = model, _without_adapters_wrapper(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    children = {id(m) for m in model.children()}
    if (not _is_causal_lm(model) or type(head) is not torch.nn.Linear or id(head) not in children
            or base is None or base is model or id(base) not in children):
        inside = f" inside {type(wrapper).__name__}" if wrapper is not model else ""
        layer = f", output layer {type(head).__module__}.{type(head).__qualname__}" if head is not None else ""
        raise ValueError(
            f"causal_lm_loss needs a Hugging Face *ForCausalLM model whose output layer is a plain nn.Linear "
            f"applied to the base model's last hidden state (a peft adapter on the output layer, or "
            f"modules_to_save wrapping it, is not one); got {type(model).__name__}{inside}{layer}"
        )
    cfg = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(cfg, name, None)
        if value not in (None, 1, 1.0, False):
            raise ValueError(
                f"causal_lm_loss: {type(model).__name__} transforms its logits ({name}={value!r}), which the "
                "chunked loss would skip; use the model's own loss"
            )
    return base, head


def causal_lm_loss(chunk_bytes: int = 32 * 2**20) -> Callable[[torch.nn.Module, Mapping[str, Any]], torch.Tensor]:
    """A ``loss_fn(model, batch)`` computing a causal LM's next-token loss in chunks.

    Args:
        chunk_bytes: the fp32 logits of one chunk, in bytes (default 32 MiB): a chunk
            holds ``max(1, chunk_bytes // (4 * vocab))`` tokens.

    The batch is a mapping with ``labels`` (``input_ids``-shaped, -100 = ignored; the
    model's own shift applies: position ``t`` predicts label ``t + 1``) and the model's
    other inputs. Raises ``ValueError`` when the batch has no labels or the model is
    not supported (see the module docstring). A batch whose labels are all ignored
    gives NaN, as ``model(**batch).loss`` does.
    """
    if int(chunk_bytes) <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes!r}")

    def loss_fn(model: torch.nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        if not isinstance(batch, Mapping) or "labels" not in batch:
            raise ValueError("causal_lm_loss: the batch must be a mapping with 'labels'")
        base, head = _parts(model)
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_items_in_batch")}
        ids = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if isinstance(ids, torch.Tensor) and tuple(labels.shape) != tuple(ids.shape[:2]):
            raise ValueError(
                f"causal_lm_loss: labels {tuple(labels.shape)} do not match the tokens {tuple(ids.shape[:2])}"
            )
        hidden = base(**inputs)[0]
        labels = labels.to(hidden.device)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1)
        per_chunk = max(1, int(chunk_bytes) // (4 * head.out_features))
        if head._parameters.get("weight") is None:  # held compressed by memfit.weights
            trainable = [n for n, p in head.named_parameters() if p.requires_grad]
            if trainable:
                raise ValueError(f"causal_lm_loss: the output layer's weight is compressed (memfit.weights) but "
                                 f"its {trainable} train; the chunked loss computes no gradient for them")
            if "forward" not in head.__dict__:
                raise ValueError("causal_lm_loss: the output layer's weight is compressed (memfit.weights) and "
                                 "decoded by forward hooks (its forward was already wrapped), which the chunked "
                                 "loss does not run; use the model's own loss")
            total = _CodedHeadCrossEntropy.apply(h, y, head.forward, per_chunk)
        else:
            total = _LinearCrossEntropy.apply(h, y, head.weight, head.bias, per_chunk)
        # as transformers' loss: divided by num_items_in_batch when the batch gives it
        # (gradient accumulation), else by this batch's labelled tokens
        count = batch.get("num_items_in_batch")
        if count is None:
            count = (y != IGNORE_INDEX).sum()
        elif isinstance(count, torch.Tensor):
            count = count.to(total.device)
        return total / count

    loss_fn.chunk_bytes = int(chunk_bytes)  # type: ignore[attr-defined]
    return loss_fn
