"""Which format each module's saved tensors get: one setting, or glob rules by module name.

A policy maps module-name globs to settings; keys ``"op:<kind>"`` instead override the
op table (:mod:`memfit.activations.ops`) for one op kind. A module's setting may also
say where its saved tensors live: ``"offload"`` / ``"offload:<bits>"`` (see
:mod:`memfit.activations.offload`), a per-module choice that op keys and ``head_bits``
cannot make.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Mapping, Union

import torch

from ..codec import BitMaskFormat, FP8Format, Format, IntFormat, RawFormat
from .offload import split_offload
from .ops import OP_PREFIX, check_kind

# What a user may write for a setting: 8, 4, 2, "fp8", None (keep as is), a codec format,
# or "offload" / "offload:<bits>" where a module's setting is asked for.
Setting = Union[int, str, None, IntFormat, FP8Format, RawFormat]

KNOWN_SETTINGS = "8, 4, 2, 'fp8', None, 'offload' or 'offload:<8|4|2|fp8>'"

MASK = BitMaskFormat()
RAW = RawFormat()


def resolve_setting(value: Setting, *, block_size: int, rounding: str, where: str,
                    offload_ok: bool = False) -> Format:
    """Turn a user setting into a codec format; ``where`` names the entry in errors. An
    offload setting gives the format of what is offloaded, where ``offload_ok`` (a
    module's setting), else ``ValueError``."""
    try:
        inner, offloaded = split_offload(value)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if offloaded:
        if not offload_ok:
            raise ValueError(
                f"{where}: {value!r}: offload is a module's setting (bits, or a module rule of policy); "
                "op keys and head_bits take 8, 4, 2, 'fp8' or None"
            )
        value = inner
    if value is None:
        return RAW
    if isinstance(value, (IntFormat, FP8Format, RawFormat)):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{where}: invalid bits {value!r}; use {KNOWN_SETTINGS}")
    if isinstance(value, int) and value in (8, 4, 2):
        return IntFormat(bits=value, block_size=block_size, rounding=rounding)
    if isinstance(value, str) and value.lower() == "fp8":
        return FP8Format(block_size=block_size)
    raise ValueError(f"{where}: invalid bits {value!r}; use {KNOWN_SETTINGS}")


def split_policy(
    policy: Mapping[str, Setting] | None, *, block_size: int, rounding: str
) -> tuple[dict[str, Setting], dict[str, Format]]:
    """Check ``policy`` and split it into module rules ``{glob: setting}`` and op-kind
    overrides ``{kind: format}`` (from its ``"op:<kind>"`` keys)."""
    if policy is None:
        return {}, {}
    if not isinstance(policy, Mapping):
        raise ValueError(
            f"policy must be a mapping {{module glob or 'op:<kind>': setting}}, "
            f"e.g. {{'*.attn': 8, 'op:sdpa': None}}; got a {type(policy).__name__}"
        )
    rules: dict[str, Setting] = {}
    ops: dict[str, Format] = {}
    for key, value in policy.items():
        if not isinstance(key, str):
            raise ValueError(f"policy key {key!r} must be a module-name glob string or 'op:<kind>'")
        if key.startswith(OP_PREFIX):
            kind = key[len(OP_PREFIX):]
            check_kind(kind, f"policy[{key!r}]")
            ops[kind] = resolve_setting(value, block_size=block_size, rounding=rounding, where=f"policy[{key!r}]")
        else:
            rules[key] = value
    return rules, ops


def module_formats(
    model: torch.nn.Module | None,
    default: Format,
    rules: Mapping[str, Setting] | None,
    *,
    block_size: int,
    rounding: str,
    strict: bool,
) -> tuple[dict[str, Format], set[str]]:
    """Map every qualified module name of ``model`` to its format.

    A module takes the first rule (in the mapping's order) whose glob matches its own
    name; a module no rule names inherits its parent's format; the root inherits
    ``default``. ``fnmatch`` globs are used, so ``*`` also matches dots. A glob that
    matches no module raises ``ValueError`` with ``strict``, else warns once.

    Also returns the names whose format a rule set (directly or by inheritance), so
    callers can tell an explicit choice from the default.
    """
    compiled: list[tuple[str, Format]] = []
    for pattern, value in (rules or {}).items():
        if not isinstance(pattern, str):
            raise ValueError(f"policy key {pattern!r} must be a module-name glob string")
        compiled.append(
            (pattern, resolve_setting(value, block_size=block_size, rounding=rounding, where=f"policy[{pattern!r}]",
                                      offload_ok=True))
        )
    if model is None:
        if compiled:
            raise ValueError("a per-module policy needs the model: memfit.activations(model, policy=...)")
        return {"": default}, set()
    formats: dict[str, Format] = {}
    ruled: set[str] = set()
    used = set()
    for name, _ in model.named_modules():
        parent = name.rpartition(".")[0] if name else None
        fmt = formats.get(parent, default) if parent is not None else default
        matched = [(p, f) for p, f in compiled if fnmatch.fnmatchcase(name, p)]
        used.update(p for p, _ in matched)
        formats[name] = matched[0][1] if matched else fmt
        if matched or parent in ruled:
            ruled.add(name)
    unused = [p for p, _ in compiled if p not in used]
    if unused and strict:
        raise ValueError(f"policy entry {unused[0]!r} matches no module of {type(model).__name__} (strict=True)")
    if unused:
        warnings.warn(
            f"memfit.activations: policy entries {unused} match no module of {type(model).__name__}; "
            "they have no effect (pass strict=True to make this an error)",
            UserWarning,
            stacklevel=4,
        )
    return formats, ruled


def offloaded_modules(model: torch.nn.Module | None, default: Setting,
                      rules: Mapping[str, Setting] | None) -> set[str]:
    """The qualified names of the modules whose saved tensors are offloaded, by the
    same inheritance as :func:`module_formats` (first matching rule, else the parent's,
    the root taking ``default``); ``{""}`` or empty without a model."""
    offloads = [(p, split_offload(v)[1]) for p, v in (rules or {}).items()]
    if model is None:
        return {""} if split_offload(default)[1] else set()
    result: dict[str, bool] = {}
    for name, _ in model.named_modules():
        parent = name.rpartition(".")[0] if name else None
        inherited = result[parent] if parent is not None else split_offload(default)[1]
        matched = [o for p, o in offloads if fnmatch.fnmatchcase(name, p)]
        result[name] = matched[0] if matched else inherited
    return {name for name, on in result.items() if on}


def main_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The model's repeated blocks: the ``nn.ModuleList`` of two or more modules that
    holds the most parameters (``transformer.h`` in GPT-2, ``encoder.layer`` in BERT,
    ``encoder.stages`` in HF ResNet), with its qualified name; None if there is none."""
    best, best_params = None, -1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 2:
            n = sum(p.numel() for p in module.parameters())
            if n > best_params:
                best, best_params = (name, module), n
    return best
