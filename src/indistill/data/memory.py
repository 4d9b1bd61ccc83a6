"""In-memory datasets: uint8 images held as one tensor, augmented per batch.

Small image datasets (digits, Fashion-MNIST, CIFAR) fit in memory as uint8,
so a batch is one gather plus a few tensor ops instead of a per-sample Python
transform pipeline. Augmentation (random crop with zero padding and horizontal
flip) runs on the target device on whole batches; the random draws come from a
CPU ``torch.Generator`` seeded from ``(seed, epoch)`` so CPU and CUDA runs see
identical batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..distributed import shard_bounds
from .base import Batch, DataSplits, Split

__all__ = [
    "InMemorySplit",
    "download_root",
    "epoch_generator",
    "make_in_memory_splits",
    "mean_std",
    "pad_images",
    "resize_images",
    "search_dirs",
    "subset_indices",
]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, epoch, stream)``.

    ``SeedSequence`` mixes the three numbers, so nearby seeds and epochs give
    unrelated streams (``seed + epoch`` would make seed 1 epoch 0 equal seed 0
    epoch 1).
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF, int(stream)])
    return torch.Generator().manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))


def subset_indices(labels: torch.Tensor, k: int | None, seed: int = 0) -> torch.Tensor:
    """Indices (sorted) of a seeded, class-stratified subset of size ``k``.

    Falls back to a plain seeded choice when stratification is impossible
    (``k`` smaller than the number of classes, or a class with one sample).
    ``None`` or ``k >= len(labels)`` keeps everything.
    """
    n = int(labels.numel())
    if k is None or k >= n:
        return torch.arange(n)
    if k <= 0:
        raise UserError(f"subset size must be positive, got {k}; use a positive train_subset/test_subset or leave it unset")
    y = labels.numpy()
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if k >= len(counts) and n - k >= len(counts) and counts.min() >= 2:
        from sklearn.model_selection import train_test_split

        chosen, _ = train_test_split(np.arange(n), train_size=k, random_state=seed, stratify=y)
        return torch.from_numpy(np.sort(chosen)).long()
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def pad_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad uint8 ``(N, C, H, W)`` images symmetrically to ``size x size``."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinearly resize uint8 ``(N, C, H, W)`` images to ``size x size`` (once, at load time)."""
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (sample) std of uint8 images in [0, 1] units.

    Computed exactly in float64 from a 256-bin histogram per channel, so a
    60000-image set needs no float copy of the pixels.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        m = (counts * values).sum() / n
        var = (counts * (values - m) ** 2).sum() / (n - 1)
        means.append(float(m))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


class _Storage:
    """Images and labels shared by several splits, with one copy per device.

    Also caches the zero-padded images of augmented splits as a view of all
    crop windows, so a batch's sample selection and crop are one gather.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._windows: dict[tuple[torch.device, int], torch.Tensor] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device.type == "cpu":
            return self.images, self.labels
        if device not in self._on:
            self._on[device] = (self.images.to(device), self.labels.to(device))
        return self._on[device]

    def windows(self, device: torch.device, pad: int) -> torch.Tensor:
        """``(N, C, 2p+1, 2p+1, H, W)`` view: window ``[i, :, dy, dx]`` is image ``i``'s crop at offset (dy, dx)."""
        key = (device, pad)
        if key not in self._windows:
            images = self.on(device)[0]
            h, w = images.shape[-2:]
            self._windows[key] = F.pad(images, (pad, pad, pad, pad)).unfold(2, h, 1).unfold(3, w, 1)
        return self._windows[key]


class InMemorySplit(Split):
    """A split backed by uint8 ``(N, C, H, W)`` images and int64 labels in memory.

    Args:
        images: uint8 tensor ``(N, C, H, W)``.
        labels: int64 tensor ``(N,)``.
        mean, std: per-channel normalisation in [0, 1] pixel units.
        pad: random-crop padding in pixels (0 disables cropping).
        flip: random horizontal flip with probability 1/2.

    ``batches(..., rank=r, world=k)`` yields rank ``r``'s rows of every global batch, one batch per
    global batch (empty for some ranks when it holds fewer than ``k`` samples; see
    :func:`indistill.distributed.shard_batches`); the permutation and augmentation draws are the
    whole epoch's, so a sample looks the same whichever rank trains on it.
    """

    shardable = True

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        pad: int = 0,
        flip: bool = False,
        _storage: _Storage | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        labels = labels.long()
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        c = images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} channels, got {len(mean)}/{len(std)}")
        self._storage = _storage if _storage is not None else _Storage(images.contiguous(), labels.contiguous())
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pad = int(pad)
        self.flip = bool(flip)

    @property
    def labels(self) -> torch.Tensor:
        return self._storage.labels

    @property
    def images(self) -> torch.Tensor:
        """The raw uint8 images, in index order."""
        return self._storage.images

    @property
    def augment(self) -> bool:
        return self.pad > 0 or self.flip

    def view(self, *, pad: int = 0, flip: bool = False) -> InMemorySplit:
        """The same images (shared memory) with other augmentation settings."""
        return InMemorySplit(self.images, self.labels, self.mean, self.std, pad=pad, flip=flip, _storage=self._storage)

    def plan(self, *, shuffle: bool, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The epoch's order and augmentation draws: ``(order, dy, dx, flip)`` on CPU.

        Drawn for the whole epoch at once so batch ``i`` does not depend on how
        many batches were consumed before it.
        """
        n = len(self)
        g = epoch_generator(seed, epoch)
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        dy = dx = fl = None
        if self.pad > 0:
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        if self.flip:
            fl = torch.rand(n, generator=g) < 0.5
        return order, dy, dx, fl

    def _iterate(self, batch_size: int, shuffle: bool, seed: int, epoch: int, device: torch.device,
                 drop_last: bool, rank: int, world: int) -> Iterator[Batch]:
        if device.type == "cuda" and device.index is None:
            # "cuda" and "cuda:0" must share one cached copy of the images.
            device = torch.device("cuda", torch.cuda.current_device())
        images, labels = self._storage.on(device)
        windows = self._storage.windows(device, self.pad) if self.pad > 0 else None
        order, dy, dx, fl = self.plan(shuffle=shuffle, seed=seed, epoch=epoch)
        order_dev = order.to(device)
        if dy is not None and dx is not None:
            dy, dx = dy.to(device), dx.to(device)
        # Normalisation folded into one multiply-add: x/255 -> (x/255 - mean)/std.
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], device=device).view(1, -1, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], device=device).view(1, -1, 1, 1)
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        # A CPU batch is a few ~100k-element ops: too small to gain from intra-op threads, and on a
        # shared CPU their OpenMP barriers stall for whole time slices (many times slower with 2 threads
        # on a loaded 2-core machine). Results do not depend on the thread count.
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        for first in range(0, stop, batch_size):
            start, end = first, min(first + batch_size, n)
            if world > 1:  # empty for some ranks when the batch has fewer than `world` samples
                lo, hi = shard_bounds(end - start, rank, world)
                start, end = first + lo, first + hi
            if threads > 1:
                torch.set_num_threads(1)
            try:
                idx = order_dev[start:end]
                if windows is not None:
                    x = windows[idx, :, dy[start:end], dx[start:end]]
                else:
                    x = images[idx]
                if fl is not None:
                    # Flip decisions live on CPU, so finding the flipped rows never syncs the device.
                    rows = fl[start:end].nonzero().squeeze(1).to(device)
                    x[rows] = x[rows].flip(-1)
                batch = Batch(torch.addcmul(shift, x, scale), labels[idx], idx)
            finally:
                if threads > 1:
                    torch.set_num_threads(threads)  # the model's compute keeps the caller's setting
            yield batch


def make_in_memory_splits(
    name: str,
    num_classes: int,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pad: int = 0,
    flip: bool = False,
    train_subset: int | None = None,
    test_subset: int | None = None,
    source: str | None = None,
) -> DataSplits:
    """Build train (augmented), train_eval and test splits from uint8 tensors.

    ``mean``/``std`` default to the statistics of the full training images
    (computed before any subset, so a subset sees the same normalisation).
    ``source`` is recorded as ``DataSplits.source`` (the folder the data came from).
    """
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"train images {tuple(train_images.shape[1:])} and test images {tuple(test_images.shape[1:])} differ")
    if train_images.shape[-1] != train_images.shape[-2]:
        raise ValueError(f"images must be square, got {tuple(train_images.shape[-2:])}")
    if mean is None or std is None:
        mean, std = mean_std(train_images)
    train_labels, test_labels = train_labels.long(), test_labels.long()
    for what, y in (("train", train_labels), ("test", test_labels)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise UserError(
                f"{name}: {what} labels span {int(y.min())}..{int(y.max())}, expected 0..{num_classes - 1}; the data files are corrupt"
            )
    keep = subset_indices(train_labels, train_subset)
    train = InMemorySplit(train_images[keep], train_labels[keep], mean, std, pad=pad, flip=flip)
    keep = subset_indices(test_labels, test_subset)
    test = InMemorySplit(test_images[keep], test_labels[keep], mean, std)
    return DataSplits(
        name=name,
        num_classes=num_classes,
        in_channels=int(train_images.shape[1]),
        image_size=int(train_images.shape[-1]),
        train=train,
        train_eval=train.view(),
        test=test,
        source=source,
    )


def search_dirs(root: str | os.PathLike | None, subdirs: Sequence[str] = (), system: Sequence[str] = ()) -> list[Path]:
    """Directories to look for on-disk data in, in order, without duplicates.

    An explicit ``root`` is authoritative: only it and its ``subdirs`` are
    searched, so a typo in ``data.root`` fails instead of silently training on
    another copy. Without a root the bases are ``$INDISTILL_DATA`` and
    ``./data`` (each as is, then with every one of ``subdirs`` appended),
    followed by the ``system`` directories (read-only installs).
    """
    bases: list[Path] = []
    if root is not None:
        bases.append(Path(root).expanduser())
    else:
        if os.environ.get("INDISTILL_DATA"):
            bases.append(Path(os.environ["INDISTILL_DATA"]).expanduser())
        bases.append(Path("data"))
    out: list[Path] = []
    for base in bases:
        for d in (base, *(base / s for s in subdirs)):
            if d not in out:
                out.append(d)
    if root is None:
        out.extend(Path(s) for s in system if Path(s) not in out)
    return out


def download_root(root: str | os.PathLike | None) -> Path:
    """Where ``download=true`` writes: the explicit root, else ``$INDISTILL_DATA``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("INDISTILL_DATA") or "data").expanduser()
