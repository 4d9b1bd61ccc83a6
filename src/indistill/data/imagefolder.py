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

    def _iterate(self, batch_size: int, shuffle: bool, seed: int, epoch: int, device: torch.device,
                 drop_last: bool, rank: int, world: int) -> Iterator[Batch]:
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


def _inside(path: str, base: str) -> bool:
    """``path`` is ``base`` or below it (both real paths)."""
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


class _FolderWalk:
    """Reads the class folders of one split without following a directory symlink out of the dataset root,
    into the other split, into another class's folder, or back up the tree (a loop); each real directory is
    read once. Symlinked image *files* are read where they point (a subset linked from a full copy is common,
    and a file link can neither loop nor pull in a tree). What was not followed is in ``skipped``."""

    def __init__(self, root: Path, split_dir: Path, other_split: Path | None):
        self.root = os.path.realpath(root)
        self.split = os.path.realpath(split_dir)
        self.other = os.path.realpath(other_split) if other_split is not None else None
        self.skipped: list[str] = []

    def _forbidden(self, real: str, own: str, others: list[str]) -> bool:
        if not _inside(real, self.root) or _inside(own, real) or _inside(self.split, real):
            return True  # out of the root, or the class folder itself / one above it: a loop
        if self.other is not None and (_inside(real, self.other) or _inside(self.other, real)):
            return True  # the other split's images (test images in training)
        return any(_inside(real, o) or _inside(o, real) for o in others)  # another class's images

    def classes(self, split_dir: Path) -> list[tuple[str, str]]:
        """``(name, path)`` of the split's class folders, sorted by name."""
        out = []
        for e in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if not e.is_dir():
                continue
            if e.is_symlink():
                real = os.path.realpath(e.path)
                if not _inside(real, self.root) or _inside(self.split, real) or (
                        self.other is not None and (_inside(real, self.other) or _inside(self.other, real))):
                    self.skipped.append(f"{e.path} -> {real}")
                    continue
            out.append((e.name, e.path))
        return out

    def images(self, folder: str, label: int, others: list[str], extensions: tuple[str, ...]) -> list[tuple[str, int]]:
        """``(path, label)`` of every image under ``folder``; ``others``: the other class folders' real paths."""
        own = os.path.realpath(folder)
        seen = {own}
        samples = []
        for cur, dirs, files in os.walk(folder, followlinks=True):
            keep = []
            for d in sorted(dirs):
                p = os.path.join(cur, d)
                real = os.path.realpath(p)
                if real in seen or (os.path.islink(p) and self._forbidden(real, own, others)):
                    if real not in seen:
                        self.skipped.append(f"{p} -> {real}")
                    continue
                seen.add(real)
                keep.append(d)
            dirs[:] = keep  # os.walk descends only into these
            samples += [(os.path.join(cur, f), label) for f in sorted(files) if f.lower().endswith(extensions)]
        return samples


def _scan(root: Path, name: str) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Class names, train samples and val/test samples of an ImageFolder-style tree (see :class:`_FolderWalk`
    for the symlinks it follows)."""
    import logging

    from torchvision.datasets.folder import IMG_EXTENSIONS

    train_dir = root / "train"
    eval_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or eval_dir is None:
        raise UserError(f"{name}: {root} needs train/<class>/ and val/<class>/ image folders; point root at such a directory")
    exts = tuple(x.lower() for x in IMG_EXTENSIONS)
    walk = _FolderWalk(root, train_dir, eval_dir)
    found = walk.classes(train_dir)
    if not found:
        raise UserError(f"{name}: no class folders under {train_dir}; add train/<class>/*.jpg")
    classes = [c for c, _ in found]
    class_to_idx = {c: i for i, c in enumerate(classes)}
    reals = {c: os.path.realpath(p) for c, p in found}
    train = []
    for c, p in found:
        got = walk.images(p, class_to_idx[c], [r for k, r in reals.items() if k != c], exts)
        if not got:
            raise UserError(f"{name}: class folder {p} has no images ({', '.join(exts)}); add some or remove the folder")
        train += got
    ewalk = _FolderWalk(root, eval_dir, train_dir)
    efound = ewalk.classes(eval_dir)
    extra = sorted({c for c, _ in efound} - set(classes))
    if extra:
        raise UserError(f"{name}: {eval_dir} has classes missing from train/: {', '.join(extra[:5])}; use the same class folders")
    ereals = {c: os.path.realpath(p) for c, p in efound}
    test = []
    for c, p in efound:
        test += ewalk.images(p, class_to_idx[c], [r for k, r in ereals.items() if k != c], exts)
    if not test:
        raise UserError(f"{name}: no images under {eval_dir}; add {eval_dir.name}/<class>/*.jpg")
    skipped = walk.skipped + ewalk.skipped
    if skipped:
        logging.getLogger(__name__).warning(
            "%s: not following %d directory symlink(s) that leave %s, loop, or reach another class or split "
            "(first: %s)", name, len(skipped), root, skipped[0])
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
