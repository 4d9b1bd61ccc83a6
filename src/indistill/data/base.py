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

from ..errors import UserError
from ..registry import Registry


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor


class Split(ABC):
    """One view of a dataset.

    ``shardable``: ``batches(..., rank=r, world=k)`` yields only rank ``r``'s rows of every global
    batch (loading only those); a split that cannot leaves it False and the caller slices each
    whole batch instead (:func:`indistill.distributed.shard_batches`).

    A split implements :attr:`labels` and :meth:`_iterate`, which :meth:`batches` calls with its
    arguments checked (or overrides :meth:`batches` whole).
    """

    shardable: bool = False

    @property
    @abstractmethod
    def labels(self) -> torch.Tensor:
        """All labels of the split, int64 on CPU, in index order."""

    def __len__(self) -> int:
        return int(self.labels.numel())

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[Batch]:
        """Iterate over the split once; order and augmentation depend only on (seed, epoch).

        With ``world > 1`` a :attr:`shardable` split yields rank ``rank``'s rows of each global batch.
        """
        if batch_size <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}")
        return self._iterate(batch_size, shuffle, seed, epoch, torch.device(device), drop_last, rank, world)

    def _iterate(self, batch_size: int, shuffle: bool, seed: int, epoch: int, device: torch.device,
                 drop_last: bool, rank: int, world: int) -> Iterator[Batch]:
        """:meth:`batches`, its arguments checked (``batch_size`` positive, ``device`` a ``torch.device``)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _iterate() nor batches()")

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

    def __post_init__(self) -> None:
        # One class makes every prediction right and every retrieved image relevant: top-1 and mAP read
        # 100 while nothing was learnt.
        if self.num_classes < 2:
            raise UserError(f"{self.name}: {self.num_classes} class{'es' if self.num_classes != 1 else ''}; "
                            f"classification and retrieval need at least 2 (one folder per class)")
        present = int(torch.unique(self.train.labels).numel()) if len(self.train) else 0
        if present < 2:
            raise UserError(f"{self.name}: the training split holds images of {present} class"
                            f"{'es' if present != 1 else ''}; it needs at least 2 (raise data.train_subset)")


def _load_builtin() -> None:
    from . import cifar, digits, fashion_mnist, imagefolder  # noqa: F401  (their decorators register them)


DATASETS: Registry[Callable[..., DataSplits]] = Registry(
    "dataset", loader=_load_builtin, group="indistill.datasets")


def register_dataset(name: str):
    """Decorator: register ``f(root=None, download=False, **kw) -> DataSplits`` (a name taken twice is an error).

    Every loader accepts ``train_subset``, ``test_subset`` and ``num_workers``
    (ignored by in-memory datasets), so callers can pass them uniformly; a
    dataset's own options come from the config's ``data.kwargs``.
    """
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    return DATASETS.names()


def get_dataset(name: str, root: str | None = None, download: bool = False, **kw: Any) -> DataSplits:
    """Load a registered dataset by name (a missing one raises a one-line ``UserError``)."""
    return DATASETS.get(name)(root=root, download=download, **kw)
