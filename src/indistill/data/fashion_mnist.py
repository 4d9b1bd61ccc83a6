"""``fashion_mnist``: Fashion-MNIST read straight from its IDX files.

The four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
``.gz``) are parsed with numpy: no per-sample PIL objects, the whole set is a
60000x1x32x32 uint8 tensor (28x28 zero-padded to 32x32).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .base import DataSplits, register_dataset
from .memory import download_root, make_in_memory_splits, pad_images, search_dirs

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SUBDIRS = ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw")
SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)

# IDX type codes -> numpy big-endian dtypes.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a numpy array.

    The magic number (two zero bytes, a type code, the number of dimensions),
    the dimensions and the payload length are checked; any mismatch or a
    truncated gzip stream raises ``UserError`` naming the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except OSError as e:  # BadGzipFile is an OSError
        raise UserError(f"cannot read IDX file {path}: {e}; re-download it (download=true) or reinstall the dataset") from e
    except (EOFError, zlib.error) as e:
        raise UserError(f"IDX file {path} is truncated or corrupt ({e}); re-download it (download=true) or reinstall the dataset") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise UserError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}); re-download it (download=true)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"IDX file {path} is truncated inside its header; re-download it (download=true)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise UserError(
            f"IDX file {path} has {len(raw)} bytes but its header {shape} needs {expected}; "
            "the file is truncated or corrupt, re-download it (download=true)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(root: str | None = None) -> Path | None:
    """The first directory in the search order holding all four IDX files, or None."""
    for d in search_dirs(root, SUBDIRS, SYSTEM_DIRS):
        if all(_find_file(d, stem) is not None for stem in FILES.values()):
            return d
    return None


def load_idx_dir(directory: str | Path) -> dict[str, np.ndarray]:
    """Read and cross-check the four Fashion-MNIST IDX files of ``directory``."""
    directory = Path(directory)
    arrays = {}
    for key, stem in FILES.items():
        path = _find_file(directory, stem)
        if path is None:
            raise UserError(f"{directory} lacks {stem}[.gz]; re-download Fashion-MNIST (download=true)")
        arr = read_idx(path)
        want_ndim = 3 if key.endswith("images") else 1
        if arr.ndim != want_ndim or arr.dtype != np.uint8:
            raise UserError(f"{path}: expected a {want_ndim}-d uint8 IDX array, got {arr.ndim}-d {arr.dtype}; re-download it")
        arrays[key] = arr
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise UserError(f"{directory}: {n_img} {split} images but {n_lab} labels; the files do not belong together, re-download them")
    return arrays


def _download(root: str | None) -> Path:
    target = download_root(root)
    try:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(target), train=train, download=True)
    except Exception as e:  # network, disk or checksum failures all end the same way for the user
        raise UserError(f"downloading Fashion-MNIST into {target} failed ({e}); install it with `apt-get install dataset-fashion-mnist`") from e
    return target / "FashionMNIST" / "raw"


@register_dataset("fashion_mnist")
def fashion_mnist(
    root: str | None = None,
    download: bool = False,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    **kw: Any,
) -> DataSplits:
    """Fashion-MNIST: 10 classes, 1 channel, 28x28 zero-padded to 32x32; random crop (pad 4) + flip.

    ``num_workers`` is accepted (and ignored: the images are decoded once, in memory).
    """
    kw.pop("num_workers", None)
    if kw:
        raise UserError(f"fashion_mnist: unknown option(s) {', '.join(sorted(kw))}; known: train_subset, test_subset, num_workers")
    directory = find_fashion_mnist(root)
    if directory is None:
        if not download:
            looked = ", ".join(str(d) for d in search_dirs(root, SUBDIRS, SYSTEM_DIRS))
            if root is not None:
                # An explicit root is authoritative: name what was expected there.
                raise UserError(
                    f"fashion_mnist: data.root {root} lacks the IDX files {', '.join(f + '[.gz]' for f in FILES.values())} "
                    f"(looked in {looked}); put them there, set download=true, or unset data.root to use the default search"
                )
            raise UserError(
                f"Fashion-MNIST not found (looked in {looked}); "
                "install it with `apt-get install dataset-fashion-mnist`, or pass download=true"
            )
        directory = _download(root)
    a = load_idx_dir(directory)

    def images(arr: np.ndarray) -> torch.Tensor:
        return pad_images(torch.from_numpy(arr.copy()).unsqueeze(1), 32)

    return make_in_memory_splits(
        "fashion_mnist",
        10,
        images(a["train_images"]),
        torch.from_numpy(a["train_labels"].astype(np.int64)),
        images(a["test_images"]),
        torch.from_numpy(a["test_labels"].astype(np.int64)),
        pad=4,
        flip=True,
        train_subset=train_subset,
        test_subset=test_subset,
        source=str(Path(directory).resolve()),
    )
