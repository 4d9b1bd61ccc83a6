"""``imagefolder`` / ``imagenet``: class-per-folder image trees decoded on the fly.

Layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (``test/``
is accepted for ``val``). Images go through the standard ImageNet transforms
in DataLoader workers. Each sample's random transform is seeded from
``(seed, epoch, index)``, so augmentation does not depend on the number of
workers or on which worker decodes which image.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..distributed import shard_bounds
from ..errors import UserError
from .base import Batch, DataSplits, Split, register_dataset
from .memory import epoch_generator, search_dirs, subset_indices

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """RandomResizedCrop + horizontal flip + normalise (the standard ImageNet training view)."""
    from torchvision import transforms as T

    return T.Compose(
        [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    )


def eval_transform(image_size: int, resize: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Resize + center crop + normalise (the standard ImageNet evaluation view)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


class IndexedImages(Dataset):
    """``(path, label)`` samples -> ``(image, label, index)``; random transforms seeded per sample."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, random: bool) -> None:
        from torchvision.datasets.folder import default_loader

        self.samples = samples
        self.transform = transform
        self.random = random
        self.loader = default_loader
        self.seed = 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        path, label = self.samples[i]
        try:
            img = self.loader(path)
        except Exception as e:  # PIL raises several types for unreadable images
            detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            # `from None`: in a worker the whole chain would be formatted into the re-raised message.
            raise UserError(f"cannot read image {path} ({type(e).__name__}: {detail}); remove or replace the file") from None
        if not self.random:
            return self.transform(img), label, i
        seq = np.random.SeedSequence([self.seed & 0xFFFFFFFF, self.epoch & 0xFFFFFFFF, i])
        # fork_rng keeps the caller's global RNG untouched (matters with num_workers=0).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> 1))
            x = self.transform(img)
        return x, label, i


# The last line of a worker's formatted traceback: "indistill.errors.UserError: <message>".
_WORKER_USER_ERROR = re.compile(r"^(?:[\w.]+\.)?UserError: (.*)$")


def _worker_message(e: UserError) -> str:
    """The original one-line message of a ``UserError`` a DataLoader worker raised.

    torch re-raises a worker's exception in the main process as the same type
    but with the worker's whole traceback as its message; the CLI would print
    all of it after ``error:``. The original message is the traceback's last
    ``UserError:`` line.
    """
    text = str(e)
    if "Original Traceback" not in text:
        return text
    for line in reversed(text.splitlines()):
        m = _WORKER_USER_ERROR.match(line.strip())
        if m:
            return m.group(1)
    return text.strip().splitlines()[-1]


class FolderSplit(Split):
    """A split that decodes images from disk through a ``DataLoader``.

    ``batches(..., rank=r, world=k)`` loads only rank ``r``'s rows of every global batch of the
    epoch's permutation (one batch per global batch, empty when it holds fewer than ``k`` samples) (a batch sampler that plays ``DistributedSampler``'s part while keeping
    the global batches of a single-process run); per-sample seeds make the augmentation the same.
    """

    shardable = True

    def __init__(self, dataset: IndexedImages, num_workers: int = 4) -> None:
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self._labels = torch.tensor([y for _, y in dataset.samples], dtype=torch.long)

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

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
        if batch_size <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}")
        device = torch.device(device)
        # A copy per call: concurrent iterations with other (seed, epoch) must not interfere.
        ds = copy.copy(self.dataset)
        ds.seed, ds.epoch = int(seed), int(epoch)
        n = len(ds)
        order = torch.randperm(n, generator=epoch_generator(seed, epoch)) if shuffle else torch.arange(n)
        if world > 1:
            stop = n - n % batch_size if drop_last else n
            groups = [order[s: min(s + batch_size, n)].tolist() for s in range(0, stop, batch_size)]
            # An empty slice (a global batch smaller than `world`) collates to None: yielded as an empty batch.
            batching: dict[str, Any] = {"batch_sampler": [g[slice(*shard_bounds(len(g), rank, world))] for g in groups],
                                        "collate_fn": _collate_or_none}
        else:
            batching = {"batch_size": batch_size, "sampler": order.tolist(), "drop_last": drop_last}
        loader = DataLoader(
            ds,
            **batching,
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
            # Without its own generator the DataLoader draws worker seeds from the global RNG.
            generator=epoch_generator(seed, epoch, stream=1),
        )
        it = iter(loader)
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except UserError as e:
                raise UserError(_worker_message(e)) from None
            if item is None:
                empty = torch.empty(0, dtype=torch.long, device=device)
                yield Batch(torch.empty(0, device=device), empty, empty)
                continue
            x, y, idx = item
            yield Batch(
                x.to(device, non_blocking=True),
                y.to(device, non_blocking=True),
                idx.to(device, non_blocking=True),
            )


def _collate_or_none(samples: list[Any]) -> Any:
    from torch.utils.data import default_collate

    return default_collate(samples) if samples else None


def _scan(root: Path, name: str) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Class names, train samples and val/test samples of an ImageFolder-style tree."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    train_dir = root / "train"
    eval_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        raise UserError(f"{name}: {root} needs train/<class>/ and val/<class>/ image folders; point root at such a directory")
    try:
        classes, class_to_idx = find_classes(str(train_dir))
        train = make_dataset(str(train_dir), class_to_idx, IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise UserError(f"{name}: no usable class folders/images under {train_dir} ({e}); add train/<class>/*.jpg") from e
    extra = sorted({p.name for p in eval_dir.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise UserError(f"{name}: {eval_dir} has classes missing from train/: {', '.join(extra[:5])}; use the same class folders")
    test = make_dataset(str(eval_dir), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    if not test:
        raise UserError(f"{name}: no images under {eval_dir}; add {eval_dir.name}/<class>/*.jpg")
    return classes, train, test


def build_folder_splits(
    name: str,
    root: Path,
    *,
    image_size: int = 224,
    resize: int | None = None,
    num_workers: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> DataSplits:
    """Build train / train_eval / test ``FolderSplit``s from ``root/train`` and ``root/val``.

    ``num_workers`` DataLoader processes decode the images (0: in the calling
    process; None: ``min(4, cpu_count)``).
    """
    if image_size <= 0 or (resize is not None and resize < image_size):
        raise UserError(f"{name}: need 0 < image_size <= resize, got image_size={image_size}, resize={resize}")
    resize = resize if resize is not None else round(image_size / 0.875)
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"{name}: num_workers must be an integer >= 0, got {num_workers!r}; set data.num_workers")
    classes, train, test = _scan(root, name)

    def pick(samples: list[tuple[str, int]], k: int | None) -> list[tuple[str, int]]:
        keep = subset_indices(torch.tensor([y for _, y in samples], dtype=torch.long), k)
        return [samples[i] for i in keep.tolist()]

    train, test = pick(train, train_subset), pick(test, test_subset)
    ev = eval_transform(image_size, resize, mean, std)
    return DataSplits(
        name=name,
        num_classes=len(classes),
        in_channels=3,
        image_size=image_size,
        train=FolderSplit(IndexedImages(train, train_transform(image_size, mean, std), True), num_workers),
        train_eval=FolderSplit(IndexedImages(train, ev, False), num_workers),
        test=FolderSplit(IndexedImages(test, ev, False), num_workers),
        source=str(root.resolve()),
    )


_OPTIONS = ("image_size", "resize", "num_workers", "mean", "std", "train_subset", "test_subset")


def _check_options(name: str, kw: dict) -> None:
    unknown = sorted(set(kw) - set(_OPTIONS))
    if unknown:
        raise UserError(f"{name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(_OPTIONS)}")


@register_dataset("imagefolder")
def imagefolder(root: str | None = None, download: bool = False, *, num_workers: int | None = None, **kw: Any) -> DataSplits:
    """Any ``root/train/<class>/`` + ``root/val/<class>/`` tree; classes come from the folder names.

    Options: image_size (224), resize (image_size/0.875), num_workers (DataLoader
    processes; None: min(4, cpus)), mean, std, train_subset, test_subset.
    """
    _check_options("imagefolder", kw)
    if root is None:
        raise UserError("imagefolder needs root=<directory with train/<class>/ and val/<class>/>")
    if download:
        raise UserError("imagefolder cannot be downloaded; set download=false and point root at your images")
    return build_folder_splits("imagefolder", Path(root).expanduser(), num_workers=num_workers, **kw)


@register_dataset("imagenet")
def imagenet(root: str | None = None, download: bool = False, *, num_workers: int | None = None, **kw: Any) -> DataSplits:
    """ImageNet (ILSVRC-2012) in ImageFolder layout: an explicit root (or its imagenet/,
    ILSVRC2012/ subfolder), else the usual data search order. ``num_workers`` as for imagefolder."""
    _check_options("imagenet", kw)
    if download:
        raise UserError("ImageNet cannot be downloaded automatically; get it from image-net.org and set root to a dir with train/ and val/")
    dirs = search_dirs(root, ("imagenet", "ILSVRC2012"), ("/usr/share/datasets/imagenet",))
    found = next((d for d in dirs if (d / "train").is_dir()), None)
    if found is None:
        looked = ", ".join(str(d) for d in dirs)
        if root is not None:
            raise UserError(
                f"imagenet: data.root {root} has no train/ folder (looked in {looked}); set data.root to a dir with "
                "train/<wnid>/ and val/<wnid>/, or unset it to use the default search"
            )
        raise UserError(
            f"ImageNet not found (no train/ in {looked}); "
            "set root to a dir with train/<wnid>/ and val/<wnid>/ (val sorted into class folders)"
        )
    return build_folder_splits("imagenet", found, num_workers=num_workers, **kw)
