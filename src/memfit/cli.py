"""The ``memfit`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its
arguments and sets ``func``, a callable taking the parsed ``argparse.Namespace`` and
returning an exit code. ``_COMMANDS`` lists them in help order. Only commands that
work are registered: ``demo``, ``estimate``, ``profile`` and ``plan``.

``estimate``, ``profile`` and ``plan`` take ``--model`` (a transformers config key
with overrides, or ``module:factory``; see :func:`build_model_spec`) and ``--batch``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from . import __version__


# --------------------------------------------------------------------------- demo


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train a small GPT with fp32, memfit 8/4/2-bit and checkpointing; compare memory, speed, loss",
        description=(
            "Train a small randomly initialised GPT-2 (byte vocabulary) on the .py sources of "
            "Python's standard library, once per way of keeping activations: plain fp32, "
            "memfit at each --bits width, and torch activation checkpointing. Same init, same "
            "data order, same optimizer. Prints one table and writes a PNG with the loss "
            "curves and the measured memory. Nothing is downloaded."
        ),
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 300; 12 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed for the init, the batch order and the rounding noise")
    p.add_argument("--bits", default="8,4,2", help="memfit bit widths to run, comma-separated (default 8,4,2)")
    p.add_argument(
        "--bits-everywhere",
        action="store_true",
        help="quantize the loss head at --bits too (default: final norm, output layer and loss at 8 bits)",
    )
    p.add_argument("--no-checkpointing", action="store_true", help="skip the activation-checkpointing run")
    p.add_argument("--no-plan", action="store_true",
                   help="skip the planned run (memfit.plan at a quarter of the fp32 run's peak)")
    p.add_argument("--plan", action="store_true", help="include the planned run with --quick too")
    p.add_argument("--out", default="memfit-demo.png", help="where to write the PNG (default memfit-demo.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--json", metavar="PATH", default=None, help="also write every measurement as JSON")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (seconds; for smoke tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
        import rich  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(
            f"memfit demo needs {exc.name}: pip install 'memfit[hf,plot,cli]'",
            file=sys.stderr,
        )
        return 2
    from . import demo

    try:
        bits = demo.parse_bits(args.bits)
    except ValueError as exc:
        print(f"memfit demo: --bits: {exc}", file=sys.stderr)
        return 2
    overrides = dict(seed=args.seed, bits=bits, checkpointing=not args.no_checkpointing)
    if args.no_plan:
        overrides["planned"] = False
    elif args.plan:
        overrides["planned"] = True
    if args.bits_everywhere:
        overrides["bits_everywhere"] = True
    if args.steps is not None:
        overrides["steps"] = args.steps
    try:
        config = demo.DemoConfig.quick(**overrides) if args.quick else demo.DemoConfig(**overrides)
    except ValueError as exc:
        print(f"memfit demo: {exc}", file=sys.stderr)
        return 2
    demo.main(
        config,
        out=None if args.no_plot else args.out,
        json_path=args.json,
        progress=not args.no_progress,
    )
    return 0


# --------------------------------------------------------------------------- models for estimate/profile/plan

# key -> (config class, model class, input kind). Nothing is downloaded: the model is
# built from the config class with random weights (or on the meta device for estimate).
_MODEL_KEYS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "tokens"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", "tokens"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "tokens"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "tokens"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "tokens"),
    "phi": ("PhiConfig", "PhiForCausalLM", "tokens"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", "tokens"),
    "opt": ("OPTConfig", "OPTForCausalLM", "tokens"),
    "bert": ("BertConfig", "BertForMaskedLM", "tokens"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", "tokens"),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM", "tokens"),
    "vit": ("ViTConfig", "ViTForImageClassification", "images"),
    "resnet": ("ResNetConfig", "ResNetForImageClassification", "images"),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification", "images"),
    "swin": ("SwinConfig", "SwinForImageClassification", "images"),
}


class _SpecError(ValueError):
    pass


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _parse_overrides(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise _SpecError(f"--model: override {part!r} is not key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def _parse_batch(text: str | None) -> tuple[int, ...]:
    if text is None:
        return ()
    try:
        dims = tuple(int(x) for x in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise _SpecError(f"--batch {text!r}: expected sizes joined by 'x', e.g. 4x256") from None
    if not dims or any(d <= 0 for d in dims):
        raise _SpecError(f"--batch {text!r}: sizes must be positive")
    return dims


def _check_config_keys(key: str, cfg_cls, overrides: dict) -> None:
    """Refuse override keys the config class does not know: transformers configs take
    any keyword and keep it as an attribute, so a typo (``n_layers`` for ``n_layer``)
    would otherwise be silently ignored."""
    import difflib
    import inspect

    known = set(inspect.signature(cfg_cls.__init__).parameters) - {"self", "kwargs"}
    known |= set(getattr(cfg_cls, "attribute_map", {}))
    known |= {k for k in vars(cfg_cls()) if not k.startswith("_")}
    for name in overrides:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
            raise _SpecError(f"--model {key}: {cfg_cls.__name__} has no key {name!r}{hint}")


def _hf_model(key: str, overrides: dict, batch: tuple[int, ...], device: str):
    import torch
    import transformers

    cfg_name, model_name, kind = _MODEL_KEYS[key]
    cfg_cls = getattr(transformers, cfg_name, None)
    model_cls = getattr(transformers, model_name, None)
    if cfg_cls is None or model_cls is None:
        raise _SpecError(f"--model {key}: this transformers ({transformers.__version__}) has no {cfg_name}")
    _check_config_keys(key, cfg_cls, overrides)
    defaults = {"use_cache": False} if kind == "tokens" and key not in ("bert", "roberta", "distilbert") else {}
    try:
        config = cfg_cls(**{**defaults, **overrides})
    except Exception as exc:  # bad override values
        raise _SpecError(f"--model {key}: {cfg_name}({overrides}) failed: {exc}") from exc
    vocab = getattr(config, "vocab_size", None)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tok = getattr(config, attr, None)
        if vocab and isinstance(tok, int) and tok >= vocab and attr not in overrides:
            setattr(config, attr, None)  # a shrunken vocabulary: drop special ids outside it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(device):
            model = model_cls(config)
    if kind == "tokens" and hasattr(model, "loss_type") and key not in ("bert", "roberta", "distilbert"):
        model.loss_type = "ForCausalLM"
    if kind == "tokens":
        data = _token_batch(config, batch)
    else:
        b = batch[0] if batch else 1
        size = batch[1] if len(batch) > 1 else getattr(config, "image_size", 224)
        if isinstance(size, (list, tuple)):
            size = size[0]
        ch = getattr(config, "num_channels", 3)
        g = torch.Generator().manual_seed(0)
        data = {
            "pixel_values": torch.randn(b, ch, size, size, generator=g),
            "labels": torch.randint(0, max(1, config.num_labels), (b,), generator=g),
        }
    return model, data, None


def _token_batch(config, batch: tuple[int, ...]) -> dict:
    """``input_ids`` and ``labels`` of ``batch`` (``B`` or ``BxS``; default 1 x min(256, positions))."""
    import torch

    b, seq = (batch + (None,))[:2] if batch else (1, None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    seq = seq or min(256, limit or 256)
    if limit and seq > limit:
        raise _SpecError(f"--batch: sequence length {seq} exceeds the model's {limit} positions")
    ids = torch.randint(0, config.vocab_size, (b, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone()}


def _config_file_model(spec: str, batch: tuple[int, ...], device: str):
    """A causal LM built from a local ``config.json`` (or a directory holding one), with
    random weights: nothing is downloaded; on the meta device nothing is allocated."""
    import difflib
    import json
    from pathlib import Path

    import torch
    import transformers

    path = Path(spec)
    if not path.exists():
        raise _SpecError(f"--model {spec!r}: no such file or directory")
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise _SpecError(f"--model {spec!r}: the directory has no config.json")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _SpecError(f"--model {spec!r}: cannot read {path} as JSON: {exc}") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    known = sorted(transformers.CONFIG_MAPPING.keys())
    if model_type not in known:
        close = difflib.get_close_matches(str(model_type), known, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise _SpecError(f"--model {spec!r}: {path} has model_type {model_type!r}, which this transformers "
                         f"({transformers.__version__}) does not know{hint}")
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(model_type, **fields)
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise _SpecError(f"--model {spec!r}: model_type {model_type!r} is not a causal LM; config files are "
                         "read for causal LMs (a KEY or module:factory spec covers other models)")
    config.use_cache = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(config)
    if hasattr(model, "loss_type"):
        model.loss_type = "ForCausalLM"
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        model.to(dtype)
    return model, _token_batch(config, batch), None


def _factory_model(spec: str, batch: tuple[int, ...]):
    import importlib
    import importlib.util
    from pathlib import Path

    import torch

    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py") or "/" in mod_name:
            path = Path(mod_name)
            if not path.exists():
                raise _SpecError(f"--model {spec!r}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise _SpecError(f"--model {spec!r}: cannot import {mod_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise _SpecError(f"--model {spec!r}: {mod_name} has no callable {attr!r}")
    out = factory()
    loss_fn = None
    if isinstance(out, torch.nn.Module):
        if not batch:
            raise _SpecError(f"--model {spec!r} returned only a model: give --batch as the input's shape, e.g. 8x3x32x32")
        model, data = out, torch.randn(*batch, generator=torch.Generator().manual_seed(0))
    elif isinstance(out, tuple) and len(out) in (2, 3) and isinstance(out[0], torch.nn.Module):
        model, data = out[0], out[1]
        loss_fn = out[2] if len(out) == 3 else None
    else:
        raise _SpecError(f"--model {spec!r}: the factory must return a model, (model, batch) or (model, batch, loss_fn)")
    if loss_fn is None and not isinstance(data, dict):
        def loss_fn(m, x):
            out = m(x)
            loss = getattr(out, "loss", None)
            if loss is not None:
                return loss
            if isinstance(out, (tuple, list)):
                out = out[0]
            return out.float().pow(2).mean()
    return model, data, loss_fn


def _is_config_path(spec: str) -> bool:
    """A ``--model`` naming a config file or model directory: a ``.json`` path, or an
    existing directory (which must hold ``config.json``)."""
    from pathlib import Path

    return spec.endswith(".json") or (":" not in spec and Path(spec).is_dir()) or (
        ("/" in spec or spec.startswith(".")) and ":" not in spec)


def build_model_spec(spec: str, batch: str | None = None, *, device: str = "cpu"):
    """``(model, batch, loss_fn)`` for a ``--model`` spec: ``KEY[:overrides]`` with a
    key of :data:`_MODEL_KEYS` (``gpt2:n_layer=12,n_embd=768``; random weights, nothing
    downloaded), a local ``config.json`` or a directory holding one (a causal LM with
    random weights, in the config's dtype), or ``module:factory`` /
    ``path/to/file.py:factory`` returning a model,
    ``(model, batch)`` or ``(model, batch, loss_fn)``. ``batch``: ``BxS`` for token
    models (batch x sequence), ``B`` or ``BxSIZE`` for image models, the input's shape
    for a factory that returns only a model (loss: the output's mean square)."""
    dims = _parse_batch(batch)
    if _is_config_path(spec):
        return _config_file_model(spec, dims, device)
    key, _, rest = spec.partition(":")
    if key.lower() in _MODEL_KEYS:
        return _hf_model(key.lower(), _parse_overrides(rest), dims, device)
    if ":" not in spec:
        raise _SpecError(
            f"--model {spec!r}: not a known key ({', '.join(sorted(_MODEL_KEYS))}) nor module:factory"
        )
    return _factory_model(spec, dims)


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_LORA_TARGETS = (("q_proj", "v_proj"), ("c_attn",), ("query", "value"), ("query_key_value",), ("Wqkv",))


def _add_model_args(p, *, budget: bool = False) -> None:
    p.add_argument("--model", required=True,
                   help="KEY[:k=v,...] with KEY one of " + ", ".join(sorted(_MODEL_KEYS))
                   + " (a transformers config, random weights, e.g. gpt2:n_layer=12,n_embd=768), "
                   "a local config.json or a model directory holding one (a causal LM, random weights, "
                   "nothing downloaded), or module:factory / file.py:factory returning (model, batch) or a model")
    p.add_argument("--batch", default=None, help="BxS for token models (default 1x256), B or BxSIZE for images")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "lion"])
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="the weights' dtype (default: fp32; a config.json's own dtype)")
    p.add_argument("--autocast", default=None, choices=["bf16", "fp16"],
                   help="run the forward and the loss under torch.autocast in this dtype")
    p.add_argument("--lora", type=int, default=None, metavar="R",
                   help="add peft LoRA adapters of rank R on the attention projections; the base is frozen "
                   "(needs peft)")
    p.add_argument("--loss", default="model", choices=["model", "chunked"],
                   help="model: model(**batch).loss; chunked: memfit.causal_lm_loss(), the output layer and "
                   "cross-entropy in chunks, without the full logits (causal LMs)")
    p.add_argument("--accumulation", "--grad-accumulation", dest="accumulation", type=int, default=1,
                   metavar="N", help="gradient accumulation: micro-batches per optimizer step (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    if budget:
        p.add_argument("--budget", required=True, help="memory budget: 6GiB, 600MB, 1.5 GiB, bytes, or 40%% of plain's estimated peak")
        p.add_argument("--state-bits", default=None,
                       help="optimizer state widths the plan may use, e.g. 8 or 32,8 (default 32,8,4)")
    else:
        p.add_argument("--state-bits", type=int, default=32, choices=[32, 8, 4], help="optimizer state bits (default 32)")


def _parse_widths(text: str) -> tuple[int, ...]:
    """``--state-bits 32,8``: optimizer state widths, each 32, 8 or 4."""
    from ._validate import check_bits

    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    if not parts or not all(x.isdigit() for x in parts):
        raise _SpecError(f"--state-bits {text!r}: expected widths among 32, 8 and 4 joined by commas, e.g. 32,8")
    return tuple(check_bits(int(x), (32, 8, 4), name="--state-bits") for x in parts)


def _parse_weight_formats(text: str | None):
    """``--weights int8,nf4`` for plan: None (the planner's default), ``()`` for none."""
    if text is None:
        return None
    parts = [x.strip().lower() for x in text.split(",") if x.strip()]
    if parts == ["none"]:
        return ()
    for x in parts:
        if x not in ("int8", "nf4", "int4"):
            raise _SpecError(f"--weights {text!r}: expected formats among int8, nf4, int4 joined by commas, or none")
    return tuple(parts)


def _load(args, device: str = "cpu"):
    """``(model, batch, loss_fn)`` for the model options: ``--model``, ``--batch``,
    ``--dtype``, ``--lora``, ``--loss`` (``--autocast`` is a step option: each command
    passes it on as :attr:`memfit.step.StepConfig.autocast`)."""
    import torch

    if args.lora is not None and args.lora < 1:
        raise _SpecError(f"--lora {args.lora}: the rank must be a positive int")
    if args.accumulation < 1:
        raise _SpecError(f"--accumulation {args.accumulation}: must be a positive int")
    model, batch, loss_fn = build_model_spec(args.model, args.batch, device=device)
    if args.dtype is not None:
        model.to(getattr(torch, _DTYPES[args.dtype]))
    if args.lora is not None:
        model = _with_lora(model, args.lora)
    if args.loss == "chunked":
        if loss_fn is not None:
            raise _SpecError("--loss chunked: this --model comes with its own loss function")
        from .loss import causal_lm_loss

        loss_fn = causal_lm_loss()
    return model, batch, loss_fn


def _with_lora(model, rank: int):
    """``model`` with peft LoRA adapters of ``rank`` on its attention projections (the
    first of :data:`_LORA_TARGETS` it has); everything else frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise _SpecError("--lora needs peft, which is not installed: pip install peft") from None
    leaves = {name.rpartition(".")[2] for name, _ in model.named_modules()}
    for targets in _LORA_TARGETS:
        if set(targets) <= leaves:
            return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)))
    raise _SpecError(f"--lora: {type(model).__name__} has none of the attention projections memfit knows "
                     f"({', '.join('/'.join(t) for t in _LORA_TARGETS)})")


def _frozen_formats(model, fmt: str) -> dict:
    """``--weights FMT`` for estimate: every frozen weight group in ``fmt``."""
    from .plan.frozen import frozen_groups

    groups = frozen_groups(model)
    if not groups:
        raise _SpecError(f"--weights {fmt}: the model has no frozen floating-point weights to compress "
                         "(add --lora R to freeze the base)")
    return {g.module: fmt for g in groups}


def _console():
    from rich.console import Console

    c = Console()
    if not c.is_terminal and c.width < 120:
        c.width = 120
    return c


def _err(cmd: str, exc: BaseException) -> int:
    print(f"memfit {cmd}: {exc}", file=sys.stderr)
    return 2


def _bar_parts(breakdown: dict) -> dict:
    return {
        "parameters": breakdown.get("params", 0) + breakdown.get("buffers", 0) + breakdown.get("inputs", 0),
        "gradients": breakdown.get("grads", 0),
        "optimizer state": breakdown.get("optimizer", 0),
        "activations": breakdown.get("activations", 0),
        "temporaries": breakdown.get("temporaries", 0),
    }


def save_memory_plot(path, bars: "list[tuple[str, dict]]", *, budget: int | None = None, title: str = "") -> str:
    """Write :func:`memory_figure` to ``path`` (PNG); returns the path."""
    memory_figure(bars, budget=budget, title=title).savefig(str(path))
    return str(path)


def memory_figure(bars: "list[tuple[str, dict]]", *, budget: int | None = None, title: str = ""):
    """Stacked bars of parameters, gradients, optimizer state, activations and
    temporaries at the peak, one bar per ``(label, breakdown)``, in decimal MB
    (:mod:`memfit._units`, as every table memfit prints); each bar's total written on
    top of it, a dashed budget line, the legend beside the bars (never over them)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ._units import MB, format_bytes

    fig = Figure(figsize=(3.6 + 1.6 * len(bars), 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"parameters": "tab:blue", "gradients": "tab:orange", "optimizer state": "tab:green",
              "activations": "tab:red", "temporaries": "tab:gray"}
    xs = list(range(len(bars)))
    bottoms = [0.0] * len(bars)
    totals = [sum(_bar_parts(bd).values()) for _, bd in bars]
    for part, color in colors.items():
        vals = [_bar_parts(bd)[part] / MB for _, bd in bars]
        ax.bar(xs, vals, 0.6, bottom=bottoms, color=color, label=part)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    for x, top, total in zip(xs, bottoms, totals):
        ax.annotate(format_bytes(total), (x, top), xytext=(0, 3), textcoords="offset points", ha="center",
                    va="bottom", fontsize=8, zorder=5,
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none"))
    if budget is not None:
        ax.axhline(budget / MB, color="black", linestyle="--", linewidth=1, label=f"budget {format_bytes(budget)}")
    ax.set_xticks(xs)
    ax.set_xticklabels([label for label, _ in bars], fontsize=8)
    ax.set_xlim(-0.6, len(bars) - 0.4)
    ax.set_ylim(0, max(bottoms + [budget / MB if budget else 0.0]) * 1.12 or 1.0)
    ax.set_ylabel("MB (10^6 bytes) at the peak of a step")
    ax.set_title(title or "memory at the peak", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- estimate


def _add_estimate(subparsers) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="estimate the peak memory of a training step (fake tensors: nothing is computed)",
        description=(
            "Estimate the peak memory of one training step (forward, backward, optimizer step) "
            "under FakeTensorMode: the model is built on the meta device and nothing real is "
            "allocated, so models bigger than this machine's memory work too."
        ),
    )
    _add_model_args(p)
    p.add_argument("--bits", default=None, choices=["8", "4", "2", "fp8"],
                   help="compress activations: 8, 4, 2 or fp8 (default: keep)")
    p.add_argument("--checkpoint", default=None, help="comma-separated module names to recompute in backward")
    p.add_argument("--optimizer-in-backward", action="store_true", help="step each parameter inside backward")
    p.add_argument("--weights", default=None, choices=["nf4", "int4", "int8"],
                   help="store the frozen weights (with --lora: the base) in this format (memfit.weights)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a stacked bar of the peak's breakdown")
    p.set_defaults(func=_run_estimate)


def _run_estimate(args) -> int:
    import json

    from .plan import estimate
    from .plan.frozen import shadow_model
    from .step import StepConfig

    try:
        model, batch, loss_fn = _load(args, device="meta")
        bits = None if args.bits is None else (args.bits if args.bits == "fp8" else int(args.bits))
        ckpt = tuple(filter(None, (args.checkpoint or "").split(",")))
        cfg = StepConfig(policy=bits, checkpoint=ckpt, optimizer=args.optimizer, state_bits=args.state_bits,
                         optimizer_in_backward=args.optimizer_in_backward, accumulation_steps=args.accumulation,
                         autocast=args.autocast)
        n_params = sum(p.numel() for p in model.parameters())
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if args.weights:
            model = shadow_model(model, _frozen_formats(model, args.weights))
        est = estimate(model, batch, config=cfg, loss_fn=loss_fn)
    except (ValueError, TypeError, RuntimeError, ImportError) as exc:
        return _err("estimate", exc)
    if args.json:
        print(json.dumps({"model": args.model, "batch": args.batch, "n_params": n_params,
                          "n_trainable": n_trainable, "weights": args.weights, **est.to_dict()}, indent=1))
    else:
        console = _console()
        frozen = f" ({n_trainable / 1e6:.1f}M trainable)" if n_trainable != n_params else ""
        weights = f", frozen weights in {args.weights}" if args.weights else ""
        console.print(f"{type(model).__name__}: {n_params / 1e6:.1f}M parameters{frozen}{weights}, "
                      f"batch {args.batch or 'default'}")
        console.print(est.table())
    if args.plot:
        path = save_memory_plot(args.plot, [("estimate", est.peak_breakdown)], title=f"{args.model} {args.batch or ''}")
        if not args.json:
            print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- profile


def _add_profile(subparsers) -> None:
    p = subparsers.add_parser(
        "profile",
        help="run a few real steps: per-module saved bytes and forward/backward time",
        description="Run a few real training steps and report, per module, what autograd saves "
        "for backward (by kind and dtype) and the forward and backward time.",
    )
    _add_model_args(p)
    p.add_argument("--steps", type=int, default=3, help="steps to run (default 3)")
    p.add_argument("--top", type=int, default=20, help="modules to show (default 20)")
    p.set_defaults(func=_run_profile)


def _run_profile(args) -> int:
    import json

    from .plan import profile
    from .step import StepConfig

    try:
        if args.accumulation != 1:
            raise _SpecError("--accumulation: profile times single steps; use it with estimate or plan")
        model, batch, loss_fn = _load(args)
        prof = profile(model, batch, loss_fn=loss_fn, steps=args.steps, config=StepConfig(autocast=args.autocast))
    except (ValueError, TypeError, RuntimeError, ImportError) as exc:
        return _err("profile", exc)
    if args.json:
        d = prof.to_dict() if hasattr(prof, "to_dict") else dict(vars(prof))
        print(json.dumps({"model": args.model, "batch": args.batch, **d}, indent=1, default=str))
    else:
        console = _console()
        table = prof.table(top=args.top) if hasattr(prof, "table") else str(prof)
        console.print(table)
    return 0


# --------------------------------------------------------------------------- plan


def _add_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="choose per-module activation bits/recompute and optimizer settings to fit a memory budget",
        description=(
            "Plan a training step that fits --budget: per module keep, compress (8/4/2 bits) or "
            "recompute activations; optimizer state at 32/8/4 bits; optimizer inside backward. "
            "Minimizes the predicted step-time overhead plus a fidelity cost. Runs a short real "
            "profile (seconds) and a few estimates on fake tensors."
        ),
    )
    _add_model_args(p, budget=True)
    p.add_argument("--weights", default=None, metavar="FORMATS",
                   help="frozen-weight formats the plan may use, comma-separated among int8, nf4, int4, or none "
                   "(default int8,nf4; only for models with frozen weights, e.g. with --lora)")
    p.add_argument("--clip-grad-norm", type=float, default=None, help="clip the global gradient norm to this")
    p.add_argument("--no-optimizer-in-backward", action="store_true", help="never step inside backward")
    p.add_argument("--save", default=None, metavar="JSON", help="write the plan (Plan.from_json reads it)")
    p.add_argument("--plot", default=None, metavar="PNG", help="stacked bars of the peak: plain vs planned")
    p.add_argument("--verbose", action="store_true", help="show the search rounds")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    from pathlib import Path

    from .plan import BudgetTooSmall, plan

    try:
        widths = None
        if args.state_bits:
            widths = _parse_widths(args.state_bits)
        weight_formats = _parse_weight_formats(args.weights)
        model, batch, loss_fn = _load(args)
        result = plan(
            model, batch, args.budget, args.optimizer, loss_fn, state_bits=widths,
            optimizer_in_backward=False if args.no_optimizer_in_backward else None,
            grad_accumulation=args.accumulation, clip_grad_norm=args.clip_grad_norm,
            weight_formats=weight_formats, autocast=args.autocast, verbose=args.verbose and not args.json,
        )
    except BudgetTooSmall as exc:
        if args.json:
            import json

            hint = {"hint": "--loss chunked"} if "causal_lm_loss" in str(exc) else {}
            print(json.dumps({"error": "BudgetTooSmall", "message": str(exc), "budget_bytes": exc.budget_bytes,
                              "min_peak_bytes": exc.min_peak_bytes, "dominant": exc.dominant, **hint}, indent=1))
        else:
            hint = " (on the command line: --loss chunked)" if "causal_lm_loss" in str(exc) else ""
            print(f"memfit plan: {exc}{hint}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, RuntimeError, ImportError) as exc:
        return _err("plan", exc)
    if args.json:
        print(result.to_json())
    else:
        _console().print(result.table())
    if args.save:
        Path(args.save).write_text(result.to_json())
        if not args.json:
            print(f"wrote {args.save}")
    if args.plot:
        path = save_memory_plot(
            args.plot,
            [("plain PyTorch", result.plain_breakdown), ("memfit plan", result.predicted_breakdown)],
            budget=result.budget_bytes,
            title=f"{args.model} {args.batch or ''}: estimated peak, plain vs plan",
        )
        if not args.json:
            print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- entry point

_COMMANDS: Sequence[Callable] = (_add_demo, _add_estimate, _add_profile, _add_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memfit",
        description="Train bigger PyTorch models in the memory you have.",
    )
    parser.add_argument("--version", action="version", version=f"memfit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``memfit`` command line with ``argv`` (default ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
