"""Hooks that keep pruned weights at zero and, in auto mode, need no change to the loop.

Three places are hooked, none of them renames a parameter or wraps a module:

* each target parameter's post-accumulate-grad hook (fires once per backward with the
  summed gradient): adds the penalty gradient (auto mode) and zeroes the gradient of
  pruned weights, so hand-written updates ``p.data.add_(-lr * p.grad)`` keep them at zero;
* a global optimizer post-step hook (every ``torch.optim`` optimizer, LBFGS included):
  re-applies the masks after the update, so momentum or weight decay cannot revive a
  pruned weight, and in auto mode advances the pruning schedule;
* a forward pre-hook on the modules that own target parameters (auto mode): advances a
  pending schedule step before the next forward when no torch optimizer is used.

Hooks do not survive pickling or ``copy.deepcopy`` of the model: tensor hooks are dropped
by PyTorch itself and module hooks reduce to a no-op, so a saved or copied model is a
plain model.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.hooks import RemovableHandle

__all__ = ["HookSet", "current_backward_id"]


def _noop_hook(*args: Any, **kwargs: Any) -> None:
    return None


class _UnpicklableCallback:
    """A hook callback that pickles/deep-copies as a no-op instead of dragging the handle along."""

    def __init__(self, callback: Callable) -> None:
        self.callback = callback

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.callback(*args, **kwargs)

    def __reduce__(self):
        return (_noop_factory, ())


def _noop_factory() -> Callable:
    return _noop_hook


def current_backward_id() -> int:
    """An id of the running backward pass (distinct per ``.backward()`` call)."""
    return int(torch._C._current_graph_task_id())


class HookSet:
    """Registered hooks of one handle, removable together."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def on_gradient(self, parameter: nn.Parameter, callback: Callable[[nn.Parameter], None]) -> None:
        self._handles.append(parameter.register_post_accumulate_grad_hook(callback))

    def on_optimizer_step(self, callback: Callable[[torch.optim.Optimizer], None]) -> None:
        """``callback`` must be a bound method; the global hook holds it weakly, so a handle
        whose model is gone does not stay alive (nor slow down other optimizers)."""
        method = weakref.WeakMethod(callback)

        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            bound = method()
            if bound is not None:
                bound(optimizer)

        self._handles.append(register_optimizer_step_post_hook(hook))

    def on_forward(self, module: nn.Module, callback: Callable[[], None]) -> None:
        def hook(module: nn.Module, inputs: Any) -> None:
            callback()

        self._handles.append(module.register_forward_pre_hook(_UnpicklableCallback(hook)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __len__(self) -> int:
        return len(self._handles)
