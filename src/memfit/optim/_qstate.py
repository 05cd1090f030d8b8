"""Quantized optimizer state of one parameter: its layout, creation, conversion to and
from fp32, and the eager (pure PyTorch) step, which is the reference the fused C++
step in ``csrc/step.cpp`` reproduces bit for bit.

A quantized state entry is a flat dict of tensors, ints, strings and lists, so it goes
through ``torch.save`` / ``torch.load(weights_only=True)`` as it is::

    step            fp32 0-dim tensor (as torch's optimizers keep it)
    qbits, block    int: 8 or 4 bits, elements per block
    maps            list[str]: the code book of each state (memfit.codec.dynamic names)
    shape           list[int]: the parameter's full (global, for DTensor) shape
    numel           int: elements quantized here (the local shard for DTensor)
    <name>_codes    uint8 [nblocks * block * bits / 8]
    <name>_absmax   fp32 [nblocks]
    nf_idx          int64 [k]: flat indices of elements whose state is non-finite
    <name>_nf       fp32 [k]: their exact state values (finite or not)

Elements listed in ``nf_idx`` are stored exactly in the side table and count as 0 in
their block (left out of absmax, given the zero code), so a NaN or Inf never spreads
to the rest of its block.

Each rank of an FSDP2 (DTensor) parameter quantizes its own shard. ``state_dict()``
gives such an entry in a sharded form that ``torch.distributed.checkpoint`` can save
(``_base._to_sharded_entry``)::

    step, qbits, block, maps, shape   as above
    shards          int: number of distinct shards S (ranks along the sharded mesh dims)
    <name>_codes    uint8 DTensor [S * Lc], Shard(0): rank i's codes, zero-padded to the
                    length Lc of the largest shard's, at [i * Lc, (i + 1) * Lc)
    <name>_absmax   fp32 DTensor [S * B], likewise (B blocks of the largest shard)
    nf_table_<i>    dict of lists, this rank's side table only: nf_idx, and <name>_nf
                    as the int32 bit patterns of the fp32 values

It loads back only into a parameter sharded the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec.dynamic import QuantMap, get_map, pack_nibbles, quantize_normalized, unpack_nibbles

ALGO_ADAMW, ALGO_SGD, ALGO_LION = 0, 1, 2

DEFAULT_BLOCK = {8: 256, 4: 128}
MAX_BLOCK = 4096


@dataclass(frozen=True)
class Layout:
    bits: int
    block: int
    maps: tuple[str, ...]

    def matches(self, entry: dict) -> bool:
        return (
            entry.get("qbits") == self.bits
            and entry.get("block") == self.block
            and tuple(entry.get("maps", ())) == self.maps
        )


def n_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _zero_byte(qmap: QuantMap) -> int:
    z = qmap.zero_code
    return z | (z << 4) if qmap.bits == 4 else z


def new_entry(names: tuple[str, ...], layout: Layout, numel: int, shape, step: float = 0.0, device=None) -> dict:
    """A fresh entry (all states 0) for ``numel`` elements; tensors on ``device``
    (``step`` stays a CPU tensor, as in torch's optimizers)."""
    nb = n_blocks(numel, layout.block)
    entry: dict = {
        "step": torch.tensor(float(step), dtype=torch.float32),
        "qbits": layout.bits,
        "block": layout.block,
        "maps": list(layout.maps),
        "shape": [int(s) for s in shape],
        "numel": int(numel),
    }
    for name, mname in zip(names, layout.maps):
        qmap = get_map(mname)
        entry[f"{name}_codes"] = torch.full(
            (nb * layout.block * layout.bits // 8,), _zero_byte(qmap), dtype=torch.uint8, device=device
        )
        entry[f"{name}_absmax"] = torch.zeros(nb, dtype=torch.float32, device=device)
        entry[f"{name}_nf"] = torch.zeros(0, dtype=torch.float32, device=device)
    entry["nf_idx"] = torch.zeros(0, dtype=torch.int64, device=device)
    return entry


def validate_entry(entry: dict, names: tuple[str, ...], what: str) -> None:
    """Raise ValueError unless ``entry`` is a well-formed quantized state."""
    try:
        bits, block, numel = int(entry["qbits"]), int(entry["block"]), int(entry["numel"])
        maps = list(entry["maps"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{what}: malformed quantized state ({exc!r})") from None
    if bits not in (8, 4) or block <= 0 or block % 2 or block > MAX_BLOCK or len(maps) != len(names):
        raise ValueError(f"{what}: malformed quantized state (bits={bits}, block={block}, maps={maps})")
    nb = n_blocks(numel, block)
    for name, mname in zip(names, maps):
        if get_map(mname).bits != bits:
            raise ValueError(f"{what}: map {mname!r} is not a {bits}-bit map")
        codes, absmax = entry.get(f"{name}_codes"), entry.get(f"{name}_absmax")
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or codes.numel() != nb * block * bits // 8:
            raise ValueError(f"{what}: {name}_codes missing or of the wrong size/dtype")
        if not isinstance(absmax, torch.Tensor) or absmax.numel() != nb:
            raise ValueError(f"{what}: {name}_absmax missing or of the wrong size")
        if not absmax.is_floating_point():
            raise ValueError(f"{what}: {name}_absmax must be floating point, got {absmax.dtype}")
        if absmax.device.type != "meta" and not bool((torch.isfinite(absmax) & (absmax >= 0)).all()):
            # a scale is a block's largest |state|: NaN, inf or a negative one decodes the
            # whole block wrongly (non-finite state elements live in the side table)
            raise ValueError(f"{what}: {name}_absmax holds NaN, infinite or negative scales; the state is corrupt")
        nf = entry.get(f"{name}_nf")
        if not isinstance(nf, torch.Tensor) or nf.numel() != entry["nf_idx"].numel():
            raise ValueError(f"{what}: {name}_nf missing or of the wrong size")
    idx = entry.get("nf_idx")
    if not isinstance(idx, torch.Tensor) or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel)):
        raise ValueError(f"{what}: nf_idx missing or out of range")


# --------------------------------------------------------------------------- block access


def _rows(codes: torch.Tensor, bits: int, block: int, nb: int) -> torch.Tensor:
    return codes.view(nb, block * bits // 8)


def _unpack_rows(rows: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return rows
    return unpack_nibbles(rows.reshape(-1)).view(rows.shape[0], -1)


def _pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    q = q.to(torch.uint8)
    if bits == 8:
        return q
    return pack_nibbles(q.reshape(-1)).view(q.shape[0], -1)


def dequantize(entry: dict, names: tuple[str, ...]) -> list[torch.Tensor]:
    """The fp32 values (flat, ``numel`` long) of each state, side table applied."""
    bits, block, n = entry["qbits"], entry["block"], entry["numel"]
    nb = n_blocks(n, block)
    out = []
    for name, mname in zip(names, entry["maps"]):
        qmap = get_map(mname)
        q = _unpack_rows(_rows(entry[f"{name}_codes"], bits, block, nb), bits)
        vals = qmap.values.to(q.device)
        x = (vals[q.to(torch.int64)] * entry[f"{name}_absmax"][:, None].to(torch.float32)).reshape(-1)[:n].clone()
        idx = entry["nf_idx"]
        if idx.numel():
            x[idx] = entry[f"{name}_nf"].to(torch.float32)
        out.append(x)
    return out


def quantize(values: list[torch.Tensor], names: tuple[str, ...], layout: Layout, shape, step: float) -> dict:
    """A new entry holding ``values`` (flat fp32 tensors of equal length)."""
    n = values[0].numel()
    dev = values[0].device
    entry = new_entry(names, layout, n, shape, step, device=dev)
    nb = n_blocks(n, layout.block)
    ids = torch.arange(nb, dtype=torch.int64, device=dev)
    eidx, valid = _element_index(ids, layout.block, n)
    states = []
    for v in values:
        flat = v.detach().reshape(-1).to(torch.float32)
        states.append(torch.where(valid, flat[eidx.clamp(max=max(n - 1, 0))], torch.zeros((), dtype=torch.float32, device=dev)))
    _store(entry, names, ids, eidx, valid, states)
    return entry


# --------------------------------------------------------------------------- eager step


def _element_index(ids: torch.Tensor, block: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    eidx = ids[:, None] * block + torch.arange(block, dtype=torch.int64, device=ids.device)[None, :]
    return eidx, eidx < n


def _store(entry, names, ids, eidx, valid, states) -> None:
    """Requantize the rows ``ids`` from fp32 ``states`` ([k, block] each) and rebuild
    the side table for those rows."""
    bits, block, n = entry["qbits"], entry["block"], entry["numel"]
    nb = n_blocks(n, block)
    dev = ids.device
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    bad = torch.zeros_like(valid)
    for s in states:
        bad |= ~torch.isfinite(s)
    bad &= valid
    keep = valid & ~bad
    # side table: drop old entries of these rows, add the new ones
    old_idx = entry["nf_idx"]
    in_rows = torch.zeros(nb, dtype=torch.bool, device=dev)
    in_rows[ids] = True
    stay = ~in_rows[old_idx // block] if old_idx.numel() else torch.zeros(0, dtype=torch.bool, device=dev)
    new_idx = eidx[bad]
    merged_idx = torch.cat([old_idx[stay], new_idx])
    order = torch.argsort(merged_idx)
    for name, mname, s in zip(names, entry["maps"], states):
        qmap = get_map(mname)
        x = torch.where(keep, s, zero)
        absmax = x.abs().amax(dim=1)
        one = torch.ones((), dtype=torch.float32, device=dev)
        inv = torch.where(absmax > 0, one / torch.where(absmax > 0, absmax, one), zero)
        q = quantize_normalized(x * inv[:, None], qmap)
        _rows(entry[f"{name}_codes"], bits, block, nb)[ids] = _pack_rows(q, bits)
        entry[f"{name}_absmax"][ids] = absmax
        vals = torch.cat([entry[f"{name}_nf"][stay], s[bad]])
        entry[f"{name}_nf"] = vals[order].contiguous()
    entry["nf_idx"] = merged_idx[order].contiguous()


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt (torch's CPU fp32 sqrt can be 1 ulp off; the sqrt of
    the exact double, rounded once to fp32, is the correctly rounded result)."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def _math(algo: int, P, G, S, hp):
    """The update in fp32, operation by operation as in csrc/step.cpp."""
    if algo == ALGO_ADAMW:
        decay, b1, omb1, b2, omb2, ibc2, eps, ss, gs = hp
        gi = G * gs
        pi = P * decay
        m = S[0] * b1 + gi * omb1
        v = S[1] * b2 + (gi * gi) * omb2
        den = _sqrt(v) * ibc2 + eps
        pi = pi - (m / den) * ss
        return pi, [m, v]
    if algo == ALGO_SGD:
        lr, mom, omd, wd, gs, nesterov, first = hp
        gi = G * gs
        if wd != 0.0:
            gi = gi + P * wd
        buf = gi.clone() if first else S[0] * mom + gi * omd
        d = gi + buf * mom if nesterov else buf
        return P - d * lr, [buf]
    if algo == ALGO_LION:
        decay, lr, b1, omb1, b2, omb2, gs = hp
        gi = G * gs
        pi = P * decay
        c = S[0] * b1 + gi * omb1
        pi = pi - torch.sign(c) * lr
        m = S[0] * b2 + gi * omb2
        return pi, [m]
    raise ValueError(f"unknown algorithm {algo}")


def eager_step(algo: int, p32: torch.Tensor, g32: torch.Tensor, entry: dict, names, hp, ids=None) -> None:
    """Update ``p32`` (flat fp32, in place) and ``entry`` on the blocks ``ids`` (all
    blocks if None), the side table included."""
    bits, block, n = entry["qbits"], entry["block"], entry["numel"]
    nb = n_blocks(n, block)
    dev = p32.device
    if ids is None:
        ids = torch.arange(nb, dtype=torch.int64, device=dev)
    if ids.numel() == 0 or n == 0:
        return
    eidx, valid = _element_index(ids, block, n)
    ec = eidx.clamp(max=n - 1)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    P = torch.where(valid, p32[ec], zero)
    G = torch.where(valid, g32[ec], zero)
    S = []
    nf_idx = entry["nf_idx"]
    if nf_idx.numel():
        row_of = torch.full((nb,), -1, dtype=torch.int64, device=dev)
        row_of[ids] = torch.arange(ids.numel(), dtype=torch.int64, device=dev)
        r = row_of[nf_idx // block]
        sel = r >= 0
        rr, cc = r[sel], (nf_idx % block)[sel]
    for name, mname in zip(names, entry["maps"]):
        qmap = get_map(mname)
        q = _unpack_rows(_rows(entry[f"{name}_codes"], bits, block, nb)[ids], bits)
        s = qmap.values.to(dev)[q.to(torch.int64)] * entry[f"{name}_absmax"][ids][:, None]
        if nf_idx.numel():
            s[rr, cc] = entry[f"{name}_nf"][sel]
        S.append(s)
    newP, newS = _math(algo, P, G, S, hp)
    p32[eidx[valid]] = newP[valid]
    _store(entry, names, ids, eidx, valid, [torch.where(valid, s, zero) for s in newS])


def fused_args(entry: dict, names) -> tuple[list, list, list, list, list, list]:
    codes, absmax, values, table, mids, tparams = [], [], [], [], [], []
    for name, mname in zip(names, entry["maps"]):
        qmap = get_map(mname)
        codes.append(entry[f"{name}_codes"])
        absmax.append(entry[f"{name}_absmax"])
        values.append(qmap.values)
        table.append(qmap.table)
        mids.append(qmap.midpoints)
        tparams += [qmap.mant_bits, qmap.emin, qmap.cells, qmap.zero_code]
    return codes, absmax, values, table, mids, tparams
