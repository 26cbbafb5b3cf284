"""attach(): one call from any PyTorch model to a moduli-regularized, prunable one."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from .config import ModuliConfig, config_from_kwargs
from .discovery import DiscoveryContext, discover_targets
from .effective import keeps_zeros, parametrized
from .handle import ModuliHandle
from .hooks import attached_handle
from .inhibitors import get_inhibitor
from .manifolds import get_manifold
from .regularizer import ModuliRegularizer

__all__ = ["attach"]


def attach(model: nn.Module, config: ModuliConfig | None = None, *, example_inputs: tuple | None = None,
           example_kwargs: dict | None = None, method: str = "forward",
           driver: Callable[..., Any] | None = None, **options: Any) -> ModuliHandle:
    """Discover the model's recurrent weights and attach moduli regularizers and pruning.

    Args:
        model: any ``nn.Module``; it is not wrapped and its parameter names do not change.
        config: a :class:`ModuliConfig`; keyword ``options`` (its field names, e.g.
            ``manifold="torus", sparsity=0.9, total_steps=100, auto=True``) override it.
        example_inputs: inputs with at least two time steps, for the dataflow pass that
            finds recurrence in custom cells (not needed for PyTorch's RNN layers).
        method: the method the training code calls, when it is not ``forward``.
        driver: ``fn(model, *example_inputs)`` running the training script's own step loop
            for a few steps, traced instead of ``method`` when ``forward`` is one time step
            and the recurrence closes in the script (``out, h = model(x_t, h)``).

    Returns:
        A :class:`ModuliHandle`.

    Raises:
        ValueError: unknown option values, nothing to regularize, a model already attached
            (``remove()`` the first handle), parameters on the meta device, or pruning asked
            through a parametrization whose zeros are not zeros of the weight.

    Example:
        >>> rnn = nn.RNN(4, 16)
        >>> handle = attach(rnn, manifold="torus", sparsity=0.5, total_steps=1)
        >>> [t.name for t in handle.targets]
        ['weight_hh_l0']
        >>> handle.step(); round(handle.sparsity()["weight_hh_l0"], 2)
        0.5
    """
    config = config_from_kwargs(config, **options)
    _check_model(model)
    if driver is not None and example_inputs is None:
        raise ValueError("driver= needs example_inputs: the inputs the driver is called with, "
                         "fn(model, *example_inputs)")
    context = DiscoveryContext(example_inputs, example_kwargs, method, driver)
    targets = discover_targets(model, config.targets, context)
    _warn_if_nothing_prunable(config, targets)
    _check_parametrized(model, config, targets)
    manifold = get_manifold(config.manifold, **config.manifold_options)
    inhibitor = get_inhibitor(config.inhibitor, **config.inhibitor_options)
    generator = torch.Generator().manual_seed(config.seed)
    parameters = dict(model.named_parameters())
    regularizers = {}
    for target in targets:
        if not target.regularize or target.kind in ("elementwise", "extra"):
            continue
        regularizer = ModuliRegularizer(
            target, manifold, inhibitor, strength=config.strength, control=config.control,
            trained=config.embedding == "trained", power=config.power, reduction=config.reduction,
            share_embedding=config.share_embedding, l1_coefficient=config.l1_coefficient,
            generator=generator)
        regularizers[target.name] = regularizer.to(parameters[target.name].device)
    if config.prune_also:
        extra = discover_targets(model, list(config.prune_also), context)
        known = {t.name for t in targets}
        # A named parameter that is already a target (the hidden-column slice of a Linear on
        # cat([x, h])) is pruned whole: the extra target covers the parameter, slices and all.
        targets += [t.with_changes(kind="extra", regularize=False, rows=slice(None), cols=slice(None),
                                   evidence="prune_also (whole parameter)" if t.name in known else "prune_also")
                    for t in extra]
    return ModuliHandle(model, targets, config, regularizers)


def _check_model(model: nn.Module) -> None:
    """Refuse what would otherwise fail later or silently: a second handle, meta tensors."""
    first = attached_handle(model)
    if first is not None:
        raise ValueError(
            f"{type(model).__name__} already has a handle attached ({first!r}); a second one "
            "would fight over the same hooks and masks. Call handle.remove() on the first, "
            "or attach once with all the targets and options")
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(
            f"parameters on the meta device ({', '.join(meta[:3])}{' ...' if len(meta) > 3 else ''}) "
            "have no values to regularize or prune; materialize them first "
            "(model.to_empty(device='cpu') and initialise or load weights), then attach")


def _check_parametrized(model: nn.Module, config: ModuliConfig, targets: list) -> None:
    """Pruning through a parametrization is refused unless its zeros are the weight's zeros."""
    for target in targets:
        regularized = target.regularize and target.kind not in ("elementwise", "extra")
        prunable = config.sparsity is not None and (
            target.kind != "elementwise" or config.regularize_elementwise)
        where = parametrized(model, target.name)
        if not (regularized or prunable) or where is None or keeps_zeros(where):
            continue
        if tuple(where.weight().shape) != target.shape:
            raise ValueError(
                f"target {target.name!r} is stored for {where.attribute} = {where.describe()}"
                f"({where.original}) of shape {tuple(where.weight().shape)}, not {target.shape}: "
                "neither the penalty nor the masks can be placed on it; drop it with "
                f"targets=[..., '!{target.name}']")
        if prunable:
            raise ValueError(
                f"cannot prune {target.name!r}: it is stored for a parametrization "
                f"({where.describe()}) in which a zero of the stored tensor is not a zero of "
                f"{where.attribute}, so masks there would not sparsify the weight the model "
                "computes with. Attach with sparsity=None (the moduli penalty then acts on the "
                "effective weight), or prune another weight")


def _warn_if_nothing_prunable(config: ModuliConfig, targets: list) -> None:
    if (config.sparsity and not config.regularize_elementwise
            and all(t.kind == "elementwise" for t in targets)):
        warnings.warn(
            f"sparsity={config.sparsity} prunes nothing: the only targets "
            f"({', '.join(t.name for t in targets)}) are elementwise (IndRNN-style recurrent "
            "vectors), which are neither regularized nor pruned by default; pass "
            "regularize_elementwise=True to prune them", UserWarning, stacklevel=3)
