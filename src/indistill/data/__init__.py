"""Datasets: registry plus the built-in loaders (importing this module registers them).

``get_dataset(name, root=None, download=False, **kw)`` returns a ``DataSplits``
with ``train`` (augmented), ``train_eval`` and ``test`` views; every view's
``batches(...)`` yields ``Batch(images, labels, index)`` on the requested device.
"""

from __future__ import annotations

from . import cifar, digits, fashion_mnist, imagefolder  # noqa: F401  (registration)
from .base import Batch, DataSplits, Split, get_dataset, list_datasets, register_dataset
from .memory import InMemorySplit

__all__ = [
    "Batch",
    "DataSplits",
    "InMemorySplit",
    "Split",
    "get_dataset",
    "list_datasets",
    "register_dataset",
]
