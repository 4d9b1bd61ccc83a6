"""``digits``: scikit-learn's embedded 8x8 handwritten digits, upsampled to 32x32.

Ships with scikit-learn, so it needs no download: the default dataset for the
demo and the tests. 1797 images, a fixed stratified 1437/360 train/test split.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from .base import DataSplits, register_dataset
from .memory import make_in_memory_splits, resize_images

TEST_SIZE = 360
IMAGE_SIZE = 32


def load_digits_uint8(image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as uint8 ``(N, 1, S, S)`` (0..16 scaled to 0..255) and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().mul_(255.0 / 16.0).round_().to(torch.uint8).unsqueeze(1)
    if image_size != x.shape[-1]:
        x = resize_images(x, image_size)
    return x, torch.from_numpy(bunch.target).long()


def sklearn_digits_source() -> str:
    """The folder scikit-learn's embedded ``digits.csv.gz`` is read from."""
    from importlib import resources

    return str(resources.files("sklearn.datasets") / "data")


@register_dataset("digits")
def digits(
    root: str | None = None,
    download: bool = False,
    *,
    image_size: int = IMAGE_SIZE,
    train_subset: int | None = None,
    test_subset: int | None = None,
    **kw: Any,
) -> DataSplits:
    """scikit-learn digits: 10 classes, 1 channel, random crop (pad 2), no flip (digits are not mirror-symmetric).

    ``root``, ``download`` and ``num_workers`` are accepted for a uniform interface
    and ignored: the data is embedded in scikit-learn (``source`` names its folder).
    """
    kw.pop("num_workers", None)
    if kw:
        raise UserError(f"digits: unknown option(s) {', '.join(sorted(kw))}; known: image_size, train_subset, test_subset, num_workers")
    from sklearn.model_selection import train_test_split

    x, y = load_digits_uint8(image_size)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=TEST_SIZE, random_state=0, stratify=y.numpy()
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return make_in_memory_splits(
        "digits",
        10,
        x[train_idx],
        y[train_idx],
        x[test_idx],
        y[test_idx],
        pad=2,
        flip=False,
        train_subset=train_subset,
        test_subset=test_subset,
        source=sklearn_digits_source(),
    )
