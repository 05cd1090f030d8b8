"""``state_dict`` and ``load_state_dict`` of a model whose frozen weights are compressed.

``model.state_dict()`` holds the decoded values under the parameters' usual keys (in
their usual order), so a checkpoint is a plain one that loads anywhere.
``model.load_state_dict(sd)`` re-encodes the values it is given into the codes (never
keeping stale ones); a missing key is reported as missing under ``strict=True``, a
wrong shape as PyTorch's own size-mismatch error.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .store import CodedWeight


def install_state_hooks(module: nn.Module, coded: dict[str, CodedWeight],
                        key_order: list[str]) -> Callable[[], None]:
    """Hooks on ``module`` for the parameters in ``coded`` (name -> store);
    ``key_order`` is the order of the module's own state-dict entries before
    compression. Returns the function that removes them."""

    def save(mod, destination, prefix, local_metadata) -> None:
        for name, store in coded.items():
            destination[prefix + name] = store.decode()
        # Put this module's own entries back in their original order (the hook runs
        # after the module has written the entries it still owns).
        own = [prefix + k for k in key_order if prefix + k in destination]
        for key in own:
            destination[key] = destination.pop(key)

    def load(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        for name, store in coded.items():
            key = prefix + name
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            try:
                store.load_(value)
            except (ValueError, TypeError) as exc:
                error_msgs.append(str(exc).replace(store.name, key, 1))

    handles = [module.register_state_dict_post_hook(save), module.register_load_state_dict_pre_hook(load)]

    def remove() -> None:
        for h in handles:
            h.remove()

    return remove
