"""Dataset interface: three views (train / train_eval / test) that yield batches.

``train`` is augmented; ``train_eval`` is the same images without augmentation
(the retrieval database); ``test`` gives the queries and the top-1 split.
Batches are ``Batch(images, labels, index)``: float images already normalised
and on the requested device, int64 labels, and the int64 index of each sample
in its split (CRD's memory bank needs it).

Data order is a pure function of ``(seed, epoch)`` so a resumed run sees
exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..errors import UserError, suggest


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


class Split(ABC):
    """One view of a dataset."""

    @property
    @abstractmethod
    def labels(self) -> torch.Tensor:
        """All labels of the split, int64 on CPU, in index order."""

    def __len__(self) -> int:
        return int(self.labels.numel())

    @abstractmethod
    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Iterate over the split once; order and augmentation depend only on (seed, epoch)."""

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)


@dataclass
class DataSplits:
    """A dataset's three views plus what a model needs to know about it.

    ``source`` is the folder (or file) the data was actually read from, so a
    result can say which copy it was computed on; None where there is none.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train: Split
    train_eval: Split
    test: Split
    source: str | None = None


_DATASETS: dict[str, Callable[..., DataSplits]] = {}


def register_dataset(name: str):
    """Decorator: register ``f(root=None, download=False, **kw) -> DataSplits``.

    Every loader accepts ``train_subset``, ``test_subset`` and ``num_workers``
    (ignored by in-memory datasets), so callers can pass them uniformly.
    """

    def deco(fn: Callable[..., DataSplits]):
        _DATASETS[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def get_dataset(name: str, root: str | None = None, download: bool = False, **kw: Any) -> DataSplits:
    """Load a registered dataset by name (a missing one raises a one-line ``UserError``)."""
    if name not in _DATASETS:
        raise UserError(f"unknown dataset '{name}'{suggest(name, _DATASETS)}; known: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name](root=root, download=download, **kw)
