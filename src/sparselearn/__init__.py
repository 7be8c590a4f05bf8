"""sparselearn: train sparse neural networks in PyTorch.

The public API re-exports the core; the experiment layer (models, datasets, recipes, the CLI) lives in
``sparselearn.experiments`` and is imported explicitly.
"""
from .core import *  # noqa: F401,F403
from .core import __all__  # noqa: F401

__version__ = "0.1.0"
