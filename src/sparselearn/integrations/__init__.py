"""Trainer integrations: callbacks that drive a :class:`~sparselearn.core.sparsifier.Sparsifier` inside
PyTorch Lightning and the Hugging Face ``Trainer`` and keep its state in their checkpoints.

Each lives in its own module and imports its framework only when that module is imported, so
``import sparselearn`` (and this package) never pulls in Lightning or transformers::

    from sparselearn.integrations.lightning import SparsityCallback   # pip install 'sparselearn[lightning]'
    from sparselearn.integrations.hf import SparsityCallback          # pip install 'sparselearn[hf]'
"""
