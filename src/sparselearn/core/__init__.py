"""The sparselearn core: knows torch and nothing else of ours."""
from .algorithms import (
    ABLATIONS, AlgorithmSpec, algorithms, deepr, dsr, dsr_rule, dynamic_rule, dynamic_sparse, gmp, gradual_pruning,
    rigl, rigl_rule, set_algorithm, set_rule, snip, sparse_momentum, sparse_momentum_rule, starfire, static_sparse,
)
from .distributions import density_distributions
from .layer import LayerView
from .redistribute import redistributions
from .registry import Registry
from .schedules import prune_rate_schedules
from .scores import drop_scores, grow_scores
from .sparsifier import Sparsifier
from .structure import structures
from .triggers import Adaptive, Always, Era, Every
from .updaters import Chain, DeepRUpdater, GradualUpdater, PruneRegrow, chain

__all__ = [
    "ABLATIONS", "Adaptive", "AlgorithmSpec", "Always", "Chain", "DeepRUpdater", "Era", "Every", "GradualUpdater",
    "LayerView", "PruneRegrow", "Registry", "Sparsifier", "algorithms", "chain", "deepr", "density_distributions",
    "drop_scores", "dsr", "dsr_rule", "dynamic_rule", "dynamic_sparse", "gmp", "gradual_pruning", "grow_scores",
    "prune_rate_schedules", "redistributions", "rigl", "rigl_rule", "set_algorithm", "set_rule", "snip",
    "sparse_momentum", "sparse_momentum_rule", "starfire", "static_sparse", "structures",
]
