"""ModuliHandle: what :func:`moduli_transform.attach` returns.

The handle owns everything the transformation adds (embeddings, coefficient matrices,
masks, the schedule position) and keeps it off the model, so the model's parameter names,
``state_dict`` keys, pickling and ``deepcopy`` stay exactly as they were.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import REINITS, ModuliConfig
from .effective import Parametrized, keeps_zeros, parametrized
from .hooks import HookSet, current_backward_id, keep_alive, register_attachment, release
from .ordering import order_neurons
from .pruning import MagnitudeSparsifier
from .regularizer import ModuliRegularizer
from .schedules import get_schedule
from .targets import Target, gate_rows

__all__ = ["ModuliHandle"]


class ModuliHandle:
    """Moduli regularizers, pruning masks and schedule attached to one model.

    Explicit use::

        loss = task_loss + handle.penalty()
        loss.backward(); optimizer.step(); handle.step()

    With ``auto=True`` the penalty gradient is added during backward and the schedule
    advances once per step of an optimizer holding the targets (``schedule_on="optimizer"``;
    once per backward pass while no such optimizer has been seen, and always with
    ``schedule_on="backward"``); the training loop is left unchanged. The handle then
    lives as long as the model, which it holds weakly.
    """

    def __init__(self, model: nn.Module, targets: list[Target], config: ModuliConfig,
                 regularizers: dict[str, ModuliRegularizer]) -> None:
        self._model_ref = weakref.ref(model)
        self._model = None if config.auto else model  # auto: the model keeps the handle alive
        self.config = config
        self.targets = targets
        self.regularizers = regularizers
        self._parameters = dict(model.named_parameters())
        # parametrized targets: sparsity() measures the computed weight; where the stored
        # tensor's zeros are not the weight's, the penalty acts on the computed weight too
        self._parametrized: dict[str, Parametrized] = {
            t.name: where for t in targets if (where := parametrized(model, t.name)) is not None}
        self._penalize_effective = {name for name, where in self._parametrized.items()
                                    if not keeps_zeros(where)}
        prunable = [t for t in targets if t.kind != "elementwise" or config.regularize_elementwise]
        # One pruned block per parameter: an "extra" target naming a regularized parameter
        # (prune_also) replaces that target's block, so the whole parameter is pruned.
        whole = {t.name for t in prunable if t.kind == "extra"}
        self._prunable = [t for t in prunable if t.kind == "extra" or t.name not in whole]
        self.masks: dict[str, Tensor] = {}
        if config.sparsity is not None:
            for target in self._prunable:
                param = self._parameters[target.name]
                self.masks.setdefault(target.name, torch.ones_like(param, dtype=torch.bool))
        self.schedule: Callable[[int], float] = get_schedule(
            config.schedule, config.sparsity or 0.0, config.total_steps)
        self.sparsifier = MagnitudeSparsifier(config.scope, config.granularity, config.tile)
        self.neuron_orders: dict[str, tuple[Tensor, Tensor]] = (
            self._neuron_orders() if config.granularity == "tile" and self.masks else {})
        self.step_count = 0
        self.frozen = False
        self._pending_steps = 0
        self._last_backward = -1
        self._in_step = False
        self._optimizer_seen = False
        self._in_optimizer = False
        self._initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._embedding_optimizer = self._make_embedding_optimizer()
        self._hooks = HookSet()
        self._install_hooks()
        weakref.finalize(self, self._hooks.remove)
        register_attachment(model, self)
        if config.auto:
            keep_alive(model, self)

    @property
    def model(self) -> nn.Module:
        """The model the handle is attached to."""
        model = self._model_ref()
        if model is None:
            raise ValueError("the model of this handle was garbage-collected")
        return model

    # -- set-up ---------------------------------------------------------------------------
    def _make_embedding_optimizer(self) -> torch.optim.Optimizer | None:
        tensors = [t for reg in self.regularizers.values() if reg.trained for t in reg.embedding_tensors()]
        return torch.optim.Adam(tensors, lr=self.config.embedding_lr) if tensors else None

    def _neuron_orders(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per prunable target, (row, column) renumbering of its block along the manifold.

        Computed once, from the embeddings at attach time, so the tiles stay the same tiles
        while trained embeddings move. Rows are renumbered inside each gate block.
        """
        orders = {}
        for target in self._prunable:
            shape = target.block(self._parameters[target.name]).shape
            if len(shape) != 2:
                raise ValueError(f"granularity='tile' needs 2-D weight blocks; target {target.name!r} "
                                 f"has block shape {tuple(shape)}; use granularity='element'")
            regularizer = self.regularizers.get(target.name)
            if regularizer is None:
                rows, cols = torch.arange(shape[0] // target.gates), torch.arange(shape[1])
            else:
                rows = order_neurons(regularizer.row_embedding.detach().cpu(), self.config.ordering,
                                     regularizer.manifold)
                cols = rows if regularizer.shared else order_neurons(
                    regularizer.col_embedding.detach().cpu(), self.config.ordering, regularizer.manifold)
            orders[target.name] = (gate_rows(rows, target.gates), cols)
        return orders

    def _install_hooks(self) -> None:
        hooked = set(self.masks) | (set(self.regularizers) if self.config.auto else set())
        for name in hooked:
            self._hooks.on_gradient(self._parameters[name], self._gradient_hook(name))
        if self.masks or self.config.auto:
            self._hooks.on_optimizer_step(self._before_optimizer_step, self._after_optimizer_step)
        if self.config.auto:
            owners = {t.module for t in self.targets if t.name in hooked}
            modules = dict(self.model.named_modules())
            self._hooks.on_forward([modules[o] for o in sorted(owners) if o in modules],
                                   self._resolve_pending)

    def _gradient_hook(self, name: str) -> Callable[[nn.Parameter], None]:
        # Tensor hooks are invisible to the garbage collector: hold the handle weakly there.
        # In auto mode the forward pre-hooks (plain module dicts) keep it alive with the model.
        handle_ref = weakref.ref(self)

        def hook(parameter: nn.Parameter) -> None:
            handle = handle_ref()
            if handle is not None:
                handle._on_gradient(name, parameter)

        return hook

    def _on_gradient(self, name: str, parameter: nn.Parameter) -> None:
        """Once per backward per parameter: penalty gradient (auto mode), then the mask."""
        if self.config.auto:
            backward = current_backward_id()
            if backward != self._last_backward:  # first target hook of a new backward pass
                self._last_backward = backward
                if self._counts_backward():
                    self._resolve_pending()
                    self._pending_steps += 1
            if name in self.regularizers:
                self._add_penalty_gradient(name, parameter)
        if name in self.masks and parameter.grad is not None:
            parameter.grad.mul_(self.masks[name])

    def _add_penalty_gradient(self, name: str, parameter: nn.Parameter) -> None:
        regularizer = self.regularizers[name]
        embeddings = regularizer.embedding_tensors() if regularizer.trained else []
        with torch.enable_grad():
            if name in self._penalize_effective:  # d penalty(f(original)) / d original
                weight = parameter
                penalty = regularizer.penalty(self._parametrized[name].weight())
            else:
                weight = parameter.detach().requires_grad_(True)
                penalty = regularizer.penalty(weight)
            if not penalty.requires_grad:
                return
            grads = torch.autograd.grad(penalty, [weight, *embeddings], allow_unused=True)
        if grads[0] is not None:
            parameter.grad.add_(grads[0])
        for tensor, grad in zip(embeddings, grads[1:]):
            if grad is not None:
                tensor.grad = grad if tensor.grad is None else tensor.grad + grad

    def _counts_backward(self) -> bool:
        """Whether a backward pass advances the schedule (else the optimizer steps do)."""
        return self.config.schedule_on == "backward" or not self._optimizer_seen

    def _holds_targets(self, optimizer: torch.optim.Optimizer) -> bool:
        ours = {id(self._parameters[t.name]) for t in self.targets}
        return any(id(p) in ours for group in optimizer.param_groups for p in group["params"])

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # LBFGS calls the closure (forward + backward) several times inside one step: with
        # schedule_on="optimizer" those backward passes must not count.
        if self._in_step or not self.config.auto or self.config.schedule_on != "optimizer":
            return
        if self._holds_targets(optimizer):
            self._optimizer_seen = True
            self._in_optimizer = True
            self._pending_steps = 0

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._in_step:
            return
        if self.config.auto:
            if self._in_optimizer:
                self._in_optimizer = False
                self._pending_steps = 1
            self._resolve_pending()
        self.apply_masks()

    def _resolve_pending(self) -> None:
        if self._in_optimizer:
            return
        while self._pending_steps > 0:
            self._pending_steps -= 1
            self.step()

    # -- training API ---------------------------------------------------------------------
    def penalty(self) -> Tensor:
        """Sum of the targets' moduli penalties: a differentiable scalar.

        In auto mode the gradient is already added during backward; the value returned
        here is detached and only for logging.
        """
        total = None
        for name, regularizer in self.regularizers.items():
            term = regularizer.penalty(self._penalized_weight(name))
            total = term if total is None else total + term
        if total is None:
            total = torch.zeros(())
        return total.detach() if self.config.auto else total

    def _penalized_weight(self, name: str) -> Tensor:
        if name in self._penalize_effective:
            return self._parametrized[name].weight()
        return self._parameters[name]

    def _computed_weight(self, name: str) -> Tensor:
        """The weight the model computes with; the stored tensor when it is not parametrized,
        or when the weight has another shape (weight_norm's magnitude ``g`` of shape (H, 1))."""
        stored, where = self._parameters[name], self._parametrized.get(name)
        if where is None:
            return stored
        weight = where.weight()
        return weight if weight.shape == stored.shape else stored

    def step(self) -> None:
        """Advance one schedule step: update trained embeddings, prune, re-apply masks."""
        self._in_step = True
        try:
            if self._embedding_optimizer is not None and not self.frozen:
                self._embedding_optimizer.step()
                self._embedding_optimizer.zero_grad(set_to_none=True)
                for regularizer in self.regularizers.values():
                    if regularizer.trained:
                        regularizer.retract()
            self.step_count += 1
            if self.masks and not self.frozen:
                self._prune_to(float(self.schedule(self.step_count)))
            self.apply_masks()
        finally:
            self._in_step = False

    @torch.no_grad()
    def _prune_to(self, sparsity: float) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"schedule returned sparsity {sparsity} at step {self.step_count}; expected [0, 1)")
        blocks = {t.name: t.block(self._parameters[t.name]) for t in self._prunable}
        block_masks = {t.name: t.block(self.masks[t.name]) for t in self._prunable}
        self.sparsifier.update_masks(blocks, block_masks, sparsity, self.neuron_orders)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every pruned weight in place."""
        for name, mask in self.masks.items():
            # masked_fill, not mul: a pruned negative weight must become +0.0, not -0.0.
            self._parameters[name].masked_fill_(~mask, 0.0)

    def prune_now(self, sparsity: float) -> None:
        """Prune immediately to ``sparsity`` (outside the schedule), e.g. one-shot at the end."""
        if not self.masks:
            raise ValueError("this handle has no masks: attach with sparsity=<float> to prune")
        self._prune_to(sparsity)
        self.apply_masks()

    # -- results --------------------------------------------------------------------------
    def sparsity(self) -> dict[str, float]:
        """Fraction of zero weights per target block and ``"overall"`` over all blocks, in the
        weight the model computes with (a parametrized weight is recomputed)."""
        result, zeros, total = {}, 0, 0
        for target in self._prunable:
            with torch.no_grad():
                block = target.block(self._computed_weight(target.name)).detach()
            n_zero = int((block == 0).sum())
            result[target.name] = n_zero / block.numel()
            zeros += n_zero
            total += block.numel()
        result["overall"] = zeros / total if total else 0.0
        return result

    def lottery(self, reinit: str = "random") -> None:
        """Restart training from a lottery ticket: keep the masks, reset the weights.

        ``"random"`` re-initialises with each module's own ``reset_parameters`` (seeded by
        the config's seed); ``"rewind"`` restores the weights saved at attach time. In both,
        embeddings stop training and the masks stop changing (as in the paper).
        """
        if reinit not in REINITS:
            raise ValueError(f"unknown reinit {reinit!r}; expected one of {', '.join(REINITS)}")
        if reinit == "rewind":
            self.model.load_state_dict(self._initial_state)
        else:
            self._reinitialise()
        self.frozen = True
        self._embedding_optimizer = None
        for regularizer in self.regularizers.values():
            regularizer.set_trained(False)
        self.apply_masks()

    def _reinitialise(self) -> None:
        """Every module's ``reset_parameters``, children first (so a parent's own
        initialisation wins, as at construction), from the CPU generator seeded with the
        config's seed + 1, on the CPU: a model on one GPU is moved to the CPU for it and
        back (the same Parameter objects), so a ticket is the same on every device. No
        generator, CPU or CUDA, is left reseeded."""
        devices = {t.device for t in itertools.chain(self.model.parameters(), self.model.buffers())}
        cuda = sorted({d.index if d.index is not None else torch.cuda.current_device()
                       for d in devices if d.type == "cuda"})
        home = next(iter(devices)) if len(devices) == 1 and next(iter(devices)).type != "cpu" else None
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.config.seed + 1)
            if home is not None:
                self.model.to("cpu")
            try:
                for module in reversed(list(self.model.modules())):
                    if hasattr(module, "reset_parameters") and callable(module.reset_parameters):
                        module.reset_parameters()
            finally:
                if home is not None:
                    self.model.to(home)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Embeddings, masks and schedule position (tensors, ints and bools only)."""
        return {
            "step_count": self.step_count,
            "frozen": self.frozen,
            "masks": {k: v.clone() for k, v in self.masks.items()},
            "embeddings": {name: [t.detach().clone() for t in reg.embedding_tensors()]
                           for name, reg in self.regularizers.items()},
            "embedding_optimizer": (self._embedding_optimizer.state_dict()
                                    if self._embedding_optimizer is not None else None),
            "neuron_orders": {name: [rows.clone(), cols.clone()] for name, (rows, cols) in self.neuron_orders.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; shapes and names must match."""
        if set(state["masks"]) != set(self.masks):
            raise ValueError(f"mask names {sorted(state['masks'])} do not match this handle's {sorted(self.masks)}")
        for name, mask in state["masks"].items():
            if mask.shape != self.masks[name].shape:
                raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, expected {tuple(self.masks[name].shape)}")
            self.masks[name].copy_(mask)
        for name, tensors in state["embeddings"].items():
            if name not in self.regularizers:
                raise ValueError(f"embedding for unknown target {name!r}; targets: {sorted(self.regularizers)}")
            for own, saved in zip(self.regularizers[name].embedding_tensors(), tensors):
                own.copy_(saved)
            self.regularizers[name].invalidate()
        for name, (rows, cols) in state.get("neuron_orders", {}).items():
            if name not in self.neuron_orders:
                raise ValueError(f"neuron order for {name!r}, but this handle tiles {sorted(self.neuron_orders)}")
            # on the CPU, where fresh orders live, whatever device the state was loaded onto
            self.neuron_orders[name] = (rows.to('cpu', torch.long, copy=True), cols.to('cpu', torch.long, copy=True))
        self.step_count = int(state["step_count"])
        if bool(state["frozen"]) and not self.frozen:
            self.frozen = True
            self._embedding_optimizer = None
            for regularizer in self.regularizers.values():
                regularizer.set_trained(False)
        if self._embedding_optimizer is not None and state.get("embedding_optimizer") is not None:
            self._embedding_optimizer.load_state_dict(state["embedding_optimizer"])
        self.apply_masks()

    def remove(self) -> nn.Module:
        """Detach everything: pruned zeros baked in, no hooks; returns the plain model."""
        self.apply_masks()
        self._hooks.remove()
        self._model = self.model
        release(self._model)
        self.config = copy.copy(self.config)
        self.config.auto = False
        return self.model

    def memory_bytes(self) -> int:
        """Bytes of cached coefficient matrices held by the handle."""
        return sum(reg.coefficient_bytes() for reg in self.regularizers.values())

    def summary(self) -> str:
        """A table of targets with kind, shape, slice, gates, embedding and sparsity."""
        from .report import format_summary

        return format_summary(self)

    def __repr__(self) -> str:
        return (f"ModuliHandle({len(self.targets)} targets, manifold={self.config.to_dict()['manifold']!r}, "
                f"control={self.config.control!r}, step={self.step_count}, auto={self.config.auto})")
