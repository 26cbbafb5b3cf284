"""moduli-transform: geometric sparsification (moduli regularization) for any PyTorch RNN.

    import moduli_transform as mt
    handle = mt.attach(model, manifold="torus", sparsity=0.9, total_steps=1000)
"""

from .targets import Target
from .discovery import discover_targets, register_finder, NoTargetsError
from .manifolds import Manifold, get_manifold, register_manifold
from .inhibitors import Inhibitor, get_inhibitor, register_inhibitor
from .regularizer import ModuliRegularizer
from .schedules import get_schedule, register_schedule
from .pruning import MagnitudeSparsifier
from .config import ModuliConfig
from .handle import ModuliHandle
from .api import attach

__all__ = [
    "Target", "discover_targets", "register_finder", "NoTargetsError",
    "Manifold", "get_manifold", "register_manifold",
    "Inhibitor", "get_inhibitor", "register_inhibitor",
    "ModuliRegularizer",
    "get_schedule", "register_schedule", "MagnitudeSparsifier",
    "ModuliConfig", "ModuliHandle", "attach",
]

__version__ = "0.1.0"
