"""Topology update rules: the prune-regrow engine, gradual pruning, DEEP-R, and chains of them."""
from .chain import Chain, chain
from .deepr import DeepRUpdater
from .gradual import GradualUpdater
from .prune_regrow import PerSignDrop, PruneRegrow, RateDrop, ThresholdDrop, allocate_regrowth

__all__ = ["Chain", "DeepRUpdater", "GradualUpdater", "PerSignDrop", "PruneRegrow", "RateDrop", "ThresholdDrop",
           "allocate_regrowth", "chain"]
