"""``cifar10`` / ``cifar100``: the python-version CIFAR batches, read without trusting them.

Layout: ``<base>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
and ``<base>/cifar-100-python/{train, test, meta}``. The batches are pickles, and
unpickling runs whatever code a pickle names; a CIFAR folder is data from the
internet (or from a colleague), so every batch is read through
:class:`SafeCifarUnpickler`, which admits only the few globals a genuine batch
refers to. torchvision's loader (a plain ``pickle.load``) is never used, not
even after its MD5 check passes; a download is fetched and checksummed by
torchvision's downloader and then read the same safe way.
"""

from __future__ import annotations

import io
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


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables a pickled ndarray refers to, under every module path numpy has used.

    numpy 2 moved ``numpy.core`` to ``numpy._core``: the original CIFAR files (numpy 1,
    Python 2) say ``numpy.core.multiarray``, a re-pickle made with numpy 2 says
    ``numpy._core.multiarray``; both must resolve to the same safe functions.
    """
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    out: dict[tuple[str, str], Any] = {
        # The ndarray class itself: the first argument of _reconstruct, then BUILD calls its __setstate__.
        ("numpy", "ndarray"): np.ndarray,
        # dtype('u1', False, True) + __setstate__: how a pickled array records its element type.
        ("numpy", "dtype"): np.dtype,
    }
    for pkg in ("numpy.core", "numpy._core"):
        # _reconstruct(ndarray, (0,), b'b'): allocates an empty array (protocols 0-4).
        out[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        # _frombuffer(buf, dtype, shape, order): how protocol 5 stores an array's bytes (numpy
        # itself refuses object dtypes here, so raw bytes never become object pointers).
        out[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    return out


class _Refused(pickle.UnpicklingError):
    """A global outside the allow-list: the file is not a CIFAR batch (and may be malicious)."""


class _Latin1Encode:
    """Stands in for ``_codecs.encode``, which protocol 0-2 pickles made by Python 3 use to
    store ``bytes`` (keys like ``b'data'``, the array's raw pixels) as ``encode(str, 'latin1')``.

    Only latin-1 is admitted: other codec names could reach arbitrary codecs
    (zlib, bz2, ...). A slotted instance rather than a function, so a BUILD
    opcode cannot set attributes on it.
    """

    __slots__ = ()

    def __call__(self, text: str, encoding: str = "utf-8") -> bytes:
        if encoding not in ("latin1", "latin-1", "iso-8859-1", "iso8859-1") or not isinstance(text, str):
            raise _Refused(f"_codecs.encode with encoding {encoding!r}")
        return text.encode("latin1")


_SAFE_GLOBALS: dict[tuple[str, str], Any] | None = None


class SafeCifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR batch holds; any other global is refused.

    A genuine batch is a dict of str/bytes keys, lists of ints / strings and one
    uint8 ndarray. Containers, strings and numbers are pickle opcodes and need
    no global; the globals admitted are exactly those an ndarray (and a bytes
    object in a protocol-2 pickle) reduces to, see :func:`_numpy_globals` and
    :class:`_Latin1Encode`. Anything else (``os.system``, ``builtins.open``,
    ``builtins.eval``, ``subprocess.Popen``...) raises ``pickle.UnpicklingError``
    before the global is even imported.
    """

    def find_class(self, module: str, name: str) -> Any:
        global _SAFE_GLOBALS
        if _SAFE_GLOBALS is None:
            _SAFE_GLOBALS = {**_numpy_globals(), ("_codecs", "encode"): _Latin1Encode()}
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {str(pid)[:40]!r}")


def safe_load_pickle(path: str | Path) -> Any:
    """Unpickle a CIFAR file with :class:`SafeCifarUnpickler` (``encoding='latin1'`` for the
    original Python 2 pickles); every failure is a one-line ``UserError`` naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"CIFAR file {path} is missing; re-download the dataset (download=true)") from None
    except OSError as e:
        raise UserError(f"cannot read CIFAR file {path} ({e.strerror or e}); check its permissions or re-download it") from None
    try:
        return SafeCifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _Refused as e:
        raise UserError(
            f"CIFAR file {path} refers to {e}, which no CIFAR batch contains; refusing to unpickle it "
            "(it may run code): delete the folder and re-download the dataset (download=true)"
        ) from None
    except Exception as e:  # unpickling raises many types for a damaged file
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        raise UserError(
            f"CIFAR file {path} is corrupt ({type(e).__name__}: {detail}); re-download it (download=true)"
        ) from None


def find_cifar(spec: _Spec, root: str | None = None) -> Path | None:
    """The first base directory (parent of ``spec.folder``) in the search order, or None.

    An explicit ``root`` is the only place looked at (it may be the base or the
    ``spec.folder`` itself); the defaults are searched only without one.
    """
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
        entry = safe_load_pickle(path)
        if not isinstance(entry, dict):
            raise UserError(f"CIFAR file {path} holds a {type(entry).__name__}, not a batch dict; re-download it (download=true)")
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        if "data" not in entry or label_key not in entry:
            raise UserError(f"CIFAR file {path} lacks 'data' or '{label_key}'; re-download it (download=true)")
        try:
            x = np.asarray(entry["data"], dtype=np.uint8)
            y = np.asarray(entry[label_key], dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise UserError(f"CIFAR file {path}: 'data'/'{label_key}' are not numeric arrays ({e}); re-download it (download=true)") from None
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.ndim != 1 or len(x) != len(y):
            raise UserError(
                f"CIFAR file {path}: data {x.shape} / {y.shape} labels, expected (N, 3072) and N labels; re-download it (download=true)"
            )
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _torchvision_cls(spec: _Spec):
    from torchvision.datasets import CIFAR10 as TV10, CIFAR100 as TV100

    return TV10 if spec.num_classes == 10 else TV100


def _download(spec: _Spec, root: str | None) -> Path:
    """Fetch and MD5-check the official archive with torchvision's downloader; return the base folder."""
    from torchvision.datasets.utils import download_and_extract_archive

    base = download_root(root)
    cls = _torchvision_cls(spec)
    try:
        download_and_extract_archive(cls.url, str(base), filename=cls.filename, md5=cls.tgz_md5)
    except Exception as e:  # network, disk or checksum failures
        raise UserError(f"downloading {spec.name} into {base} failed ({e}); fetch it by hand into {base / spec.folder}") from None
    return base


def _not_found(spec: _Spec, root: str | None) -> UserError:
    looked = search_dirs(root, SUBDIRS, SYSTEM_DIRS)
    if root is not None:
        # An explicit root is authoritative: say what was expected there, not where else we might look.
        return UserError(
            f"{spec.name}: data.root {root} has no {spec.folder}/ folder (looked in {', '.join(str(d) for d in looked)}); "
            f"put {spec.folder}/ there, set download=true, or unset data.root to use the default search"
        )
    return UserError(
        f"{spec.name} not found (no {spec.folder}/ in {', '.join(str(d) for d in looked)}); "
        "pass download=true or point root at it"
    )


def _load(spec: _Spec, root: str | None, download: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Path]:
    """Train/test images and labels, and the ``spec.folder`` directory they were read from."""
    base = find_cifar(spec, root)
    if base is None:
        if not download:
            raise _not_found(spec, root)
        base = _download(spec, root)
    folder = base / spec.folder
    x_tr, y_tr = read_cifar_pickles(folder, spec.train_files, spec.label_key)
    x_te, y_te = read_cifar_pickles(folder, spec.test_files, spec.label_key)
    return x_tr, y_tr, x_te, y_te, folder


def _splits(spec: _Spec, root: str | None, download: bool, train_subset: int | None, test_subset: int | None, kw: dict) -> DataSplits:
    kw.pop("num_workers", None)  # accepted so every loader takes data.num_workers; in memory, nothing to decode
    if kw:
        raise UserError(f"{spec.name}: unknown option(s) {', '.join(sorted(kw))}; known: train_subset, test_subset, num_workers")
    x_tr, y_tr, x_te, y_te, folder = _load(spec, root, download)
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
        source=str(folder.resolve()),
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
