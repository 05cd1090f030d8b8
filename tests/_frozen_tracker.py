"""Test-local stand-in for issue 17 item 1 (the `finetune` work): PyTorch's MemTracker
hooks every parameter's gradient and refuses a frozen one ("cannot register a hook on
a tensor that doesn't require gradient"). No-op handles for frozen parameters, put in
before it tracks a module, let memfit's estimates and measurements run on fine-tuning
models until memfit's tracker does this itself. Not in src: that fix belongs to
memfit.step."""

from torch.distributed._tools.mem_tracker import MemTracker


class _NoHook:
    def remove(self):
        pass


def track_frozen_params(monkeypatch) -> None:
    """Patch MemTracker (through ``monkeypatch``) to skip frozen parameters' gradient hooks."""
    orig = MemTracker._track_module_params_and_buffers

    def patched(self, module, install_grad_hooks=True):
        for p in module.parameters():
            if not p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                self._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
        return orig(self, module, install_grad_hooks)

    monkeypatch.setattr(MemTracker, "_track_module_params_and_buffers", patched)
