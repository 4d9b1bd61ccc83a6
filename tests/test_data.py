"""Tests for the data package: loaders, on-disk formats, batching and augmentation."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from indistill.data import Batch, InMemorySplit, get_dataset, list_datasets
from indistill.data import cifar as cifar_mod
from indistill.data import fashion_mnist as fm_mod
from indistill.data.fashion_mnist import read_idx
from indistill.errors import UserError

FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def no_data_dirs(tmp_path, monkeypatch):
    """Isolate the data search: empty cwd, no $INDISTILL_DATA, no system installs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INDISTILL_DATA", raising=False)
    monkeypatch.setattr(fm_mod, "SYSTEM_DIRS", ())
    monkeypatch.setattr(cifar_mod, "SYSTEM_DIRS", ())
    return tmp_path


def collect(split, **kw) -> Batch:
    """Concatenate all batches of one pass."""
    bs = list(split.batches(kw.pop("batch_size", 7), **kw))
    return Batch(*(torch.cat([getattr(b, f) for b in bs]) for f in Batch._fields))


def test_registry_lists_all_datasets():
    assert {"digits", "fashion_mnist", "cifar10", "cifar100", "imagenet", "imagefolder"} <= set(list_datasets())


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits")


def _bilinear_up_f64(img: np.ndarray, size: int) -> np.ndarray:
    """Reference bilinear resize (half-pixel centres, edge clamp) written out in float64."""
    n = img.shape[0]
    src = (np.arange(size) + 0.5) * n / size - 0.5
    src = np.clip(src, 0, None)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = src - i0
    rows = img[i0] * (1 - w)[:, None] + img[i1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]


def test_digits_shapes_and_split(digits):
    assert (digits.name, digits.num_classes, digits.in_channels, digits.image_size) == ("digits", 10, 1, 32)
    assert len(digits.train) == 1437 and len(digits.test) == 360 and len(digits.train_eval) == 1437
    assert digits.train.images.shape == (1437, 1, 32, 32) and digits.train.images.dtype == torch.uint8
    assert digits.test.labels.dtype == torch.int64
    assert set(digits.train.labels.tolist()) == set(range(10))
    # Stratified: each class is ~10% of the 360 test digits.
    counts = torch.bincount(digits.test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    again = get_dataset("digits")
    assert torch.equal(again.train.images, digits.train.images)
    assert torch.equal(again.test.labels, digits.test.labels)


def test_digits_pixels_match_reference_upsampling(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    scaled = np.round(raw.images * 255.0 / 16.0)  # uint8 0..255 before resizing
    # Find the first test image in the raw set (the split shuffles), then resize independently.
    test_img = digits.test.images[0, 0].double().numpy()
    label = int(digits.test.labels[0])
    candidates = [i for i in range(len(raw.target)) if raw.target[i] == label]
    errs = [np.abs(np.round(_bilinear_up_f64(scaled[i], 32)) - test_img).max() for i in candidates]
    assert min(errs) <= 1.0  # rounding of float32 vs float64 can differ by one grey level


def test_subset_is_stratified_and_deterministic():
    d = get_dataset("digits", train_subset=100, test_subset=50)
    assert len(d.train) == len(d.train_eval) == 100 and len(d.test) == 50
    counts = torch.bincount(d.train.labels, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11
    assert torch.equal(d.train.images, get_dataset("digits", train_subset=100).train.images)


def test_digits_unknown_option_is_user_error():
    with pytest.raises(UserError, match="unknown option"):
        get_dataset("digits", bogus=1)


# ---------------------------------------------------------------- batching


def test_batches_cover_split_with_consistent_labels(digits):
    b = collect(digits.train, batch_size=100, shuffle=True, seed=3, epoch=0)
    assert b.images.shape == (1437, 1, 32, 32) and b.images.dtype == torch.float32
    assert b.labels.dtype == torch.int64 and b.index.dtype == torch.int64
    assert sorted(b.index.tolist()) == list(range(1437))
    assert torch.equal(b.labels, digits.train.labels[b.index])
    n = sum(1 for _ in digits.train.batches(100, drop_last=True))
    assert n == digits.train.num_batches(100, drop_last=True) == 14
    assert digits.train.num_batches(100) == 15


def test_order_and_augmentation_reproducible(digits):
    a = collect(digits.train, shuffle=True, seed=5, epoch=2)
    b = collect(digits.train, shuffle=True, seed=5, epoch=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.index, b.index)
    c = collect(digits.train, shuffle=True, seed=5, epoch=3)
    assert not torch.equal(a.index, c.index)
    d = collect(digits.train, shuffle=True, seed=6, epoch=2)
    assert not torch.equal(a.index, d.index)
    # Without shuffling the order is fixed but the crops still change with the epoch.
    e0 = collect(digits.train, shuffle=False, epoch=0)
    e1 = collect(digits.train, shuffle=False, epoch=1)
    assert torch.equal(e0.index, torch.arange(1437))
    assert not torch.equal(e0.images, e1.images)
    # The un-augmented view ignores the epoch.
    assert torch.equal(collect(digits.train_eval, epoch=0).images, collect(digits.train_eval, epoch=1).images)


def test_batches_do_not_touch_global_rng(digits):
    state = torch.get_rng_state()
    collect(digits.train, shuffle=True, epoch=1)
    assert torch.equal(state, torch.get_rng_state())


def _manual_view(img: np.ndarray, pad: int, dy: int, dx: int, flip: bool, mean, std) -> np.ndarray:
    c, h, w = img.shape
    p = np.zeros((c, h + 2 * pad, w + 2 * pad), dtype=np.float64)
    p[:, pad : pad + h, pad : pad + w] = img
    out = p[:, dy : dy + h, dx : dx + w]
    if flip:
        out = out[:, :, ::-1]
    return (out / 255.0 - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]


def test_crop_and_flip_match_manual_computation():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 6, 6), dtype=torch.uint8, generator=g)  # no zeros: padding is visible
    labels = torch.arange(64) % 4
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    split = InMemorySplit(images, labels, mean, std, pad=2, flip=True)
    order, dy, dx, fl = split.plan(shuffle=True, seed=1, epoch=4)
    assert sorted(order.tolist()) == list(range(64))
    assert dy is not None and dx is not None and fl is not None
    # The draws must actually vary: crops off-centre and some (not all) flipped.
    assert (dy != 2).any() and (dx != 2).any() and 0 < int(fl.sum()) < 64
    b = collect(split, batch_size=10, shuffle=True, seed=1, epoch=4)
    assert torch.equal(b.index, order)
    for pos in range(64):
        i = int(order[pos])
        want = _manual_view(images[i].numpy().astype(np.float64), 2, int(dy[pos]), int(dx[pos]), bool(fl[pos]), mean, std)
        np.testing.assert_allclose(b.images[pos].double().numpy(), want, atol=1e-5)


def test_no_augmentation_is_plain_normalisation():
    images = torch.tensor([[[[0, 51], [102, 255]]]], dtype=torch.uint8)
    split = InMemorySplit(images, torch.tensor([0]), (0.2,), (0.5,))
    (b,) = list(split.batches(4))
    want = (np.array([[0, 51], [102, 255]]) / 255.0 - 0.2) / 0.5
    np.testing.assert_allclose(b.images[0, 0].numpy(), want, atol=1e-6)
    assert b.index.tolist() == [0] and b.labels.tolist() == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches(digits):
    cpu = collect(digits.train, shuffle=True, seed=2, epoch=1)
    gpu = collect(digits.train, shuffle=True, seed=2, epoch=1, device="cuda")
    assert gpu.images.is_cuda and gpu.labels.is_cuda
    assert torch.equal(cpu.index, gpu.index.cpu()) and torch.equal(cpu.labels, gpu.labels.cpu())
    torch.testing.assert_close(cpu.images, gpu.images.cpu(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- IDX / Fashion-MNIST


def _idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_fmnist(directory: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = _idx_bytes(arr)
        if gz:
            (directory / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = _idx_bytes(arr)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    assert np.array_equal(out, arr)


def test_read_idx_rejects_corrupt_files(tmp_path):
    arr = np.zeros((5, 4, 4), dtype=np.uint8)
    data = _idx_bytes(arr)
    bad = tmp_path / "truncated-idx3-ubyte"
    bad.write_bytes(data[:-3])
    with pytest.raises(UserError, match="truncated-idx3-ubyte"):
        read_idx(bad)
    badgz = tmp_path / "cut.gz"
    badgz.write_bytes(gzip.compress(data)[:-10])
    with pytest.raises(UserError, match="cut.gz"):
        read_idx(badgz)
    magic = tmp_path / "magic"
    magic.write_bytes(b"\x12\x34" + data[2:])
    with pytest.raises(UserError, match="magic"):
        read_idx(magic)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_loader_on_written_files(tmp_path, gz):
    arrays = _write_fmnist(tmp_path / "FashionMNIST" / "raw", gz=gz)
    d = get_dataset("fashion_mnist", root=str(tmp_path))
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 1, 32)
    assert len(d.train) == 20 and len(d.test) == 10
    imgs = d.train.images
    assert imgs.shape == (20, 1, 32, 32)
    # 28x28 centred in 32x32 with a 2-pixel zero border.
    assert np.array_equal(imgs[:, 0, 2:30, 2:30].numpy(), arrays["train-images-idx3-ubyte"])
    assert imgs[:, :, :2].sum() == 0 and imgs[:, :, 30:].sum() == 0 and imgs[..., :2].sum() == 0
    assert d.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].astype(int).tolist()
    # Mean/std come from the padded training images.
    ref = imgs.double() / 255.0
    assert d.train.mean[0] == pytest.approx(float(ref.mean()), abs=1e-9)
    assert d.train.std[0] == pytest.approx(float(ref.std()), abs=1e-9)
    assert d.train.pad == 4 and d.train.flip and not d.train_eval.augment


def test_fashion_mnist_corrupt_file_names_it(tmp_path):
    directory = tmp_path / "fmnist"
    _write_fmnist(directory, gz=False)
    victim = directory / "t10k-labels-idx1-ubyte"
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte"):
        get_dataset("fashion_mnist", root=str(directory))


def test_fashion_mnist_env_var_search(tmp_path, monkeypatch, no_data_dirs):
    _write_fmnist(tmp_path / "store" / "fashion-mnist", gz=True)
    monkeypatch.setenv("INDISTILL_DATA", str(tmp_path / "store"))
    assert len(get_dataset("fashion_mnist").train) == 20


def test_fashion_mnist_missing_says_how_to_fix(no_data_dirs):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist.*download=true"):
        get_dataset("fashion_mnist")
    with pytest.raises(UserError, match="nowhere lacks the IDX files.*download=true"):
        get_dataset("fashion_mnist", root=str(no_data_dirs / "nowhere"))


@pytest.mark.realdata
@pytest.mark.skipif(not FMNIST_SYSTEM.is_dir(), reason=f"Fashion-MNIST not installed at {FMNIST_SYSTEM}")
def test_real_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("INDISTILL_DATA", raising=False)
    d = get_dataset("fashion_mnist")
    assert len(d.train) == 60000 and len(d.test) == 10000
    assert d.train.images.shape == (60000, 1, 32, 32)
    # Fashion-MNIST is balanced: 6000 / 1000 images per class.
    assert torch.bincount(d.train.labels).tolist() == [6000] * 10
    assert torch.bincount(d.test.labels).tolist() == [1000] * 10
    b = next(iter(d.train.batches(128, shuffle=True)))
    assert b.images.shape == (128, 1, 32, 32)


# ---------------------------------------------------------------- CIFAR


class _Py2Pickler(pickle._Pickler):
    """Writes protocol-2 pickles the way Python 2's cPickle wrote the original CIFAR files.

    Python 2 had no unicode in these files: every string (dict keys, the array's
    raw bytes, the dtype's byte-order char) is a byte string, emitted as
    SHORT_BINSTRING / BINSTRING, and numpy lived at ``numpy.core.multiarray``.
    Loading them in Python 3 needs ``encoding='latin1'`` and yields ``str`` keys.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str

    def save_global(self, obj, name=None):
        module, qual = obj.__module__, name or obj.__qualname__
        module = {"numpy._core.multiarray": "numpy.core.multiarray"}.get(module, module)
        self.write(pickle.GLOBAL + f"{module}\n{qual}\n".encode())
        self.memoize(obj)


def _dump_py2(obj, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _write_cifar10(base: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A cifar-10-batches-py folder in the original format (Python 2 protocol-2 pickles, str keys)."""
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.zeros((per_batch, 3072), dtype=np.uint8)
        data[:, :1024], data[:, 1024:2048], data[:, 2048:] = 10, 20, 30  # R, G, B planes
        data[:, 0] = np.arange(per_batch) + 100 * k  # marks sample order in pixel (0, 0) of red
        labels = [(j + k) % 10 for j in range(per_batch)]
        batch_label = f"training batch {k + 1} of 5" if k < 5 else "testing batch 1 of 1"
        filenames = [f"img_{k}_{j}.png" for j in range(per_batch)]
        _dump_py2({"data": data, "labels": labels, "batch_label": batch_label, "filenames": filenames}, folder / name)
        xs.append(data)
        ys.append(labels)
    _dump_py2({"num_cases_per_batch": per_batch, "label_names": [f"c{i}" for i in range(10)], "num_vis": 3072},
              folder / "batches.meta")
    return np.concatenate(xs), np.concatenate(ys)


def _write_cifar100(base: Path, sizes=(("train", 30), ("test", 7)), dump=None) -> dict:
    """A cifar-100-python folder; ``dump(obj, path)`` picks the pickle flavour (default: the original)."""
    dump = dump or _dump_py2
    folder = base / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name, n in sizes:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = (np.arange(n) * 7 % 100).tolist()
        dump({"filenames": [f"f{i}.png" for i in range(n)], "batch_label": f"{name} batch", "fine_labels": fine,
              "coarse_labels": [x // 5 for x in fine], "data": data}, folder / name)
        written[name] = (data, fine)
    dump({"fine_label_names": ["x"] * 100, "coarse_label_names": ["y"] * 20}, folder / "meta")
    return written


def test_test_writer_emits_the_original_python2_format(tmp_path):
    """The helper must write what the original files hold, or the tests below prove nothing."""
    import pickletools

    _write_cifar10(tmp_path, per_batch=2)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    assert raw[:2] == b"\x80\x02"  # PROTO 2
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops and ("GLOBAL", "numpy dtype") in ops
    assert not any(name in ("BINUNICODE", "SHORT_BINUNICODE") for name, _ in ops)  # no unicode in a Python 2 file
    assert ("SHORT_BINSTRING", "data") in ops and ("SHORT_BINSTRING", "labels") in ops
    # torchvision's own reader (a plain pickle.load, acceptable here: we wrote the file) gets str keys.
    entry = pickle.loads(raw, encoding="latin1")
    assert sorted(entry) == ["batch_label", "data", "filenames", "labels"] and entry["data"].dtype == np.uint8


def test_cifar10_reads_the_original_format_like_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    data, labels = _write_cifar10(tmp_path)
    d = get_dataset("cifar10", root=str(tmp_path))
    assert (d.num_classes, d.in_channels, d.image_size) == (10, 3, 32)
    assert len(d.train) == 20 and len(d.test) == 4
    assert d.source == str((tmp_path / "cifar-10-batches-py").resolve())
    imgs = d.train.images
    assert imgs.shape == (20, 3, 32, 32)
    assert (imgs[:, 1] == 20).all() and (imgs[:, 2] == 30).all() and (imgs[:, 0, 0, 1:] == 10).all()
    assert imgs[:, 0, 0, 0].tolist() == data[:20, 0].tolist()
    assert d.train.labels.tolist() == labels[:20].tolist()
    assert d.test.labels.tolist() == labels[20:].tolist()
    # torchvision, told the (made-up) checksums pass, reads the very same pixels and labels.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    tv = tv_cifar.CIFAR10(str(tmp_path), train=True, download=False)
    assert np.array_equal(tv.data.transpose(0, 3, 1, 2), imgs.numpy())
    assert tv.targets == d.train.labels.tolist()
    # Standard CIFAR-10 normalisation of the green plane (value 20).
    b = next(iter(d.train_eval.batches(4)))
    assert float(b.images[0, 1, 5, 5]) == pytest.approx((20 / 255 - 0.4822) / 0.2435, abs=1e-5)
    assert d.train.pad == 4 and d.train.flip


def test_cifar_never_calls_a_plain_unpickler(tmp_path, monkeypatch):
    """All reads go through the restricted unpickler, whether or not checksums would pass."""
    _write_cifar10(tmp_path)

    def forbidden(*a, **k):
        raise AssertionError("plain pickle.load/loads called")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # as if the MD5s matched
    assert len(get_dataset("cifar10", root=str(tmp_path)).train) == 20


def test_cifar10_root_may_be_the_batches_folder(tmp_path):
    _write_cifar10(tmp_path)
    assert len(get_dataset("cifar10", root=str(tmp_path / "cifar-10-batches-py")).train) == 20


def _dump_py3(protocol):
    def dump(obj, path):
        obj = {k.encode(): v for k, v in obj.items()}  # a Python 3 re-pickle usually has bytes keys
        path.write_bytes(pickle.dumps(obj, protocol=protocol))

    return dump


@pytest.mark.parametrize("flavour", ["py2", "py3-protocol2", "py3-protocol4", "py3-protocol5"])
def test_cifar100_fine_labels_in_every_pickle_flavour(tmp_path, flavour):
    dump = None if flavour == "py2" else _dump_py3(int(flavour[-1]))
    written = _write_cifar100(tmp_path, dump=dump)
    d = get_dataset("cifar100", root=str(tmp_path), train_subset=None)
    assert d.num_classes == 100 and len(d.train) == 30 and len(d.test) == 7
    assert d.train.labels.tolist() == written["train"][1]
    assert np.array_equal(d.test.images.reshape(7, -1).numpy(), written["test"][0])
    assert d.source == str((tmp_path / "cifar-100-python").resolve())


def test_cifar_corrupt_pickle_names_file(tmp_path):
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3"):
        get_dataset("cifar10", root=str(tmp_path))


class _Payload:
    """Unpickling this calls ``fn(*args)``: the classic pickle code-execution trick."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(victim: Path) -> dict:
    import builtins
    import os
    import subprocess

    return {
        "os.system": _Payload(os.system, f"touch {victim}"),
        "builtins.open": _Payload(builtins.open, str(victim), "w"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(victim)!r}, 'w').close()"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(victim)]),
        "pathlib.Path.touch": _Payload(Path.touch, victim),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.open", "builtins.exec", "subprocess.Popen", "pathlib.Path.touch"])
@pytest.mark.parametrize("where", ["whole file", "inside labels"])
def test_malicious_cifar_pickle_is_refused_and_never_runs(tmp_path, kind, where):
    _write_cifar10(tmp_path / "data")
    victim = tmp_path / "pwned"
    payload = _payloads(victim)[kind]
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2"
    if where == "whole file":
        obj = payload
    else:  # a genuine-looking batch with the payload hidden in a nested list
        obj = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, payload, 3], b"batch_label": b"x", b"filenames": []}
    batch.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(UserError) as e:
        get_dataset("cifar10", root=str(tmp_path / "data"))
    msg = str(e.value)
    assert "\n" not in msg and "data_batch_2" in msg and "refusing to unpickle" in msg
    assert not victim.exists()


def test_malicious_cifar_meta_file_is_never_read(tmp_path):
    """The label-name files are not needed, so a payload there never runs either."""
    _write_cifar10(tmp_path / "data")
    victim = tmp_path / "pwned"
    (tmp_path / "data" / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps(_payloads(victim)["os.system"]))
    assert len(get_dataset("cifar10", root=str(tmp_path / "data")).train) == 20
    assert not victim.exists()


def test_safe_unpickler_refuses_other_codecs(tmp_path):
    import _codecs

    path = tmp_path / "batch"
    # A protocol-2 bytes object is _codecs.encode(str, 'latin1'); any other codec is refused.
    path.write_bytes(pickle.dumps(_Payload(_codecs.encode, "abc", "rot13"), protocol=2))
    with pytest.raises(UserError, match="refusing to unpickle"):
        cifar_mod.safe_load_pickle(path)
    path.write_bytes(pickle.dumps(_Payload(_codecs.encode, "abc", "latin1"), protocol=2))
    assert cifar_mod.safe_load_pickle(path) == b"abc"


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_says_download(no_data_dirs, name):
    with pytest.raises(UserError, match="not found.*download=true"):
        get_dataset(name)


# ---------------------------------------------------------------- data.root is authoritative


@pytest.fixture
def data_everywhere(tmp_path, monkeypatch):
    """Valid copies in ./data and $INDISTILL_DATA: an explicit root must not fall back to them."""
    cwd, env = tmp_path / "cwd", tmp_path / "env"
    for base in (cwd / "data", env):
        _write_fmnist(base / "fashion-mnist", gz=True)
        _write_cifar10(base)
        _write_cifar100(base)
        (base / "imagenet" / "train" / "x").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("INDISTILL_DATA", str(env))
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fashion_mnist", "train-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py/"),
        ("cifar100", "cifar-100-python/"),
        ("imagenet", "train/"),
    ],
)
@pytest.mark.parametrize("missing", [False, True])
def test_explicit_root_never_falls_back(data_everywhere, name, expected, missing):
    if name != "imagenet":  # without a root the fallback does find a copy (so the test can fail)
        assert get_dataset(name).source.startswith(str(data_everywhere.parent / "env"))
    root = data_everywhere / "absent" if missing else data_everywhere
    with pytest.raises(UserError) as e:
        get_dataset(name, root=str(root))
    msg = str(e.value)
    assert "\n" not in msg and str(root) in msg and expected in msg and "data.root" in msg


def test_source_is_the_folder_read(tmp_path, monkeypatch, no_data_dirs):
    _write_fmnist(tmp_path / "store" / "fashion-mnist", gz=True)
    monkeypatch.setenv("INDISTILL_DATA", str(tmp_path / "store"))
    assert get_dataset("fashion_mnist").source == str((tmp_path / "store" / "fashion-mnist").resolve())
    assert get_dataset("fashion_mnist", root=str(tmp_path / "store")).source == str((tmp_path / "store" / "fashion-mnist").resolve())
    src = get_dataset("digits", train_subset=20).source
    assert src is not None and (Path(src) / "digits.csv.gz").is_file()


@pytest.mark.parametrize("name", ["digits", "fashion_mnist", "cifar10"])
def test_in_memory_loaders_accept_num_workers(tmp_path, name):
    _write_fmnist(tmp_path / "fashion-mnist")
    _write_cifar10(tmp_path)
    assert len(get_dataset(name, root=str(tmp_path), num_workers=3, train_subset=10).train) == 10


# ---------------------------------------------------------------- ImageFolder


@pytest.fixture
def image_tree(tmp_path):
    from PIL import Image

    colours = {"cat": (200, 30, 60), "dog": (10, 120, 250), "fox": (90, 90, 0)}
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls, rgb in colours.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                if split == "val":  # constant images: the eval transform has a closed form
                    arr = np.broadcast_to(np.array(rgb, dtype=np.uint8), (40, 48, 3))
                else:
                    arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(np.ascontiguousarray(arr)).save(tmp_path / split / cls / f"{i}.png")
    return tmp_path, colours


def test_imagefolder_shapes_and_eval_values(image_tree):
    root, colours = image_tree
    d = get_dataset("imagefolder", root=str(root), image_size=16, num_workers=0)
    assert (d.num_classes, d.in_channels, d.image_size) == (3, 3, 16)
    assert len(d.train) == 12 and len(d.test) == 6 and len(d.train_eval) == 12
    b = collect(d.test, batch_size=4)
    assert b.images.shape == (6, 3, 16, 16)
    assert torch.equal(b.labels, d.test.labels[b.index])
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for img, y in zip(b.images, b.labels):
        rgb = np.array(colours[sorted(colours)[int(y)]]) / 255.0
        want = (rgb - mean) / std
        np.testing.assert_allclose(img.mean((1, 2)).numpy(), want, atol=1e-5)
        assert float(img.std((1, 2)).max()) < 1e-5


def test_imagefolder_augmentation_reproducible(image_tree):
    root, _ = image_tree
    d = get_dataset("imagefolder", root=str(root), image_size=16, num_workers=0)
    state = torch.get_rng_state()
    a = collect(d.train, batch_size=5, shuffle=True, seed=1, epoch=0)
    assert torch.equal(state, torch.get_rng_state())
    b = collect(d.train, batch_size=5, shuffle=True, seed=1, epoch=0)
    assert torch.equal(a.images, b.images) and torch.equal(a.index, b.index)
    assert sorted(a.index.tolist()) == list(range(12))
    c = collect(d.train, batch_size=5, shuffle=True, seed=1, epoch=1)
    assert not torch.equal(a.index, c.index)
    # Same order, other epoch: the random crops differ.
    e0 = collect(d.train, batch_size=5, epoch=0)
    e1 = collect(d.train, batch_size=5, epoch=1)
    assert torch.equal(e0.index, e1.index) and not torch.equal(e0.images, e1.images)


def test_imagefolder_workers_do_not_change_augmentation(image_tree):
    root, _ = image_tree
    d0 = get_dataset("imagefolder", root=str(root), image_size=16, num_workers=0)
    d2 = get_dataset("imagefolder", root=str(root), image_size=16, num_workers=2)
    a = collect(d0.train, batch_size=5, shuffle=True, seed=4, epoch=3)
    b = collect(d2.train, batch_size=5, shuffle=True, seed=4, epoch=3)
    assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)


def test_imagefolder_user_errors(image_tree, tmp_path_factory):
    root, _ = image_tree
    with pytest.raises(UserError, match="needs root"):
        get_dataset("imagefolder")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(UserError, match="train/<class>/ and val/<class>/"):
        get_dataset("imagefolder", root=str(empty))
    (root / "val" / "wolf").mkdir()
    with pytest.raises(UserError, match="wolf"):
        get_dataset("imagefolder", root=str(root))
    with pytest.raises(UserError, match="unknown option"):
        get_dataset("imagefolder", root=str(root), imsize=3)


def test_imagenet_missing_is_user_error(no_data_dirs, monkeypatch):
    monkeypatch.setattr("indistill.data.imagefolder.search_dirs", lambda root, sub, system: __import__(
        "indistill.data.memory", fromlist=["x"]).search_dirs(root, sub, ()))  # ignore a system install
    with pytest.raises(UserError, match="ImageNet not found"):
        get_dataset("imagenet")
    with pytest.raises(UserError, match="data.root .*nope has no train/"):
        get_dataset("imagenet", root=str(no_data_dirs / "nope"))


def _corrupt(root: Path, kind: str) -> Path:
    victim = root / "train" / "cat" / "1.png"
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2] if kind == "truncated" else b"\x89PNG garbage")
    return victim


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_imagefolder_corrupt_image_is_one_line_naming_it(image_tree, num_workers, kind):
    root, _ = image_tree
    victim = _corrupt(root, kind)
    d = get_dataset("imagefolder", root=str(root), image_size=16, num_workers=num_workers)
    assert d.train.num_workers == num_workers  # the parameter reaches the DataLoader's split
    with pytest.raises(UserError) as e:
        collect(d.train, batch_size=4)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg and str(victim) in msg
    assert msg.startswith("cannot read image")
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_imagefolder_num_workers_parameter(image_tree):
    root, _ = image_tree
    d = get_dataset("imagefolder", root=str(root), image_size=16, num_workers=0)
    assert {s.num_workers for s in (d.train, d.train_eval, d.test)} == {0}
    assert d.source == str(root.resolve())
    with pytest.raises(UserError, match="num_workers must be an integer >= 0"):
        get_dataset("imagefolder", root=str(root), num_workers=-1)
