"""Optimizer-in-backward: :class:`InBackwardOptimizer`, one optimizer per parameter
stepped from that parameter's post-accumulate-grad hook, and the summing of tied
parameters' gradients it needs (:class:`_TiedGradients`).

This module owns the hooks and the tied-gradient bookkeeping; which optimizer each
parameter gets is the caller's (``factory``), e.g. :func:`memfit.step.make_optimizer`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

__all__ = ["InBackwardOptimizer"]


class InBackwardOptimizer(torch.optim.Optimizer):
    """Optimizer-in-backward: one optimizer per parameter, stepped from that
    parameter's post-accumulate-grad hook, after which its gradient is freed.

    ``step()`` and ``zero_grad()`` do nothing (the hooks do the work) so that a
    training loop written for an ordinary optimizer runs unchanged. :meth:`attach`
    installs the hooks (``apply`` does it), :meth:`detach` removes them.
    ``param_groups`` are the per-parameter optimizers' own groups (one per parameter),
    so LR schedulers work on it as on an ordinary optimizer.
    ``state_dict()`` holds the per-parameter optimizers' state dicts, in parameter
    order. :attr:`state` is the union of their states (so tools that read
    ``optimizer.state``, such as MemTracker, see all of it).

    Given ``model``, a parameter registered on several of its modules (tied weights,
    such as a language model's embedding and output layer) steps once per backward
    pass, at its end, from the sum of all its uses' gradients, summed in place (see
    :class:`_TiedGradients`): one weight-sized tensor fewer than autograd's own
    out-of-place sum.

    With ``refuse_accumulation``, a parameter whose gradient arrives a second time
    before ``step()`` (a second backward: gradient accumulation, which stepping
    inside backward cannot do) raises ``RuntimeError`` instead of silently taking
    two optimizer steps.
    """

    def __init__(self, params, factory: Callable[[list], torch.optim.Optimizer],
                 model: torch.nn.Module | None = None, refuse_accumulation: bool = False):
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("optimizer_in_backward: the model has no parameter that requires grad")
        self.optimizers: dict[torch.Tensor, torch.optim.Optimizer] = {p: factory([p]) for p in params}
        self._handles: list = []
        self.refuse_accumulation = refuse_accumulation
        self._stepped: set[torch.Tensor] = set()
        self._tied = _TiedGradients(model, params) if model is not None else None
        super().__init__(params, {})
        # share the inner optimizers' groups, so LR schedulers and manual lr changes reach them
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
        self.defaults = dict(next(iter(self.optimizers.values())).defaults)

    @property
    def state(self):  # type: ignore[override]
        merged: dict = {}
        for opt in self.optimizers.values():
            merged.update(opt.state)
        return merged

    @state.setter
    def state(self, value) -> None:  # set by Optimizer.__init__; the real state is per parameter
        pass

    def attach(self) -> None:
        """Install the post-accumulate-grad hooks (idempotent)."""
        if self._handles:
            return
        tied = self._tied.params if self._tied is not None else {}
        for p, opt in self.optimizers.items():
            if p in tied:
                self._handles.append(p.register_post_accumulate_grad_hook(self._tied.gather_accumulated))
            else:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(opt)))
        if tied:
            steppers = {p: self._hook(self.optimizers[p]) for p in tied}
            self._handles.extend(self._tied.attach(steppers))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, opt: torch.optim.Optimizer):
        def hook(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            if self.refuse_accumulation:
                if p in self._stepped:
                    raise RuntimeError(
                        "memfit plan: this plan steps the optimizer inside backward, so gradients cannot be "
                        "accumulated over several backward passes; call optimizer.step() after each backward, "
                        "or re-plan with grad_accumulation=N (memfit.plan(..., grad_accumulation=N))"
                    )
                self._stepped.add(p)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return hook

    def step(self, closure=None):  # type: ignore[override]
        """Ends the step: the hooks already updated every parameter. A method (not an
        instance attribute) so that LR schedulers can wrap it as they wrap torch's."""
        self._stepped.clear()
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict:  # type: ignore[override]
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        parts = state_dict.get("per_parameter") if isinstance(state_dict, Mapping) else None
        if parts is None or len(parts) != len(self.optimizers):
            raise ValueError("not a state dict of this InBackwardOptimizer (per_parameter list of matching length)")
        for opt, sd in zip(self.optimizers.values(), parts):
            opt.load_state_dict(sd)

    def inner_optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.optimizers.values())


# Under a dispatch mode (the estimator's fake tensors, MemTracker) autograd sums the
# gradients of a parameter used in several places out of place, and without one only
# when it can steal a buffer: for a tied embedding / output layer that is three
# vocabulary-sized tensors alive at once at the end of backward (the output layer's
# gradient, the embedding's and their sum). Under optimizer-in-backward nothing else
# is left alive then, so those tensors set the floor of the peak. Only these backward
# nodes return a gradient that nothing else references, so it may be summed into in
# place.
_FRESH_GRAD_NODES = frozenset({"EmbeddingBackward0", "MmBackward0", "AddmmBackward0"})


class _TiedGradients:
    """Gradients of tied parameters (one tensor registered on several modules, such
    as a language model's embedding and output layer) for optimizer-in-backward,
    summed with one tensor fewer than autograd's own sum.

    After each forward of a module owning a tied parameter, the backward node of that
    use is found (searching only the nodes that forward created) and given a hook
    that takes the gradient out of autograd's path into a per-parameter sum, adding
    in place into whichever tensor is memfit's to change. Uses not found this way
    (the weight read outside its modules) still reach ``.grad`` and are added from
    the post-accumulate-grad hook. The parameter steps once, at the end of that
    backward pass (``queue_callback``), from the whole sum.
    """

    def __init__(self, model: torch.nn.Module, params: Sequence[torch.Tensor]):
        # tensors hash by identity, so they key these dicts as they key InBackwardOptimizer's
        owners: dict[torch.Tensor, list[torch.nn.Module]] = {p: [] for p in params}
        for module in model.modules():
            for t in module._parameters.values():
                if t in owners:
                    owners[t].append(module)
        self.params = {p: ms for p, ms in owners.items() if len(ms) > 1}
        self._pending: dict[torch.Tensor, tuple[torch.Tensor, bool]] = {}  # p: (sum so far, ours to change)
        self._steppers: Mapping[torch.Tensor, Callable[[torch.Tensor], None]] = {}
        self._flush_queued = False

    def attach(self, steppers: Mapping[torch.Tensor, Callable[[torch.Tensor], None]]) -> list:
        """Install the module hooks; ``steppers[p](p)`` steps ``p`` from ``p.grad``.
        Returns the hook handles."""
        self._steppers = steppers
        handles = []
        for p, modules in self.params.items():
            for module in modules:
                marks: list[int] = []
                handles.append(module.register_forward_pre_hook(self._mark(marks)))
                handles.append(module.register_forward_hook(self._divert(p, marks), always_call=True))
        return handles

    @staticmethod
    def _next_sequence_nr() -> int:
        with torch.enable_grad():
            probe = torch.zeros((), requires_grad=True).view(())
        return probe.grad_fn._sequence_nr()

    def _mark(self, marks: list[int]):
        def hook(module, args):
            marks.append(self._next_sequence_nr() if torch.is_grad_enabled() else -1)

        return hook

    def _divert(self, p: torch.Tensor, marks: list[int]):
        def hook(module, args, output):
            start = marks.pop() if marks else -1
            if start < 0 or not torch.is_grad_enabled():
                return
            roots = [t.grad_fn for t in torch.utils._pytree.tree_flatten(output)[0]
                     if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            for node, index in self._uses(roots, p, start):
                node.register_hook(self._take(p, index, type(node).__name__ in _FRESH_GRAD_NODES))

        return hook

    @staticmethod
    def _uses(roots, p: torch.Tensor, start: int):
        """(node, input index) of every edge into ``p``'s AccumulateGrad among the
        nodes created at or after sequence number ``start``."""
        found, seen, stack = [], set(), list(roots)
        while stack:
            node = stack.pop()
            key = (type(node).__name__, node._sequence_nr())
            if key in seen:
                continue
            seen.add(key)
            if key[1] < start:
                continue
            for i, (nxt, _) in enumerate(node.next_functions):
                if nxt is None:
                    continue
                if type(nxt).__name__ == "AccumulateGrad":
                    if nxt.variable is p:
                        found.append((node, i))
                else:
                    stack.append(nxt)
        return found

    def _take(self, p: torch.Tensor, index: int, fresh: bool):
        def hook(grad_inputs, grad_outputs):
            g = grad_inputs[index]
            if g is None:
                return None
            self._add(p, g, ours=fresh and g.layout is torch.strided and not g._is_view())
            return tuple(None if i == index else x for i, x in enumerate(grad_inputs))

        return hook

    def gather_accumulated(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook of a tied parameter: a use that reached ``.grad``."""
        g = p.grad
        if g is None:
            return
        p.grad = None
        self._add(p, g, ours=g.layout is torch.strided)

    def _add(self, p: torch.Tensor, g: torch.Tensor, *, ours: bool) -> None:
        entry = self._pending.get(p)
        if entry is None:
            self._pending[p] = (g, ours)
            if not self._flush_queued:
                self._flush_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._flush)
            return
        total, total_ours = entry
        same = g.shape == total.shape and g.dtype == total.dtype and g.layout is total.layout
        if total_ours and same:
            total.add_(g)
        elif ours and same:
            self._pending[p] = (g.add_(total), True)
        else:
            self._pending[p] = (total + g, True)

    def _flush(self) -> None:
        self._flush_queued = False
        while self._pending:
            p, (total, _) = self._pending.popitem()
            # the sum goes to .grad (copied if strided oddly) and is freed by the step
            p.grad = total if total.layout is not torch.strided or total.is_contiguous() else total.contiguous()
            del total
            self._steppers[p](p)

