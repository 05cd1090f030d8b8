"""``estimate``: the peak memory of a training step, without computing or allocating.

How: the model's parameters and buffers are swapped, for the duration of the call,
for FakeTensors (shapes and dtypes, no data: ``torch._subclasses.FakeTensorMode``),
and so is the batch. Two whole training steps (forward, backward, optimizer step,
``zero_grad``) then run on them under ``MemTracker``, with the real optimizer code,
memfit's real activation engine (its codec gives fake tensors correctly sized empty
encodings) and the real checkpoint wrappers; the peak of the second step is reported
(the optimizer state exists by then). Nothing real is allocated for parameters,
gradients, activations or optimizer state, so a model built on the ``meta`` device
works too (it is estimated as a CPU model).

memfit's compressed optimizers cannot step fake tensors (the fused C++ step needs
data; the eager one indexes with data-dependent masks). Under fake tensors each
quantized parameter's step allocates, at once, the scratch memory the real step needs
for it, measured once per process on small real tensors with the same optimizer,
options, dtype and kernels (fused C++ or eager, whichever runs here) and scaled to the
parameter's size (it is linear in it). State is created by the real code.

What "peak" means: the highest total of live tensor storages (MemTracker's view), the
same quantity :func:`~memfit.plan.measure_peak` measures on real tensors; not the
process RSS (no allocator caching or fragmentation, no interpreter or library memory;
on CUDA, MemTracker rounds each storage up to 512 bytes).

Known differences from a real run:

* HF transformers builds an explicit attention mask when it cannot look at the data
  (under fake tensors), where a real run may skip it (SDPA's ``is_causal``): with
  checkpointed blocks, which then keep the mask, the estimate is a little high (a
  few hundred KB on GPT-2-small, 0.02%).

When the step cannot run on fake tensors (Python code that depends on tensor values:
``.item()``, ``nonzero``, boolean mask indexing; or a fake kernel stricter than the
real one, such as ``aten._grouped_mm`` in MoE models), ``estimate`` measures the step
on real tensors instead, as :func:`~memfit.plan.measure_peak` does, says so in
``Estimate.method`` (``"measured"``) and warns, naming the cause. A model on the
``meta`` device cannot be measured: RuntimeError naming the cause.

Frozen parameters (``requires_grad=False``: a peft adapter's base, fixed position
tables) count as parameters, with no gradient and no optimizer state.
"""

from __future__ import annotations

import contextlib
import logging
import types
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Mapping, Sequence

import torch

from .._units import MB
from ..step import (
    Loss,
    StepConfig,
    StepInputError,
    as_config,
    inner_optimizers,
    main_device,
    make_optimizer,
    preserved_state,
    resolve_loss_fn,
    tensors_in,
    tracked_steps,
)
from .reserved import AllocationTrace



@dataclass
class Estimate:
    """The memory of one training step (the last of the steps run), in bytes.

    Attributes:
        method: how the step was seen: ``"fake"`` (fake tensors, nothing run or
            allocated) or ``"measured"`` (fake tensors could not run the step, so one
            real step was measured; ``fake_error`` says why).
        fake_error: why fake tensors could not run the step (``""`` when they could).
        param_bytes: parameters (each storage once: tied weights count once; frozen
            ones included).
        buffer_bytes: buffers (BatchNorm statistics, position ids, ...).
        input_bytes: the batch's tensors.
        grad_bytes: the most gradient bytes alive at once: all of them normally; with
            optimizer-in-backward, where each gradient is freed as soon as its
            parameter is updated, the largest parameter's gradient.
        optimizer_bytes: optimizer state after the step.
        activation_bytes: what the step's forward left alive for backward (the live
            bytes it added: saved tensors after compression, checkpointed blocks'
            inputs, the loss).
        activations_by_module: bytes held for backward per innermost module (memfit's
            stored bytes under a policy, else what autograd saved), as seen by
            saved-tensor hooks: tensors saved inside checkpointed modules are not seen.
        peak_bytes: the step's peak of live tensor bytes.
        peak_phase: ``"forward"``, ``"backward"`` or ``"optimizer"``: when it happened
            (optimizer-in-backward steps happen in ``"backward"``).
        peak_breakdown: what was alive at the peak: ``params``, ``buffers``,
            ``inputs``, ``grads``, ``optimizer`` (state), ``activations`` (made in
            forward), ``temporaries`` (made in backward or in the optimizer step, state
            excluded). Sums to ``peak_bytes``.
        phase_peaks: the highest live bytes within each phase.
        host_bytes: activations offloaded to host memory (``"offload"`` policies),
            held in pinned host memory for backward; not in ``peak_bytes``, which is
            the device's. 0 on a CPU model (offload keeps its tensors where they are).
        reserved_bytes: what PyTorch's CUDA caching allocator would reserve for the
            step's allocations, in their order (:mod:`memfit.plan.reserved`: block
            rounding, 2 MB small segments, 20 MB segments for 1-10 MB requests); on
            CUDA this, not ``peak_bytes``, decides an out-of-memory error. Computed
            for any device, from the fake step's allocations; 0 when measured.
        config: the :class:`~memfit.plan.StepConfig` as a dict.
    """

    method: str = "fake"
    fake_error: str = ""
    param_bytes: int = 0
    buffer_bytes: int = 0
    input_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0
    activations_by_module: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0
    peak_phase: str = "forward"
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0
    reserved_bytes: int = 0
    config: dict = field(default_factory=dict)

    kind = "estimated"

    # -- (de)serialization --------------------------------------------------------

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Estimate":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # -- display ----------------------------------------------------------------------

    def method_label(self) -> str:
        if self.method == "measured":
            return "real tensors, measured" + (f" (fake tensors failed: {self.fake_error})" if self.fake_error else "")
        if self.method == "fake":
            return "fake tensors (nothing run)"
        return self.method

    def rows(self) -> list[tuple[str, str]]:
        bd = self.peak_breakdown
        out = [
            ("method", self.method_label()),
            ("peak", f"{self.peak_bytes / MB:,.1f} MB  (in {self.peak_phase})"),
            ("  params at peak", f"{bd.get('params', 0) / MB:,.1f} MB"),
            ("  buffers + inputs at peak", f"{(bd.get('buffers', 0) + bd.get('inputs', 0)) / MB:,.1f} MB"),
            ("  grads at peak", f"{bd.get('grads', 0) / MB:,.1f} MB"),
            ("  optimizer state at peak", f"{bd.get('optimizer', 0) / MB:,.1f} MB"),
            ("  activations at peak", f"{bd.get('activations', 0) / MB:,.1f} MB"),
            ("  temporaries at peak", f"{bd.get('temporaries', 0) / MB:,.1f} MB"),
            ("parameters", f"{self.param_bytes / MB:,.1f} MB"),
            ("gradients (max alive)", f"{self.grad_bytes / MB:,.1f} MB"),
            ("optimizer state", f"{self.optimizer_bytes / MB:,.1f} MB"),
            ("kept for backward", f"{self.activation_bytes / MB:,.1f} MB"),
        ]
        if self.host_bytes:
            out.append(("offloaded to host", f"{self.host_bytes / MB:,.1f} MB"))
        if self.reserved_bytes:
            out.append(("CUDA allocator would reserve", f"{self.reserved_bytes / MB:,.1f} MB"))
        for ph in ("forward", "backward", "optimizer"):
            if ph in self.phase_peaks:
                out.append((f"peak within {ph}", f"{self.phase_peaks[ph] / MB:,.1f} MB"))
        return out

    def table(self, top: int = 8):
        """A ``rich.table.Table``: the peak and its breakdown, then the modules that
        hold the most for backward (``top`` of them)."""
        from rich.table import Table

        label = StepConfig.from_dict(self.config).describe() if self.config else ""
        t = Table(title=f"memfit {self.kind} step memory {label}".rstrip(), title_justify="left")
        t.add_column("what")
        t.add_column("bytes", justify="right")
        for k, v in self.rows():
            t.add_row(k, v)
        mods = sorted(self.activations_by_module.items(), key=lambda kv: -kv[1])[:top]
        if mods:
            t.add_section()
            for name, b in mods:
                t.add_row(f"  held by {name or '<root>'}", f"{b / MB:,.2f} MB")
        return t

    def __str__(self) -> str:
        head = f"memfit {self.kind} step memory"
        if self.config:
            head += f" ({StepConfig.from_dict(self.config).describe()})"
        width = max(len(k) for k, _ in self.rows())
        return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in self.rows()])


# --------------------------------------------------------------------------- result assembly


def breakdown(res: dict) -> dict[str, int]:
    """MemTracker's categories at the peak, in the names :class:`Estimate` uses."""
    pk = res["peak_breakdown"]
    opt_at_peak = int(pk.get("OPT", 0))
    state = min(opt_at_peak, int(res["optimizer_bytes"]))
    out = {
        "params": int(pk.get("PARAM", 0)),
        "buffers": int(pk.get("BUFFER", 0)),
        "inputs": int(pk.get("OTH", 0)),
        "grads": int(pk.get("GRAD", 0)),
        "optimizer": state,
        "activations": int(pk.get("ACT", 0)),
        "temporaries": int(pk.get("TEMP", 0)) + opt_at_peak - state,
    }
    return out


def fill(result: Estimate, res: dict, config: StepConfig) -> Estimate:
    """Fill ``result``'s fields from :func:`~memfit.step.tracked_steps`' dict."""
    start = res["start"]
    result.param_bytes = int(start.get("PARAM", 0))
    result.buffer_bytes = int(start.get("BUFFER", 0))
    result.input_bytes = int(start.get("OTH", 0))
    result.grad_bytes = int(res["max_by_kind"].get("GRAD", 0))
    if config.optimizer_in_backward:  # MemTracker files these short-lived grads as temporaries
        result.grad_bytes = max(result.grad_bytes, int(res.get("largest_param_bytes", 0)))
    result.optimizer_bytes = int(res["optimizer_bytes"])
    result.activation_bytes = int(res["activation_bytes"])
    result.activations_by_module = {k: int(v) for k, v in res["saved_by_module"].items()}
    result.peak_bytes = int(res["peak"])
    result.peak_phase = res["peak_phase"]
    result.peak_breakdown = breakdown(res)
    result.phase_peaks = {k: int(v) for k, v in res["phase_peaks"].items()}
    result.host_bytes = int(res.get("host_bytes", 0))
    result.reserved_bytes = int(res.get("reserved_bytes", 0))
    result.config = config.to_dict()
    return result


# --------------------------------------------------------------------------- fake model


def _copy_attrs(src: torch.Tensor, dst: torch.Tensor) -> None:
    # user marks such as memfit.optim.keep_fp32's flag live in the tensor's __dict__
    for k, v in getattr(src, "__dict__", {}).items():
        if k not in dst.__dict__:
            try:
                setattr(dst, k, v)
            except Exception:  # pragma: no cover - read-only attribute
                pass


class _Faker:
    """Fake twins of real or meta tensors, memoized (tied weights stay tied)."""

    def __init__(self, fm):
        self.fm = fm
        self.memo: dict[int, torch.Tensor] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids valid while memoized

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        f = self.memo.get(key)
        if f is not None:
            return f
        is_param = isinstance(t, torch.nn.Parameter)
        if t.is_meta:
            with self.fm:
                f = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="cpu")
            if is_param:
                f = torch.nn.Parameter(f, requires_grad=t.requires_grad)
            elif t.requires_grad:
                f.requires_grad_(True)
        else:
            f = self.fm.from_tensor(t)
        _copy_attrs(t, f)
        self.memo[key] = f
        self.keep.append(t)
        return f

    def batch(self, batch: Any) -> Any:
        from torch.utils._pytree import tree_map_only

        return tree_map_only(torch.Tensor, self, batch)


@contextlib.contextmanager
def fake_model(model: torch.nn.Module, fm) -> Iterator[_Faker]:
    """Swap ``model``'s parameters and buffers for fake twins inside the block; the
    real tensors are put back on exit (and are never read or copied)."""
    faker = _Faker(fm)
    swaps = []
    try:
        for m in model.modules():
            for d in (m._parameters, m._buffers):
                for n, t in list(d.items()):
                    if t is not None:
                        swaps.append((d, n, t))
                        d[n] = faker(t)
        yield faker
    finally:
        for d, n, t in swaps:
            d[n] = t


def _prewarm_codebooks() -> None:
    """Build memfit.optim's code books (cached) on real tensors, before fake mode: a
    cache filled under fake mode would hold fake tensors."""
    try:
        from ..codec import dynamic

        for name in getattr(dynamic, "_MAP_BUILDERS", {}):
            qmap = dynamic.get_map(name)
            _ = qmap.zero_code
    except Exception:  # pragma: no cover - codebooks moved: the fake step may still work
        pass


# Scratch memory of one quantized step, per (optimizer kind, hyperparameters, dtype,
# device): bytes = slope * elements + intercept, measured on small real tensors.
_SCRATCH: dict[tuple, tuple[float, float]] = {}


def _scratch_key(opt, group: dict, p: torch.Tensor, state_like: dict) -> tuple:
    from ..optim._kernels import fused_step

    hp = tuple(sorted((k, repr(v)) for k, v in group.items() if k not in ("params", "param_names", "initial_lr", "lr")))
    fused = p.device.type == "cpu" and fused_step() is not None
    return (type(opt), hp, p.dtype, p.device.type, fused, state_like["qbits"], state_like["block"])


def _measure_scratch(opt, group: dict, dtype: torch.dtype, device: torch.device, block: int) -> tuple[float, float]:
    """Peak bytes a quantized step allocates beyond parameter, gradient and state, on
    real tensors of 2 and 6 blocks, as (bytes per element, constant): the step's own
    code, whichever path it takes here (fused C++, or the eager one)."""
    import inspect

    from torch.distributed._tools.mem_tracker import MemTracker

    names = set(inspect.signature(type(opt).__init__).parameters) - {"self", "params"}
    kw = {k: v for k, v in group.items() if k in names}
    kw["min_quantized_numel"] = 0
    out = []
    sizes = (2 * block, 6 * block)
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        w = torch.nn.Parameter(torch.randn(n, generator=gen).to(device=device, dtype=dtype))
        o = type(opt)([w], **kw)
        w.grad = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
        o.step()  # creates the state
        w.grad = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
        mt = MemTracker()
        mt.track_external(w, w.grad, o)
        with mt:
            before = int(mt.get_tracker_snapshot("current").get(torch.device(device), {}).get("Total", 0))
            o.step()
        peak = int(mt.get_tracker_snapshot("peak").get(torch.device(device), {}).get("Total", 0))
        out.append(max(0, peak - before))
    slope = (out[1] - out[0]) / (sizes[1] - sizes[0])
    return slope, out[0] - slope * sizes[0]


def _scratch_bytes(opt, group: dict, p: torch.Tensor, state: dict) -> int:
    key = _scratch_key(opt, group, p, state)
    coef = _SCRATCH.get(key)
    if coef is None:
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():  # real tensors, outside fake mode and any tracker
            coef = _SCRATCH[key] = _measure_scratch(opt, group, p.dtype, p.device, int(state["block"]))
    n = -(-int(state["numel"]) // int(state["block"])) * int(state["block"])
    return max(0, int(round(coef[0] * n + coef[1])))


def _shape_only_quantized_step(self, p: torch.Tensor, state: dict, group: dict) -> None:
    """What ``QuantizedOptimizer._quantized_step`` allocates, without computing: the
    step counter, and at once the peak scratch memory that the real step needs for
    this parameter (measured on small real tensors with the same optimizer, options,
    dtype and kernels, and scaled to this parameter's size: it is linear in it)."""
    state["step"] += 1
    nbytes = _scratch_bytes(self, group, p, state)
    if nbytes:
        scratch = torch.empty(nbytes, dtype=torch.uint8, device=p.device)
        del scratch


def _patch_quantized(optimizer: torch.optim.Optimizer) -> bool:
    """Give memfit's quantized optimizers the shape-only step (on these instances only),
    and measure their scratch memory now, before any tracker runs. Returns whether any
    quantized optimizer is involved."""
    from ..optim import QuantizedOptimizer

    found = False
    for opt in inner_optimizers(optimizer):
        if isinstance(opt, QuantizedOptimizer):
            if not hasattr(type(opt), "_quantized_step"):
                raise RuntimeError(
                    "memfit.plan.estimate: memfit.optim's QuantizedOptimizer has no _quantized_step any more; "
                    "update _shape_only_quantized_step in memfit/plan/estimate.py"
                )
            opt._quantized_step = types.MethodType(_shape_only_quantized_step, opt)
            for group in opt.param_groups:
                for p in group["params"]:
                    layout = opt.layout_for(p, group)
                    if layout is not None:
                        _scratch_bytes(opt, group, p, {"qbits": layout.bits, "block": layout.block, "numel": 1})
            found = True
    return found


# --------------------------------------------------------------------------- public


def estimate(
    model: torch.nn.Module,
    batch: Any,
    optimizer: str = "adamw",
    state_bits: int = 32,
    policy: Any = None,
    loss_fn: Loss | None = None,
    *,
    checkpoint: Sequence[str] = (),
    optimizer_in_backward: bool = False,
    config: StepConfig | None = None,
    steps: int = 2,
    autocast: Any = None,
) -> Estimate:
    """Estimate the peak memory of one training step of ``model`` on ``batch``,
    without real computation or allocation.

    Args:
        model: any ``nn.Module`` (real weights are never read or copied; a model on
            the ``meta`` device works and is estimated as a CPU model). It is left as
            it was: parameters, grads, training modes, hooks (the step itself runs in
            training mode).
        batch: what the model eats: a dict of keyword arguments (the loss is then
            ``model(**batch).loss``) or anything ``loss_fn`` takes. Real or meta tensors.
        optimizer: ``"adamw"``, ``"sgd"`` or ``"lion"``.
        state_bits: 32 (torch's optimizer), 8 or 4 (memfit.optim).
        policy: activation compression: None, 8/4/2/``"fp8"``, or ``{glob: bits}``.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; None for ``model(**batch).loss``.
        checkpoint: qualified names of modules to recompute in backward.
        optimizer_in_backward: step each parameter from its gradient hook.
        config: a :class:`StepConfig` instead of the five step options above (which
            must then be left at their defaults).
        steps: training steps to run (the last one is reported; 2 by default, so the
            optimizer state already exists).
        autocast: run the forward under ``torch.autocast``: None, ``"bf16"`` or
            ``"fp16"`` (:attr:`StepConfig.autocast`); its casts and cached weight
            copies are counted.

    Returns:
        :class:`Estimate` (``method == "fake"``). When the step cannot run on fake
        tensors (data-dependent code, a fake kernel stricter than the real one), one
        real step is measured instead (``method == "measured"``, with a
        ``RuntimeWarning`` naming the cause); if the real step fails too, its own
        error is raised. Raises ``ValueError`` for batches the model's forward does not
        accept and losses that are not scalar tensors, and ``RuntimeError`` when fake
        tensors cannot run the step of a model on the ``meta`` device.
    """
    if config is not None and (
        optimizer != "adamw" or state_bits != 32 or policy is not None or tuple(checkpoint) or optimizer_in_backward
        or autocast is not None
    ):
        raise ValueError("pass either config=StepConfig(...) or the individual step options, not both")
    cfg = as_config(config, optimizer=optimizer, state_bits=state_bits, policy=policy,
                    checkpoint=checkpoint, optimizer_in_backward=optimizer_in_backward, autocast=autocast)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fn = resolve_loss_fn(loss_fn)
    from torch._subclasses.fake_tensor import FakeTensorMode

    _prewarm_codebooks()
    fake_error: Exception | None = None
    with preserved_state(model, values=False), quiet_fake_kernel_log():
        model.train()
        fm = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_model(model, fm) as faker:
            fbatch = faker.batch(batch)
            with fm:
                opt = make_optimizer(model, cfg)
                _patch_quantized(opt)
                trace = AllocationTrace(main_device(model).type)
                trace.add(list(model.parameters()) + list(model.buffers()) + tensors_in(fbatch))
                try:
                    res = tracked_steps(model, fbatch, cfg, fn, opt, steps=steps, device=main_device(model),
                                        observe=trace.observe)
                    res["reserved_bytes"] = trace.allocator.peak_reserved
                except StepInputError:
                    raise  # the batch or the loss is wrong: a real step would say the same
                except Exception as exc:
                    fake_error = exc
            del opt
    if fake_error is not None:
        return _measured_instead(model, batch, cfg, fn, steps, fake_error)
    return fill(Estimate(), res, cfg)


@contextlib.contextmanager
def quiet_fake_kernel_log() -> Iterator[None]:
    """Silence torch's log of a fake kernel's failure (an ERROR record with its whole
    traceback) inside the block: the estimator reports the failure itself."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")

    def drop(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _fake_cause(exc: BaseException) -> str:
    """What kept fake tensors from running the step, in one line."""
    from ..step.loss import is_fake_limitation

    first = (str(exc).strip().splitlines() or [""])[0]
    what = f"{type(exc).__name__}: {first}"
    if is_fake_limitation(exc):
        return f"the step depends on tensor values (.item(), nonzero, boolean masks): {what}"
    return what


def _has_meta(model: torch.nn.Module, batch: Any) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()) + tensors_in(batch))


def _measured_instead(model: torch.nn.Module, batch: Any, cfg: StepConfig, fn: Loss, steps: int,
                      fake_error: Exception) -> Estimate:
    """The estimate of a step fake tensors cannot run: one real step, measured."""
    cause = _fake_cause(fake_error)
    if _has_meta(model, batch):
        raise RuntimeError(
            f"memfit.plan.estimate: the step cannot run on fake tensors ({cause}), and a model or batch on "
            "the meta device cannot be measured instead; build it with real weights and measure it "
            "(memfit.plan.measure_peak)"
        ) from fake_error
    from .measure import measure_peak

    try:
        measured = measure_peak(model, batch, cfg, fn, steps)
    except Exception as exc:
        exc.add_note(f"memfit.plan.estimate: this real step was measured because fake tensors could not run "
                     f"it ({cause})")
        raise
    warnings.warn(
        f"memfit.plan.estimate: the step cannot run on fake tensors ({cause}); measured a real step "
        "instead (Estimate.method == 'measured')",
        RuntimeWarning,
        stacklevel=3,
    )
    out = Estimate.from_dict(measured.to_dict())
    out.method = "measured"
    out.fake_error = cause
    return out
