"""Hooks that keep pruned weights at zero and, in auto mode, need no change to the loop.

None of them is stored on the model: no parameter is renamed, no module wrapped, and the
module's own hook tables stay empty, so ``torch.save(model)`` pickles exactly what the
user's code would save without us (it loads with ``weights_only=True`` where
moduli-transform is not installed) and ``copy.deepcopy`` gives a plain model.

* each target parameter's post-accumulate-grad hook (fires once per backward with the
  summed gradient; PyTorch drops tensor hooks when pickling or copying): adds the penalty
  gradient (auto mode) and zeroes the gradient of pruned weights, so hand-written updates
  ``p.data.add_(-lr * p.grad)`` keep them at zero;
* global optimizer pre- and post-step hooks (every ``torch.optim`` optimizer, LBFGS
  included): after the update the masks are re-applied, so momentum or weight decay cannot
  revive a pruned weight, and in auto mode the pruning schedule advances;
* a global module forward pre-hook filtered to the modules owning targets (auto mode):
  advances a pending schedule step before the next forward when no optimizer is used.

The model keeps its auto-mode handle alive through :func:`keep_alive`, a registry keyed
by the model's identity that forgets the handle when the model is collected.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

__all__ = ["HookSet", "attached_handle", "current_backward_id", "global_hook_watches", "keep_alive",
           "register_attachment", "release"]

# id(model) -> (weak reference to the model, weak reference to its handle)
_ATTACHED: dict[int, tuple[weakref.ref, weakref.ref]] = {}
# id(model) -> auto-mode handle, kept alive exactly as long as the model
_KEPT: dict[int, Any] = {}


def current_backward_id() -> int:
    """An id of the running backward pass (distinct per ``.backward()`` call)."""
    return int(torch._C._current_graph_task_id())


def attached_handle(model: nn.Module) -> Any | None:
    """The live handle attached to ``model`` (None when there is none, or it was removed)."""
    entry = _ATTACHED.get(id(model))
    if entry is None or entry[0]() is not model:
        return None
    return entry[1]()


def register_attachment(model: nn.Module, handle: Any) -> None:
    """Record ``handle`` as attached to ``model`` (held weakly)."""
    key = id(model)
    _ATTACHED[key] = (weakref.ref(model), weakref.ref(handle))
    weakref.finalize(model, _forget, key)


def _forget(key: int) -> None:
    entry = _ATTACHED.get(key)
    if entry is not None and entry[0]() is None:  # not a newer model that reused the id
        _ATTACHED.pop(key, None)
        _KEPT.pop(key, None)


def keep_alive(model: nn.Module, handle: Any) -> None:
    """Keep ``handle`` alive while ``model`` lives (the handle must hold the model weakly)."""
    _KEPT[id(model)] = handle


def release(model: nn.Module) -> None:
    """Forget the attachment of ``model`` (after ``handle.remove()``)."""
    _ATTACHED.pop(id(model), None)
    _KEPT.pop(id(model), None)


class HookSet:
    """Registered hooks of one handle, removable together."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def on_gradient(self, parameter: nn.Parameter, callback: Callable[[nn.Parameter], None]) -> None:
        self._handles.append(parameter.register_post_accumulate_grad_hook(callback))

    def on_optimizer_step(self, before: Callable[[torch.optim.Optimizer], None],
                          after: Callable[[torch.optim.Optimizer], None]) -> None:
        """``before``/``after`` must be bound methods; the global hooks hold them weakly, so
        a handle whose model is gone does not stay alive (nor slow down other optimizers)."""
        for register, callback in ((register_optimizer_step_pre_hook, before),
                                   (register_optimizer_step_post_hook, after)):
            self._handles.append(register(_weak_optimizer_hook(weakref.WeakMethod(callback))))

    def on_forward(self, modules: list[nn.Module], callback: Callable[[], None]) -> None:
        """Call the bound method ``callback`` before the forward of any of ``modules``."""
        owners = weakref.WeakSet(modules)
        method = weakref.WeakMethod(callback)

        def hook(module: nn.Module, inputs: Any) -> None:
            if module in owners:
                bound = method()
                if bound is not None:
                    bound()

        hook.watched_modules = owners  # read by global_hook_watches: this hook acts on these alone
        self._handles.append(register_module_forward_pre_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)


def global_hook_watches(hook: Callable, module: nn.Module) -> bool:
    """Whether the global module hook ``hook`` may act on ``module``.

    Our own forward pre-hook (auto mode) acts only on the modules of its handle's model; any
    other global hook may act on every module. Code that skips a module's ``__call__`` for
    speed asks this, so that a handle attached to another model (alive until the garbage
    collector removes its hook) does not change which path, and which float rounding, it takes.
    """
    watched = getattr(hook, "watched_modules", None)
    return watched is None or module in watched


def _weak_optimizer_hook(method: weakref.WeakMethod) -> Callable:
    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        bound = method()
        if bound is not None:
            bound(optimizer)

    return hook
