"""Locality of a pruned recurrent matrix: are the kept weights the short ones on the manifold?

Moduli regularization penalises ``W_ij`` by the distance of neurons ``i`` and ``j`` on the
manifold, so after pruning the kept weights should join nearby neurons: the mean distance
between the endpoints of the kept weights is below the mean over all pairs. A control
without the geometry (no penalty, plain L1, shuffled coefficients) keeps weights whatever
their length, so its two means agree.

Example:
    >>> from moduli_transform.manifolds import Euclidean
    >>> points = torch.arange(4.0)[:, None]          # four neurons on a line, 1 apart
    >>> mask = torch.ones(4, 4).triu().tril(1).bool()      # each neuron and its right neighbour
    >>> locality(mask, points, points, Euclidean(dim=1))   # (0*4 + 1*3) / 7, 20 / 16
    (0.42857..., 1.25)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from moduli_transform.manifolds import Manifold, get_manifold

from .runner import EMBEDDINGS_FILE, WEIGHTS_FILE, RunConfig, initial_embeddings

__all__ = ["locality", "run_locality"]


def locality(mask: Tensor, rows_embedding: Tensor, cols_embedding: Tensor, manifold: Manifold) -> tuple[float, float]:
    """Mean manifold distance between the endpoints of the kept weights, and over all pairs.

    Args:
        mask: bool ``(out, in)``, or ``(gates * out, in)`` for stacked gate blocks; True = kept.
        rows_embedding: ``(out, dim)`` coordinates of the output neurons (rows of the mask).
        cols_embedding: ``(in, dim)`` coordinates of the input neurons (columns).
        manifold: the manifold whose distance is measured.

    Returns:
        ``(kept_mean, all_mean)``; kept_mean < all_mean means the kept weights are local.
        ``kept_mean`` is NaN when the mask keeps no weight (global pruning can empty a matrix).

    Raises:
        ValueError: the shapes do not fit.
    """
    distances = manifold.distance(rows_embedding, cols_embedding).detach()
    out, inputs = distances.shape
    if mask.dim() != 2 or mask.shape[1] != inputs or mask.shape[0] % out:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit embeddings of {out} rows and {inputs} "
                         f"columns; expected ({out}, {inputs}) or (gates * {out}, {inputs})")
    distances = distances.repeat(mask.shape[0] // out, 1)
    kept = mask.to(torch.bool)
    kept_mean = float(distances[kept].mean()) if kept.any() else math.nan
    return kept_mean, float(distances.mean())


def run_locality(run_dir: str | Path, target: str) -> tuple[float, float]:
    """:func:`locality` of ``target``'s final mask in a run folder, on the embedding it was pruned with.

    The mask is ``mask/<target>`` of ``weights.safetensors``; the embedding is the run's
    initial one (:func:`~moduli_transform.tasks.runner.initial_embeddings`) for fixed
    embeddings, since the lottery may have redrawn the saved one; for trained embeddings
    ``embeddings.safetensors`` (where they ended).

    Raises:
        ValueError: the run has no mask for ``target``, or a trained embedding that the
            lottery redrew (the one it was pruned with is not recorded).
    """
    run_dir = Path(run_dir)
    config = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())["run"])
    masks = {k[len("mask/"):]: v for k, v in load_file(str(run_dir / WEIGHTS_FILE)).items() if k.startswith("mask/")}
    if target not in masks:
        raise ValueError(f"{run_dir} has no mask for {target!r}; masks: {', '.join(masks) or 'none'}")
    if config.embedding == "fixed":
        rows, cols = initial_embeddings(config)[target]
    else:
        redrawn: Any = json.loads((run_dir / "config.json").read_text())["preset"].get("lottery_embedding")
        if config.lottery and (config.lottery_embedding or redrawn) == "redraw":
            raise ValueError(f"{run_dir}: a trained embedding redrawn by the lottery; the one it was pruned "
                             "with is not recorded")
        embeddings = load_file(str(run_dir / EMBEDDINGS_FILE))
        rows, cols = embeddings[f"{target}/rows"], embeddings[f"{target}/cols"]
    return locality(masks[target], rows, cols, get_manifold(config.manifold))
