"""The sparselearn core: knows torch and nothing else of ours."""
from .algorithms import (
    ABLATIONS, algorithms, dynamic_sparse, gmp, gradual_pruning, rigl, set_algorithm, sparse_momentum, starfire,
    static_sparse,
)
from .baselines import DSRUpdater, DeepRUpdater, deepr, dsr, snip
from .gradual import GradualUpdater
from .distributions import density_distributions
from .dynamic import DynamicUpdater
from .grow import grow_strategies
from .prune import prune_strategies
from .redistribute import redistribute_strategies
from .registry import Registry
from .schedules import prune_rate_schedules
from .sparsifier import LayerView, Sparsifier

__all__ = [
    "ABLATIONS", "DSRUpdater", "DeepRUpdater", "deepr", "dsr", "snip", "algorithms", "DynamicUpdater", "GradualUpdater", "gmp", "gradual_pruning", "rigl",
    "set_algorithm", "starfire", "LayerView", "Registry", "Sparsifier", "density_distributions", "dynamic_sparse",
    "grow_strategies", "prune_rate_schedules", "prune_strategies", "redistribute_strategies", "sparse_momentum",
    "static_sparse",
]
