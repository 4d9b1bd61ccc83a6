"""Every shipped config passes ``indistill validate`` (in-process) on tiny datasets in the real on-disk formats.

``indistill validate`` builds every model on untrained weights, prunes, builds every arm's warmup and method,
and pushes one batch through every stage's loss; a config whose taps, widths, sizes, budgets or method
parameters do not fit fails here. The datasets are written by this file, byte-compatible with the real ones:

- CIFAR-10 ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and CIFAR-100
  ``cifar-100-python/{train, test, meta}``: Python 2 protocol-2 pickles of dicts with (py2) str keys, which
  Python 3 reads as bytes keys (``encoding="bytes"``) or str keys (``encoding="latin1"``), ``data`` a uint8
  numpy array (N, 3072) as the originals pickle it, labels a list of ints;
- Fashion-MNIST: the system copy under /usr/share/datasets/fashion-mnist where present, else gzipped IDX files;
- ImageNet / ImageFolder: ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` trees of tiny JPEGs.

A config with a dataset this file cannot write fails with a message saying to add a writer.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

import indistill
from indistill.cli import main
from indistill.config import load_config

CONFIG_DIR = Path(indistill.__file__).resolve().parent / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
TRAIN_SUBSET, TEST_SUBSET = 64, 32

# The CRD benchmark's 13 CIFAR-100 pairs (configs/cifar100/<teacher>-<student>.yaml).
CRD_PAIRS = [
    "wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet110-resnet20", "resnet110-resnet32",
    "resnet32x4-resnet8x4", "vgg13-vgg8", "vgg13-MobileNetV2", "ResNet50-MobileNetV2", "ResNet50-vgg8",
    "resnet32x4-ShuffleV1", "resnet32x4-ShuffleV2", "wrn_40_2-ShuffleV1",
]


# --------------------------------------------------------------------------- Python 2 pickles (CIFAR)


def _py2_str(b: bytes) -> bytes:
    """A Python 2 ``str`` in pickle protocol 2: SHORT_BINSTRING or BINSTRING."""
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    return b"J" + struct.pack("<i", v)


def _py2_value(v) -> bytes:
    if isinstance(v, np.ndarray):
        # As numpy (1.x, Python 2) pickles an array: _reconstruct(ndarray, (0,), 'b'), then
        # __setstate__((1, shape, dtype('u1'), is_fortran, raw bytes as a py2 str)).
        assert v.dtype == np.uint8 and v.ndim == 2
        shape = b"".join(_py2_int(int(d)) for d in v.shape) + b"\x86"
        dtype = b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R" + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
                + b"(K\x01" + shape + dtype + b"\x89" + _py2_str(np.ascontiguousarray(v).tobytes()) + b"tb")
    if isinstance(v, bool) or not isinstance(v, (int, bytes, str, list, dict)):
        raise TypeError(type(v))
    if isinstance(v, int):
        return _py2_int(v)
    if isinstance(v, (bytes, str)):
        return _py2_str(v.encode("latin1") if isinstance(v, str) else v)
    if isinstance(v, list):
        return b"](" + b"".join(_py2_value(x) for x in v) + b"e"
    return b"}(" + b"".join(_py2_value(k) + _py2_value(x) for k, x in v.items()) + b"u"


def py2_pickle(obj: dict) -> bytes:
    """``obj`` pickled as Python 2's cPickle (protocol 2) wrote the CIFAR files."""
    return b"\x80\x02" + _py2_value(obj) + b"."


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        x, y = _images(rng, n), [int(v) for v in (np.arange(n) + i) % 10]
        label = "testing batch 1 of 1" if name == "test_batch" else f"training batch {i + 1} of 5"
        (d / name).write_bytes(py2_pickle({
            "batch_label": label, "labels": y, "data": x, "filenames": [f"img_{i}_{j}.png" for j in range(n)],
        }))
        written[name] = x
    (d / "batches.meta").write_bytes(py2_pickle({
        "num_cases_per_batch": per_batch, "label_names": [f"class{k}" for k in range(10)], "num_vis": 3072,
    }))
    return written


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x, fine = _images(rng, n), [int(v) for v in np.arange(n) % 100]
        (d / name).write_bytes(py2_pickle({
            "filenames": [f"img_{j}.png" for j in range(n)], "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": fine, "coarse_labels": [v // 5 for v in fine], "data": x,
        }))
        written[name] = x
    (d / "meta").write_bytes(py2_pickle({
        "fine_label_names": [f"fine{k}" for k in range(100)], "coarse_label_names": [f"coarse{k}" for k in range(20)],
    }))
    return written


# --------------------------------------------------------------------------- IDX and image folders


def write_idx(path: Path, arr: np.ndarray) -> None:
    """An IDX file (uint8 data, big-endian dimensions), gzipped as the distributed files are."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()))


def write_fashion_mnist(root: Path, n_train: int = 100, n_test: int = 50, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    d = root / "fashion-mnist"
    d.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return d


def write_image_folder(root: Path, classes: int = 3, n_train: int = 4, n_val: int = 2, seed: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    d = root / "imagenet"
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            folder = d / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for j in range(n):
                img = rng.integers(0, 256, size=(40 + 4 * j, 48, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{split}_{c}_{j}.JPEG", format="JPEG")
    return d


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny_data")
    cifar = base / "cifar"
    write_cifar10(cifar)
    write_cifar100(cifar)
    fashion = SYSTEM_FASHION if SYSTEM_FASHION.is_dir() else write_fashion_mnist(base)
    folders = write_image_folder(base)
    return {"cifar10": cifar, "cifar100": cifar, "fashion_mnist": fashion, "imagenet": folders, "imagefolder": folders}


# The embedded digits need no files.
NO_FILES = ("digits",)


def _validate(path: Path, roots: dict[str, Path], out_dir: Path) -> None:
    name = load_config(path).data.name
    overrides = [f"out_dir={out_dir}", "device=cpu", "progress=false",
                 f"data.train_subset={TRAIN_SUBSET}", f"data.test_subset={TEST_SUBSET}"]
    if name not in NO_FILES:
        if name not in roots:
            pytest.fail(f"{path.name}: no tiny-dataset writer for data.name={name}; add one to tests/test_configs.py")
        overrides.append(f"data.root={roots[name]}")
    _stand_in_checkpoints(path, overrides)
    assert main(["validate", str(path), *overrides]) == 0


def _stand_in_checkpoints(path: Path, overrides: list[str]) -> None:
    """``validate`` loads every checkpoint a config names (the CRD teachers, torchvision's ResNet-34): write
    untrained weights of the named architecture and the tiny dataset's class count where they are expected
    (relative paths resolve in the test's working directory)."""
    import torch

    from indistill.pipeline import build_model, load_data

    cfg = load_config(path, overrides)
    specs = [cfg.teacher, cfg.student, *([cfg.auxiliary] if cfg.auxiliary.enabled else [])]
    named = [s for s in specs if s.checkpoint]
    if not named:
        return
    data = load_data(cfg)
    for spec in named:
        ckpt = Path(spec.checkpoint)
        assert not ckpt.is_absolute(), f"{path.name}: a shipped config names an absolute checkpoint {ckpt}"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save(build_model(spec, data).state_dict(), ckpt)


# --------------------------------------------------------------------------- tests


def test_every_crd_pair_has_a_config():
    found = {p.stem for p in (CONFIG_DIR / "cifar100").glob("*.yaml")}
    assert found == set(CRD_PAIRS)
    for stem in CRD_PAIRS:
        cfg = load_config(CONFIG_DIR / "cifar100" / f"{stem}.yaml")
        teacher, student = stem.split("-")
        assert (cfg.teacher.name, cfg.student.name, cfg.data.name) == (teacher, student, "cifar100")
        assert cfg.teacher.checkpoint == f"download_ckpts/cifar_teachers/{teacher}_vanilla/ckpt_epoch_240.pth"
        tr = cfg.student.train
        small = student in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
        assert (tr.epochs, tr.optimizer.name, tr.optimizer.lr, tr.optimizer.momentum, tr.optimizer.weight_decay) == (
            240, "sgd", 0.01 if small else 0.05, 0.9, 5e-4)
        assert (tr.scheduler.name, tr.scheduler.milestones, tr.scheduler.gamma) == ("multistep", [150, 180, 210], 0.1)
        assert cfg.data.batch_size == 64
        assert [(a.name, a.warmup, a.method) for a in cfg.arms] == [("crd", "none", "crd"), ("indistill_crd", "indistill", "crd")]
        assert cfg.kd.params["crd"]["weight"] == 0.8 and cfg.kd.params["crd"]["ce"] == 1.0


def test_tiny_cifar_files_are_what_torchvision_and_pickle_read(tmp_path, monkeypatch):
    """The writers' bytes are the real format: torchvision's readers (MD5 check aside) and a bytes-keyed load agree."""
    import torchvision.datasets.cifar as tv_cifar
    from torchvision.datasets import CIFAR10, CIFAR100

    c10, c100 = write_cifar10(tmp_path), write_cifar100(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # MD5s of the real files
    tv = CIFAR10(str(tmp_path), train=True, download=False)
    want = np.concatenate([c10[f"data_batch_{i}"] for i in range(1, 6)])
    assert np.array_equal(tv.data, want.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)) and tv.classes[3] == "class3"
    tv = CIFAR100(str(tmp_path), train=False, download=False)
    assert np.array_equal(tv.data, c100["test"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert tv.targets[:3] == [0, 1, 2] and tv.classes[99] == "fine99"
    with (tmp_path / "cifar-100-python" / "train").open("rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert sorted(entry) == [b"batch_label", b"coarse_labels", b"data", b"filenames", b"fine_labels"]
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (200, 3072)
    assert np.array_equal(entry[b"data"], c100["train"]) and entry[b"coarse_labels"][99] == 19


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIGS])
def test_config_validates(path, data_roots, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("INDISTILL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data of the working directory; relative checkpoint paths resolve here
    _validate(path, data_roots, tmp_path / "runs")
    out = capsys.readouterr().out
    assert "ok: " in out and "is valid" in out
    assert not (tmp_path / "runs").exists()  # validate writes nothing
