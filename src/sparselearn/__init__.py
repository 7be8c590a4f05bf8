"""sparselearn: train sparse neural networks in PyTorch.

The public API re-exports the core; experiments (models, datasets, CLI) live in
``sparselearn.experiments`` and are imported explicitly.
"""
from .core import (
    ABLATIONS, DynamicUpdater, LayerView, Registry, Sparsifier, density_distributions, dynamic_sparse, grow_strategies,
    prune_rate_schedules, prune_strategies, redistribute_strategies, sparse_momentum, static_sparse,
)

__version__ = "0.1.0"
__all__ = [
    "ABLATIONS", "DynamicUpdater", "LayerView", "Registry", "Sparsifier", "density_distributions", "dynamic_sparse",
    "grow_strategies", "prune_rate_schedules", "prune_strategies", "redistribute_strategies", "sparse_momentum",
    "static_sparse",
]
