"""What memfit's optimizers share: the per-parameter choice between fp32 and quantized
state, the quantized step (on the backend :mod:`memfit._backends` chooses for the
parameter's device), checkpoints and conversion to and from torch's own state format."""

from __future__ import annotations

import copy
from collections import defaultdict
from itertools import chain
from typing import Any, Iterable

import torch

from . import _qstate as Q
from .._backends import backend
from .._validate import check_bits, check_int
from . import bf16 as B

_KEEP_ATTR = "_memfit_keep_fp32"
MEMFIT_GROUP_KEYS = ("state_bits", "block_size", "min_quantized_numel", *B.GROUP_KEYS)
STATE_BITS = (32, 8, 4)


def keep_fp32(*objs: Any):
    """Mark parameters (tensors, or every parameter of the modules given) so that
    memfit's optimizers keep their state in fp32 whatever the group's ``state_bits``
    (embeddings, norms, heads you do not want quantized). Returns its argument when
    given one, so ``keep_fp32(model.lm_head.weight)`` can be used inline."""
    for obj in objs:
        params = obj.parameters() if isinstance(obj, torch.nn.Module) else [obj]
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"keep_fp32 expects tensors or modules, got {type(p).__name__}")
            setattr(p, _KEEP_ATTR, True)
    return objs[0] if len(objs) == 1 else objs


def is_kept_fp32(p: torch.Tensor) -> bool:
    return bool(getattr(p, _KEEP_ATTR, False))


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - builds without distributed
        return False
    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def like_param(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (shaped like ``p``'s local part) as a tensor placed like ``p``: a DTensor
    with ``p``'s mesh and placements when ``p`` is one."""
    if _is_dtensor(p):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return local.to(p.device)


def global_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter: a DTensor's (FSDP2 shard's) global size, so the
    fp32-or-quantized decision never depends on how the parameter is sharded."""
    return int(p.numel())  # DTensor.numel() is the global one


def _shard_grid(p: torch.Tensor) -> tuple[list, int, int, int]:
    """For a DTensor parameter: (placements for its quantized state arrays, the number
    of distinct shards, this rank's shard index, an upper bound on any rank's local
    element count). Each mesh dimension that shards ``p`` shards the state arrays along
    dim 0 (``Shard(0)``, in mesh-dimension order); each that replicates ``p`` replicates
    them. Computed from shapes alone, so every rank gets the same answer without
    communicating."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    mesh = p.device_mesh
    coord = mesh.get_coordinate()
    sizes = list(p.shape)
    placements, n_shards, index = [], 1, 0
    for mdim, pl in enumerate(p.placements):
        if isinstance(pl, Replicate):
            placements.append(Replicate())
            continue
        if isinstance(pl, Partial) or not hasattr(pl, "dim"):
            raise ValueError(f"memfit.optim: cannot checkpoint a parameter placed as {pl!r}")
        k = mesh.size(mdim)
        sizes[pl.dim] = -(-sizes[pl.dim] // k)  # torch.chunk: no shard is longer than ceil(n / k)
        placements.append(Shard(0))
        index = index * k + (coord[mdim] if coord is not None else 0)
        n_shards *= k
    nmax = 1
    for s in sizes:
        nmax *= s
    return placements, n_shards, index, nmax


def _to_sharded_entry(entry: dict, p: torch.Tensor, names: tuple[str, ...]) -> dict:
    """A quantized entry of DTensor ``p`` in the form ``state_dict()`` gives for it, which
    ``torch.distributed.checkpoint`` can save and load: each rank's codes and absmax,
    zero-padded to the length of the largest shard's, become one DTensor on ``p``'s mesh,
    ``Shard(0)`` over the shard index (a plain tensor would be saved by one rank only);
    the side table, whose length differs per rank, goes under a per-shard key
    ``nf_table_<index>`` as lists of ints (fp32 values as their int32 bit patterns)."""
    from torch.distributed.tensor import DTensor

    placements, n_shards, index, nmax = _shard_grid(p)
    bits, block = int(entry["qbits"]), int(entry["block"])
    nb = Q.n_blocks(nmax, block)
    ncodes = nb * block * bits // 8
    out = {k: entry[k] for k in ("step", "qbits", "block", "maps", "shape")}
    out["shards"] = n_shards
    mesh = p.device_mesh

    def dt(local: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
        if local.numel() > length:
            raise RuntimeError(f"memfit.optim: local state ({local.numel()}) longer than the largest shard's ({length})")
        padded = torch.zeros(length, dtype=dtype, device=local.device)
        padded[: local.numel()] = local
        return DTensor.from_local(padded, mesh, placements, run_check=False, shape=(n_shards * length,), stride=(1,))

    for name in names:
        out[f"{name}_codes"] = dt(entry[f"{name}_codes"], ncodes, torch.uint8)
        out[f"{name}_absmax"] = dt(entry[f"{name}_absmax"], nb, torch.float32)
    table = {"nf_idx": entry["nf_idx"].cpu().tolist()}
    for name in names:
        table[f"{name}_nf"] = entry[f"{name}_nf"].cpu().to(torch.float32).view(torch.int32).tolist()
    out[f"nf_table_{index}"] = table
    return out


def _from_sharded_entry(entry: dict, p: torch.Tensor, names: tuple[str, ...], what: str) -> dict:
    """The inverse of :func:`_to_sharded_entry` on this rank: the local entry. The
    parameter must be sharded as when the state was saved (same mesh shape and
    placements): quantized blocks follow the shards, so they cannot be resharded."""
    if not _is_dtensor(p):
        raise ValueError(f"{what}: state saved from a sharded (DTensor) parameter; the parameter is not one")
    try:
        bits, block, shards = int(entry["qbits"]), int(entry["block"]), int(entry["shards"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{what}: malformed sharded quantized state ({exc!r})") from None
    if list(entry.get("shape", ())) != list(p.shape):
        raise ValueError(
            f"{what}: saved state is for shape {tuple(entry.get('shape', ()))}, the parameter has shape "
            f"{tuple(p.shape)}; is this the same model?"
        )
    _, n_shards, index, nmax = _shard_grid(p)
    if shards != n_shards:
        raise ValueError(
            f"{what}: state saved over {shards} shards, the parameter has {n_shards}; quantized state can only be "
            "loaded with the sharding it was saved with (export fp32 state with to_torch_state_dict() to reshard)"
        )
    if block <= 0 or bits not in (8, 4):
        raise ValueError(f"{what}: malformed sharded quantized state (bits={bits}, block={block})")
    table = entry.get(f"nf_table_{index}")
    if not isinstance(table, dict):
        raise ValueError(
            f"{what}: no side table 'nf_table_{index}' for this rank's shard; sharded quantized state must be "
            "saved by every rank (dcp.save of the sharded state dict, not a full_state_dict)"
        )
    nb_max = Q.n_blocks(nmax, block)
    lp = _local(p)
    nb = Q.n_blocks(lp.numel(), block)

    def mine(key: str, length: int, keep: int) -> torch.Tensor:
        t = entry.get(key)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: {key} missing")
        t = _local(t).reshape(-1)
        if t.numel() != length:
            raise ValueError(f"{what}: {key} has {t.numel()} local elements, expected {length}")
        return t[:keep]

    out = {k: entry[k] for k in ("step", "qbits", "block", "maps", "shape") if k in entry}
    out["numel"] = lp.numel()
    for name in names:
        out[f"{name}_codes"] = mine(f"{name}_codes", nb_max * block * bits // 8, nb * block * bits // 8)
        out[f"{name}_absmax"] = mine(f"{name}_absmax", nb_max, nb)
    try:
        out["nf_idx"] = torch.tensor(table["nf_idx"], dtype=torch.int64).reshape(-1)
        for name in names:
            out[f"{name}_nf"] = torch.tensor(table[f"{name}_nf"], dtype=torch.int32).reshape(-1).view(torch.float32)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{what}: malformed side table ({exc!r})") from None
    return out


def _as_step_tensor(step: Any) -> torch.Tensor:
    if isinstance(step, torch.Tensor):
        return step.detach().to(device="cpu", dtype=torch.float32).reshape(()).clone()
    return torch.tensor(float(step), dtype=torch.float32)


class QuantizedOptimizer(torch.optim.Optimizer):
    """Base class. Subclasses set ``_ALGO`` and ``_STATE_NAMES`` and implement
    ``_maps``, ``_check_hparams``, ``_hparams``, ``_fp32_step``, ``_has_state`` and
    ``_torch_group``."""

    _ALGO: int
    _STATE_NAMES: tuple[str, ...]
    _SPARSE_MSG: str
    _SPARSE_OK_FP32 = False  # True: sparse gradients allowed where the state is fp32

    # ---------------------------------------------------------------- construction

    def add_param_group(self, param_group: dict) -> None:
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _check_group(self, group: dict) -> None:
        """Raise TypeError/ValueError, naming the option, unless ``group``'s options (the
        defaults filled in) are valid: memfit's here, the algorithm's in ``_check_hparams``."""
        check_bits(group.get("state_bits"), STATE_BITS, name="state_bits")
        block = group.get("block_size")
        if block is not None:
            check_int(block, name="block_size", minimum=2)
            if block % 2 or block > Q.MAX_BLOCK:
                raise ValueError(f"block_size must be None or an even int in [2, {Q.MAX_BLOCK}], got {block!r}")
        check_int(group.get("min_quantized_numel"), name="min_quantized_numel", minimum=0)
        mode = B.check_mode(group.get("bf16", "nearest"))
        check_int(group.get("bf16_seed", 0), name="bf16_seed", minimum=0)
        params = group.get("params", ())
        if isinstance(params, (torch.Tensor, list, tuple)):  # a generator is checked at the step (not consumed here)
            B.check_params(mode, [params] if isinstance(params, torch.Tensor) else params)
        self._check_hparams(group)

    # ---------------------------------------------------------------- subclass API

    def _maps(self, bits: int) -> tuple[str, ...]:
        raise NotImplementedError

    def _check_hparams(self, group: dict) -> None:
        raise NotImplementedError

    def _has_state(self, group: dict) -> bool:
        return True

    def _hparams(self, group: dict, step: float) -> list[float]:
        raise NotImplementedError

    def _fp32_step(
        self, group: dict, params: list[torch.Tensor], targets: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> None:
        """One step of fp32-state ``params`` (the keys of ``self.state``) with torch's
        own code: the update goes into ``targets`` (each the parameter itself, or the
        fp32 tensor :mod:`memfit.optim.bf16` writes back from), with ``grads`` of the
        targets' dtype; fresh state is made like the target."""
        raise NotImplementedError

    def _fp32_entry(
        self, p: torch.Tensor, values: list[torch.Tensor] | None, step: float, dtype: torch.dtype | None = None
    ) -> dict:
        """A state entry in torch's own format (``values`` None: fresh zeros), its
        tensors of ``dtype`` (default: the parameter's)."""
        raise NotImplementedError

    def _torch_group(self, group: dict) -> dict:
        raise NotImplementedError

    # ---------------------------------------------------------------- layout

    def layout_for(self, p: torch.Tensor, group: dict) -> Q.Layout | None:
        """How ``p``'s state is kept under ``group``: None for fp32, else a Layout."""
        bits = group["state_bits"]
        if (
            bits == 32
            or not self._has_state(group)
            or not p.is_floating_point()  # complex params keep fp32 state
            or is_kept_fp32(p)
            or global_numel(p) < group["min_quantized_numel"]
        ):
            return None
        block = group["block_size"] or Q.DEFAULT_BLOCK[bits]
        return Q.Layout(bits, block, self._maps(bits))

    def _entry_values(self, entry: dict, p: torch.Tensor) -> tuple[list[torch.Tensor] | None, float]:
        """(flat fp32 state values or None when the entry holds no state, step)."""
        step = float(entry["step"]) if "step" in entry else 0.0
        if "qbits" in entry:
            return Q.dequantize(entry, self._STATE_NAMES), step
        vals = [entry.get(name) for name in self._STATE_NAMES]
        if any(v is None for v in vals):
            return None, step
        return [_local(v).detach().reshape(-1) for v in vals], step

    def _convert(self, entry: dict, p: torch.Tensor, layout: Q.Layout | None, dtype: torch.dtype | None = None) -> dict:
        """``entry`` (any supported format, already validated) in ``layout``'s format;
        fp32-format state of ``dtype`` (default: the parameter's). A bf16 master is
        kept."""
        if layout is not None and layout.matches(entry):
            return entry
        if layout is None and "qbits" not in entry and not self._fp32_dtype_differs(entry, dtype):
            return entry
        out = self._convert_state(entry, p, layout, dtype)
        if B.MASTER_KEY in entry:
            out[B.MASTER_KEY] = entry[B.MASTER_KEY]
        return out

    def _fp32_dtype_differs(self, entry: dict, dtype: torch.dtype | None) -> bool:
        return dtype is not None and any(
            isinstance(entry.get(name), torch.Tensor) and entry[name].dtype != dtype for name in self._STATE_NAMES
        )

    def _convert_state(self, entry: dict, p: torch.Tensor, layout: Q.Layout | None, dtype: torch.dtype | None) -> dict:
        values, step = self._entry_values(entry, p)
        if layout is None:
            return self._fp32_entry(p, values, step, dtype)
        lp = _local(p)
        if values is None:
            return Q.new_entry(self._STATE_NAMES, layout, lp.numel(), p.shape, step, device=lp.device)
        if any(v.is_complex() for v in values):
            raise ValueError("complex state cannot be quantized")
        vals = [v.to(device=lp.device, dtype=torch.float32) for v in values]
        out = Q.quantize(vals, self._STATE_NAMES, layout, p.shape, step)
        if self._ALGO == Q.ALGO_SGD and step == 0.0:  # torch SGD keeps no step: a buffer exists
            out["step"] = torch.tensor(1.0, dtype=torch.float32)
        return out

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._begin_rounding_step()
        for group in self.param_groups:
            fp32_params = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                layout = self.layout_for(p, group)
                if layout is not None and p.device.type == "meta":
                    raise ValueError(
                        f"{type(self).__name__}.step: a parameter of shape {tuple(p.shape)} is on the meta device; "
                        "quantized state needs real values (which elements are non-finite decides its layout). "
                        "Materialize the model first (model.to_empty(device=...)), or keep this parameter's state "
                        "in fp32 (state_bits=32 or memfit.optim.keep_fp32)"
                    )
                if p.grad.is_sparse and (layout is not None or not self._SPARSE_OK_FP32):
                    raise RuntimeError(self._SPARSE_MSG)
                state = self.state[p]
                if layout is None:
                    if "qbits" in state:  # group switched to fp32 state: dequantize
                        self.state[p] = self._convert(state, p, None, self._fp32_state_dtype(p, group))
                    fp32_params.append(p)
                    continue
                if not state:
                    lp = _local(p)
                    self.state[p] = state = Q.new_entry(self._STATE_NAMES, layout, lp.numel(), p.shape, device=lp.device)
                elif not layout.matches(state):
                    self.state[p] = state = self._convert(state, p, layout)
                self._quantized_step(p, state, group)
            if fp32_params:
                self._fp32_group_step(group, fp32_params)
        return loss

    def _fp32_group_step(self, group: dict, params: list[torch.Tensor]) -> None:
        targets, grads, written = [], [], []
        for p in params:
            state = self.state[p]
            target = self._bf16_target(p, state, group)
            if self._fp32_dtype_differs(state, self._fp32_state_dtype(p, group)):  # the group's bf16 mode changed
                self.state[p] = state = self._convert(state, p, None, self._fp32_state_dtype(p, group))
            if target is None:
                targets.append(p)
                grads.append(p.grad)
            else:
                targets.append(target)
                grads.append(p.grad.to(torch.float32))
                written.append((p, target))
        self._fp32_step(group, params, targets, grads)
        for p, target in written:
            self._bf16_write_back(p, target, group)

    # ---------------------------------------------------------------- bf16 parameters (memfit.optim.bf16)

    def _fp32_state_dtype(self, p: torch.Tensor, group: dict) -> torch.dtype:
        """The dtype of ``p``'s fp32-format state: that of the tensor its update goes into."""
        return torch.float32 if B.uses_fp32_update(group["bf16"], p) else p.dtype

    def _begin_rounding_step(self) -> None:
        """Advance the counter of each group that rounds stochastically, and number the
        parameters over all groups (a parameter's number is part of its rounding seed)."""
        rounding = False
        for group in self.param_groups:
            if group.get("bf16") == "stochastic":
                group["bf16_step"] = int(group.get("bf16_step", 0)) + 1
                rounding = True
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        self._rounding_index = {id(p): i for i, p in enumerate(params)} if rounding else {}

    def _master_sync(self) -> B.MasterSync:
        sync = self.__dict__.get("_memfit_master_sync")
        if sync is None:  # also after unpickling, which restores only torch's attributes
            sync = self.__dict__["_memfit_master_sync"] = B.MasterSync()
        return sync

    def _bf16_target(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
        """The fp32 tensor (placed like ``p``) that ``p``'s update goes into when its
        group's ``bf16`` mode computes it in fp32: the master under "master" (made at
        the first step, re-made when ``p`` was changed outside the optimizer), a copy
        of ``p`` under "stochastic". None otherwise; a master left from an earlier
        "master" mode is dropped then (the parameter already holds its rounding)."""
        mode = group["bf16"]
        if mode != "master":
            state.pop(B.MASTER_KEY, None)
        if not B.uses_fp32_update(mode, p):
            return None
        B.check_params(mode, [p])
        lp = _local(p)
        if mode == "stochastic":
            return like_param(p, B.new_master(lp))
        master = state.get(B.MASTER_KEY)
        if master is None or self._master_sync().stale(lp, p):
            state[B.MASTER_KEY] = master = like_param(p, B.new_master(lp))
        return master

    def _bf16_write_back(self, p: torch.Tensor, target: torch.Tensor, group: dict) -> None:
        lp, mode, seed = _local(p), group["bf16"], 0
        if mode == "stochastic":
            shard = _shard_grid(p)[2] if _is_dtensor(p) else 0
            index = getattr(self, "_rounding_index", {}).get(id(p), 0)
            seed = B.rounding_seed(int(group["bf16_seed"]), index, int(group["bf16_step"]), shard)
        B.write_back(lp, _local(target), mode, seed)
        if mode == "master":
            self._master_sync().record(lp, p)

    def _quantized_step(self, p: torch.Tensor, state: dict, group: dict) -> None:
        lp, lg = _local(p), _local(p.grad)
        state["step"] += 1
        hp = self._hparams(group, float(state["step"]))
        target = self._bf16_target(p, state, group)  # fp32, written back by memfit.optim.bf16
        inplace = lp.dtype == torch.float32 and lp.is_contiguous()
        if target is not None:
            p32 = _local(target).view(-1)
        else:
            p32 = lp.view(-1) if inplace else lp.detach().reshape(-1).to(torch.float32).contiguous()
        g32 = lg.reshape(-1)
        if g32.dtype != torch.float32 or not g32.is_contiguous():
            g32 = g32.to(torch.float32).contiguous()
        if g32.numel() != p32.numel():
            raise RuntimeError(f"gradient has {g32.numel()} elements, parameter {p32.numel()}")
        names = self._STATE_NAMES
        chosen = backend("optim", p32.device)
        if chosen.name != "eager":
            nb = Q.n_blocks(state["numel"], state["block"])
            redo = torch.zeros(nb, dtype=torch.uint8, device=p32.device)
            if state["nf_idx"].numel():
                redo[state["nf_idx"] // state["block"]] = 1
            codes, absmax, values, table, mids, tparams = Q.fused_args(state, names)
            chosen.kernels.step(self._ALGO, p32, g32, codes, absmax, values, table, mids, tparams, state["qbits"], state["block"], redo, hp)
            ids = torch.nonzero(redo).reshape(-1)
            if ids.numel():
                Q.eager_step(self._ALGO, p32, g32, state, names, hp, ids)
        else:
            Q.eager_step(self._ALGO, p32, g32, state, names, hp, None)
        if target is not None:
            self._bf16_write_back(p, target, group)
        elif not inplace:
            lp.copy_(p32.view(lp.shape))

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """torch's optimizer state dict, quantized entries as documented in
        :mod:`memfit.optim._qstate`; for a DTensor (FSDP2) parameter its quantized
        entry holds DTensors (see :func:`_to_sharded_entry`), so
        ``torch.distributed.checkpoint`` saves every rank's shard."""
        sd = super().state_dict()
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for key, entry in sd["state"].items():
            p = params[key] if isinstance(key, int) and 0 <= key < len(params) else None
            if p is not None and "qbits" in entry and _is_dtensor(p):
                sd["state"][key] = _to_sharded_entry(entry, p, self._STATE_NAMES)
                if B.MASTER_KEY in entry:  # a DTensor placed like p, saved as torch's fp32 states are
                    sd["state"][key][B.MASTER_KEY] = entry[B.MASTER_KEY]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a memfit state dict (exactly: a resumed run takes bit-identical steps)
        or a torch optimizer's own (its fp32 states are quantized where this optimizer
        quantizes). Refuses, with ValueError and without changing anything, a state
        dict whose groups, parameter counts or shapes differ from this optimizer's."""
        for pre_hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict (needs 'state' and 'param_groups')")
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has a different number of parameter groups ({len(saved_groups)} vs {len(groups)})"
            )
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"loaded state dict contains a parameter group that doesn't match the size of optimizer's "
                    f"group {i} ({len(sg['params'])} vs {len(g['params'])} parameters)"
                )
            if sg.get("amsgrad"):
                raise ValueError("memfit optimizers do not support amsgrad; cannot load an amsgrad state")
        id_map = dict(
            zip(chain.from_iterable(g["params"] for g in saved_groups), chain.from_iterable(g["params"] for g in groups))
        )
        new_groups = []
        for g, sg in zip(groups, saved_groups):
            ng = {k: v for k, v in g.items()}  # keeps memfit keys a torch dict lacks
            for k, v in sg.items():
                if k != "params":
                    ng[k] = copy.deepcopy(v)
            ng["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                ng["param_names"] = g["param_names"]
            new_groups.append(ng)
        for i, ng in enumerate(new_groups):  # checked as at construction
            try:
                self._check_group(ng)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"loaded state dict, parameter group {i}: {exc}") from None
        group_of = {id(p): ng for ng in new_groups for p in ng["params"]}
        new_state: dict = defaultdict(dict)
        for key, entry in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"loaded state dict has state for parameter {key!r}, which no group lists")
            p = id_map[key]
            new_state[p] = self._import_entry(entry, p, group_of[id(p)], f"parameter {key}")
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        self._master_sync().clear()  # the loaded masters are the parameters' values
        for post_hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            post_hook(self)

    def _import_entry(self, entry: dict, p: torch.Tensor, group: dict, what: str) -> dict:
        if not isinstance(entry, dict):
            raise ValueError(f"{what}: state must be a dict, got {type(entry).__name__}")
        lp = _local(p)
        master = None
        if B.MASTER_KEY in entry:
            entry = dict(entry)
            master = like_param(p, B.validate_master(_local(entry.pop(B.MASTER_KEY)), lp, what))
        if "qbits" in entry and "shards" in entry:  # saved from a DTensor parameter
            entry = _from_sharded_entry(entry, p, self._STATE_NAMES, what)
        if "qbits" in entry:
            Q.validate_entry(entry, self._STATE_NAMES, what)
            if list(entry["shape"]) != list(p.shape) or int(entry["numel"]) != lp.numel():
                raise ValueError(
                    f"{what}: saved state is for shape {tuple(entry['shape'])} ({entry['numel']} local elements), "
                    f"the parameter has shape {tuple(p.shape)} ({lp.numel()}); is this the same model?"
                )
            entry = {
                k: (v.detach().to(lp.device, copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                for k, v in entry.items()
            }
            entry["step"] = _as_step_tensor(entry.get("step", 0.0))
            for name in self._STATE_NAMES:
                entry[f"{name}_absmax"] = entry[f"{name}_absmax"].to(torch.float32).contiguous()
                entry[f"{name}_nf"] = entry[f"{name}_nf"].to(torch.float32).contiguous()
                entry[f"{name}_codes"] = entry[f"{name}_codes"].contiguous()
            entry["nf_idx"] = entry["nf_idx"].to(torch.int64).contiguous()
        else:
            for name in self._STATE_NAMES:
                v = entry.get(name)
                if v is None:
                    continue
                if not isinstance(v, torch.Tensor):
                    raise ValueError(f"{what}: state {name!r} must be a tensor, got {type(v).__name__}")
                if tuple(_local(v).shape) != tuple(lp.shape):
                    raise ValueError(
                        f"{what}: saved {name!r} has shape {tuple(v.shape)}, the parameter has shape "
                        f"{tuple(lp.shape)}; is this the same model?"
                    )
            if "max_exp_avg_sq" in entry:
                raise ValueError(f"{what}: amsgrad state (max_exp_avg_sq) is not supported")
            values, step = self._entry_values(entry, p)
            dtype = self._fp32_state_dtype(p, group)
            entry = self._fp32_entry(p, values, step, dtype) if values is not None or "step" in entry else {}
        layout = self.layout_for(p, group)
        if entry:
            entry = self._convert(entry, p, layout, self._fp32_state_dtype(p, group))
        if master is not None:
            entry[B.MASTER_KEY] = master
        return entry

    def to_torch_state_dict(self) -> dict:
        """This optimizer's state as the matching torch optimizer's (``torch.optim.AdamW``
        for AdamW, ``torch.optim.SGD`` for SGD): quantized states dequantized to fp32
        tensors of the parameter's shape and dtype, memfit-only group keys and bf16
        masters dropped (torch keeps none). Lion (no torch counterpart) gets the same
        fp32 ``exp_avg`` format."""
        sd = super().state_dict()  # local quantized entries, also for DTensor parameters
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        state = {}
        for key, entry in sd["state"].items():
            p = params[key]
            values, step = self._entry_values(entry, p)
            state[key] = self._fp32_entry(p, values, step)
        groups = [self._torch_group(g) for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def state_nbytes(self) -> int:
        """Bytes held by optimizer state tensors (codes, absmax, side tables, fp32 states, steps)."""
        total = 0
        for entry in self.state.values():
            for v in entry.values():
                if isinstance(v, torch.Tensor):
                    total += _local(v).numel() * _local(v).element_size()
        return total

    def quantized_params(self) -> Iterable[torch.Tensor]:
        """The parameters whose state is (or will be, at their first step) quantized."""
        for g in self.param_groups:
            for p in g["params"]:
                if self.layout_for(p, g) is not None:
                    yield p

