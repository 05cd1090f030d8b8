"""What both callbacks run around each training forward: :class:`StepApplier` (the
plan's activation choices or the compressor, and the latest stats)."""

from __future__ import annotations

import contextlib

__all__ = ["StepApplier"]


class StepApplier:
    """What both callbacks run around each training forward: the plan's activation
    choices (``plan.apply()``: compression policy and checkpoint wrappers) or the
    compressor, remembering the latest stats.

    The context is left before backward: while it is active the engine keeps a table
    of the encodings it made (to encode a storage saved twice only once), so leaving
    it lets backward free each encoding as soon as it has been used, as in memfit's
    own loop (forward inside, ``loss.backward()`` outside) and in the planner's
    estimates. Backward decodes through the saved-tensor hooks either way, and
    checkpointed blocks recompute with the forward they ran with.
    """

    def __init__(self) -> None:
        self.plan = None
        self.compressor = None
        self.stats = None  # memfit.ActivationStats of the latest forward that saved something
        self.steps = 0  # training forwards run under memfit
        self.compressed_steps = 0  # of which memfit held less than autograd would have
        self._ctx = None
        self._step_ctx = None
        self._pending_state: dict | None = None  # loaded before the compressor existed

    # -- the rounding stream, saved and restored with checkpoints ---------------------

    @property
    def active_compressor(self):
        """The :class:`memfit.ActivationCompressor` the forwards run under: the plan's
        (kept across steps) or the one the settings made; None before the first step
        or when nothing is compressed."""
        return self.plan.compressor if self.plan is not None else self.compressor

    def activation_state(self) -> dict | None:
        """The compressor's ``state_dict()`` (its stochastic-rounding stream), for a
        checkpoint; None when there is no compressor (yet)."""
        c = self.active_compressor
        if c is not None:
            return c.state_dict()
        return self._pending_state

    def load_activation_state(self, state: dict | None) -> None:
        """Restore a checkpoint's :meth:`activation_state` now, or as soon as the
        compressor exists (the first training step makes it)."""
        self._pending_state = state
        self._apply_pending_state()

    def _apply_pending_state(self) -> None:
        c = self.active_compressor
        if c is not None and self._pending_state is not None:
            c.load_state_dict(self._pending_state)
            self._pending_state = None

    def enter(self) -> None:
        if self._ctx is not None:
            return
        self._apply_pending_state()
        if self.plan is not None:
            ctx = self.plan.apply()
            self._step_ctx = ctx.__enter__()
            self._ctx = ctx
        elif self.compressor is not None:
            self.compressor.__enter__()
            self._ctx = self.compressor
            self._step_ctx = None
        else:
            self._ctx = contextlib.nullcontext()
            self._ctx.__enter__()

    def exit(self, exc: BaseException | None = None, *, count: bool = True) -> None:
        """Leave the context. ``count``: a forward ran inside (with a compressor, one is
        counted only if something was saved)."""
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        et = type(exc) if exc is not None else None
        ctx.__exit__(et, exc, None)
        compressor = self.compressor if self.plan is None else getattr(self._step_ctx, "compressor", None)
        self._step_ctx = None
        if exc is not None:
            return
        if compressor is not None:
            st = compressor.stats
            if not st.by_module:
                return  # nothing was saved in there (no forward)
            self.stats = st
            self.steps += 1
            if st.stored_bytes < st.original_bytes:
                self.compressed_steps += 1
        elif count:
            self.steps += 1

    @contextlib.contextmanager
    def forward(self):
        """The context for one training forward (exited before backward)."""
        self.enter()
        try:
            yield
        except BaseException as exc:
            self.exit(exc)
            raise
        self.exit()

    @property
    def active(self) -> bool:
        return self._ctx is not None

