"""attach(): one call from any PyTorch model to a moduli-regularized, prunable one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ModuliConfig, config_from_kwargs
from .discovery import DiscoveryContext, discover_targets
from .handle import ModuliHandle
from .inhibitors import get_inhibitor
from .manifolds import get_manifold
from .regularizer import ModuliRegularizer

__all__ = ["attach"]


def attach(model: nn.Module, config: ModuliConfig | None = None, *, example_inputs: tuple | None = None,
           example_kwargs: dict | None = None, method: str = "forward", **options: Any) -> ModuliHandle:
    """Discover the model's recurrent weights and attach moduli regularizers and pruning.

    Args:
        model: any ``nn.Module``; it is not wrapped and its parameter names do not change.
        config: a :class:`ModuliConfig`; keyword ``options`` (its field names, e.g.
            ``manifold="torus", sparsity=0.9, total_steps=100, auto=True``) override it.
        example_inputs: inputs with at least two time steps, for the dataflow pass that
            finds recurrence in custom cells (not needed for PyTorch's RNN layers).
        method: the method the training code calls, when it is not ``forward``.

    Returns:
        A :class:`ModuliHandle`.

    Raises:
        ValueError: unknown option values, or nothing to regularize.

    Example:
        >>> rnn = nn.RNN(4, 16)
        >>> handle = attach(rnn, manifold="torus", sparsity=0.5, total_steps=1)
        >>> [t.name for t in handle.targets]
        ['weight_hh_l0']
        >>> handle.step(); round(handle.sparsity()["weight_hh_l0"], 2)
        0.5
    """
    config = config_from_kwargs(config, **options)
    context = DiscoveryContext(example_inputs, example_kwargs, method)
    targets = discover_targets(model, config.targets, context)
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
