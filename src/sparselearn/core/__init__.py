"""The sparselearn core: knows torch and nothing else of ours."""
from .algorithms import ABLATIONS, dynamic_sparse, sparse_momentum, static_sparse
from .distributions import density_distributions
from .dynamic import DynamicUpdater
from .grow import grow_strategies
from .prune import prune_strategies
from .redistribute import redistribute_strategies
from .registry import Registry
from .schedules import prune_rate_schedules
from .sparsifier import LayerView, Sparsifier

__all__ = [
    "ABLATIONS", "DynamicUpdater", "LayerView", "Registry", "Sparsifier", "density_distributions", "dynamic_sparse",
    "grow_strategies", "prune_rate_schedules", "prune_strategies", "redistribute_strategies", "sparse_momentum",
    "static_sparse",
]
