"""``cifar10`` / ``cifar100``: torchvision's on-disk python-pickle format.

Layout: ``<base>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
and ``<base>/cifar-100-python/{train, test, meta}``. torchvision reads and
checksums them; a local copy that fails its MD5 check (re-packed, or written by
a test) is read directly from the pickles instead.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .base import DataSplits, register_dataset
from .memory import download_root, make_in_memory_splits, search_dirs


@dataclass(frozen=True)
class _Spec:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# Per-channel statistics of the training images (population std over all pixels).
CIFAR10 = _Spec(
    "cifar10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "labels",
    10,
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
)
CIFAR100 = _Spec(
    "cifar100",
    "cifar-100-python",
    ("train",),
    ("test",),
    "fine_labels",
    100,
    (0.5071, 0.4865, 0.4409),
    (0.2673, 0.2564, 0.2762),
)
SUBDIRS = ("cifar",)
SYSTEM_DIRS = ("/usr/share/datasets", "/usr/share/datasets/cifar")


def find_cifar(spec: _Spec, root: str | None = None) -> Path | None:
    """The first base directory (parent of ``spec.folder``) in the search order, or None."""
    for d in search_dirs(root, SUBDIRS, SYSTEM_DIRS):
        if d.name == spec.folder and d.is_dir():
            return d.parent
        if (d / spec.folder).is_dir():
            return d
    return None


def read_cifar_pickles(folder: str | Path, files: tuple[str, ...], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR pickle batches into uint8 ``(N, 3, 32, 32)`` images and int64 labels.

    Keys may be ``str`` (the original Python 2 pickles loaded as latin1) or
    ``bytes`` (pickles written by Python 3).
    """
    folder = Path(folder)
    xs, ys = [], []
    for name in files:
        path = folder / name
        try:
            with path.open("rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except FileNotFoundError as e:
            raise UserError(f"CIFAR file {path} is missing; re-download the dataset (download=true)") from e
        except Exception as e:  # unpickling raises many types for a damaged file
            raise UserError(f"CIFAR file {path} is corrupt ({type(e).__name__}: {e}); re-download it (download=true)") from e
        if not isinstance(entry, dict):
            raise UserError(f"CIFAR file {path} holds a {type(entry).__name__}, not a batch dict; re-download it (download=true)")
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        if "data" not in entry or label_key not in entry:
            raise UserError(f"CIFAR file {path} lacks 'data' or '{label_key}'; re-download it (download=true)")
        x = np.asarray(entry["data"], dtype=np.uint8)
        y = np.asarray(entry[label_key], dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
            raise UserError(
                f"CIFAR file {path}: data {x.shape} / {len(y)} labels, expected (N, 3072) and N labels; re-download it (download=true)"
            )
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _torchvision_cls(spec: _Spec):
    from torchvision.datasets import CIFAR10 as TV10, CIFAR100 as TV100

    return TV10 if spec.num_classes == 10 else TV100


def _load(spec: _Spec, root: str | None, download: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    base = find_cifar(spec, root)
    cls = _torchvision_cls(spec)
    if base is None:
        if not download:
            looked = ", ".join(str(d) for d in search_dirs(root, SUBDIRS, SYSTEM_DIRS))
            raise UserError(f"{spec.name} not found (no {spec.folder}/ in {looked}); pass download=true or point root at it")
        base = download_root(root)
        try:
            tv = [cls(str(base), train=t, download=True) for t in (True, False)]
        except Exception as e:  # network, disk or checksum failures
            raise UserError(f"downloading {spec.name} into {base} failed ({e}); fetch it by hand into {base / spec.folder}") from e
    else:
        try:
            tv = [cls(str(base), train=t, download=False) for t in (True, False)]
        except RuntimeError:
            # Failed MD5 check on a local copy: trust the pickles if they parse.
            tv = None
        if tv is None:
            folder = base / spec.folder
            x_tr, y_tr = read_cifar_pickles(folder, spec.train_files, spec.label_key)
            x_te, y_te = read_cifar_pickles(folder, spec.test_files, spec.label_key)
            return x_tr, y_tr, x_te, y_te
    # torchvision keeps images as (N, 32, 32, 3) HWC.
    tr, te = tv
    return (
        np.ascontiguousarray(tr.data.transpose(0, 3, 1, 2)),
        np.asarray(tr.targets, dtype=np.int64),
        np.ascontiguousarray(te.data.transpose(0, 3, 1, 2)),
        np.asarray(te.targets, dtype=np.int64),
    )


def _splits(spec: _Spec, root: str | None, download: bool, train_subset: int | None, test_subset: int | None, kw: dict) -> DataSplits:
    if kw:
        raise UserError(f"{spec.name}: unknown option(s) {', '.join(sorted(kw))}; known: train_subset, test_subset")
    x_tr, y_tr, x_te, y_te = _load(spec, root, download)
    return make_in_memory_splits(
        spec.name,
        spec.num_classes,
        torch.from_numpy(x_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(x_te),
        torch.from_numpy(y_te),
        mean=spec.mean,
        std=spec.std,
        pad=4,
        flip=True,
        train_subset=train_subset,
        test_subset=test_subset,
    )


@register_dataset("cifar10")
def cifar10(
    root: str | None = None,
    download: bool = False,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    **kw: Any,
) -> DataSplits:
    """CIFAR-10: 10 classes, 3x32x32, standard mean/std; random crop (pad 4) + flip."""
    return _splits(CIFAR10, root, download, train_subset, test_subset, kw)


@register_dataset("cifar100")
def cifar100(
    root: str | None = None,
    download: bool = False,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    **kw: Any,
) -> DataSplits:
    """CIFAR-100 (fine labels): 100 classes, 3x32x32, standard mean/std; random crop (pad 4) + flip."""
    return _splits(CIFAR100, root, download, train_subset, test_subset, kw)
