"""Checkpoints of other projects load unchanged.

Published files: ``load_weights`` reads them in the layouts those projects
write (mdistiller, CRD, DataParallel, torchvision hub files, the InDistill
authors' state dicts), always with ``weights_only=True``.

Key lists: ``tests/data/mdistiller_keys/<arch>.json`` holds the state-dict keys
and shapes of mdistiller's / CRD's CIFAR-100 models (written down from their
model definitions by ``generate.py`` there, without our model code). Each test
builds a state dict with exactly those keys and shapes and loads it with
``strict=True`` into our model of the same name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from indistill.checkpoint import export_safetensors, load_weights
from indistill.errors import UserError
from indistill.models import create_model

KEYS_DIR = Path(__file__).parent / "data" / "mdistiller_keys"

# Every CIFAR-100 architecture of mdistiller / RepDistiller, by their names.
THEIR_ARCHS = [
    *(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)),
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "ResNet50", "mobile_half", "ShuffleV1", "ShuffleV2",
]


def _their_keys(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(s)) for k, s in json.loads((KEYS_DIR / f"{arch}.json").read_text())]


def _state_from_keys(entries: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the given shapes at trained-like scales; BN counters are 0-d int64 as torch saves them."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in entries:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(240 * 391, dtype=torch.long)
        elif key.endswith("running_var") or (len(shape) == 1 and key.endswith(".weight")):  # BN variance, gamma
            state[key] = torch.rand(shape, generator=g) * 0.5 + 0.5
        elif len(shape) > 1:  # conv / linear weights, half of He scale
            state[key] = torch.randn(shape, generator=g) * 0.5 * (2.0 / torch.Size(shape[1:]).numel()) ** 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


def test_key_lists_cover_every_cifar100_architecture():
    assert sorted(p.stem for p in KEYS_DIR.glob("*.json")) == sorted(THEIR_ARCHS)


@pytest.mark.parametrize("arch", THEIR_ARCHS)
def test_their_state_dict_loads_strictly_into_ours(arch: str):
    entries = _their_keys(arch)
    state = _state_from_keys(entries)
    model = create_model(arch, num_classes=100)  # their names: directly or as aliases
    model.load_state_dict(state, strict=True)
    ours = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == entries  # same keys, shapes and order
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("arch", ["wrn_16_2", "wrn_40_1"])
def test_wrn_checkpoints_with_our_former_shortcut_key_still_load(arch: str):
    state = _state_from_keys(_their_keys(arch), seed=1)
    legacy = {k.replace("convShortcut", "conv_shortcut"): v for k, v in state.items()}
    assert legacy != state
    model = create_model(arch, num_classes=100)
    model.load_state_dict(legacy, strict=True)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


# ---- published checkpoint files: load_weights ----------------------------------------------------


def _equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: str = "~") -> None:
    assert a.keys() == b.keys()
    for key in a:
        if not key.startswith(skip):
            assert torch.equal(a[key], b[key]), key


def _trained(arch: str, classes: int = 100, seed: int = 3) -> torch.nn.Module:
    model = create_model(arch, num_classes=classes)
    model.load_state_dict(_state_from_keys([(k, tuple(v.shape)) for k, v in model.state_dict().items()], seed))
    return model


def test_mdistiller_checkpoint_layout(tmp_path):
    # mdistiller's trainer: {"epoch", "model", "optimizer", "best_acc"}, a float accuracy.
    src = _trained("resnet8x4")
    opt = torch.optim.SGD(src.parameters(), lr=0.05, momentum=0.9)
    src(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": src.state_dict(), "optimizer": opt.state_dict(), "best_acc": 73.09}, path)
    dst = load_weights(create_model("resnet8x4", num_classes=100), path)
    _equal_states(dst.state_dict(), src.state_dict())


def test_repdistiller_checkpoint_layout_with_numpy_and_tensor_scalars(tmp_path):
    # CRD's train_teacher.py: {"epoch", "model", "accuracy" / "best_acc", "optimizer"}; accuracies saved as
    # tensors, and numpy scalars in other scripts: both must pass torch.load(weights_only=True).
    np = pytest.importorskip("numpy")
    src = _trained("wrn_40_1")
    path = tmp_path / "wrn_40_1_best.pth"
    torch.save({"epoch": 240, "model": src.state_dict(), "accuracy": torch.tensor(71.98),
                "best_acc": np.float64(71.98), "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005}]}}, path)
    dst = load_weights(create_model("wrn_40_1", num_classes=100), path)
    _equal_states(dst.state_dict(), src.state_dict())


def test_files_without_batchnorm_counters_load(tmp_path):
    # torch < 0.4.1 saved no num_batches_tracked; BatchNorm fills it in on a strict load.
    src = _trained("resnet20")
    old = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save({"model": old, "epoch": 240}, path)
    dst = load_weights(create_model("resnet20", num_classes=100), path)
    _equal_states({k: v for k, v in dst.state_dict().items() if k in old}, old)


@pytest.mark.parametrize("wrapper", ["state_dict", "net", None])
def test_dataparallel_prefix_and_wrappers(tmp_path, wrapper: str | None):
    src = _trained("ShuffleV1")
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    obj = state if wrapper is None else {wrapper: state, "acc": 95.1, "epoch": 199}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    dst = load_weights(create_model("ShuffleV1", num_classes=100), path)
    _equal_states(dst.state_dict(), src.state_dict())


def test_weights_only_is_kept(tmp_path):
    path = tmp_path / "pickled_module.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a pickled module: code, not weights
    with pytest.raises(UserError, match="weights-only"):
        load_weights(torch.nn.Linear(2, 2), path)
    path = tmp_path / "no_weights.pth"
    torch.save({"epoch": 3, "best_acc": 1.0}, path)
    with pytest.raises(UserError, match="holds no model weights"):
        load_weights(torch.nn.Linear(2, 2), path)


@pytest.fixture(scope="module")
def imagenet_resnet18(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A file in torchvision's hub layout: a plain state dict of ResNet-18 with 1000 classes."""
    torch.manual_seed(5)
    state = create_model("resnet18", num_classes=1000).state_dict()
    path = tmp_path_factory.mktemp("hub") / "resnet18-f37072fd.pth"
    torch.save(state, path)
    return path, state


def test_imagenet_head_into_10_classes_names_both_counts(imagenet_resnet18):
    path, _ = imagenet_resnet18
    with pytest.raises(UserError, match=r"1000-class classifier \(fc\) but the model has 10 classes.*reset_head") as e:
        load_weights(create_model("resnet18", num_classes=10), path)
    assert "\n" not in str(e.value)


def test_reset_head_loads_all_but_the_classifier(imagenet_resnet18, caplog):
    path, state = imagenet_resnet18
    torch.manual_seed(11)
    model = create_model("resnet18", num_classes=10)
    fresh_fc = {k: v.clone() for k, v in model.fc.state_dict().items()}
    with caplog.at_level("WARNING", logger="indistill.checkpoint"):
        load_weights(model, path, reset_head=True)
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert torch.equal(model.fc.weight, fresh_fc["weight"]) and torch.equal(model.fc.bias, fresh_fc["bias"])
    assert "fc.bias" in caplog.text and "fc.weight" in caplog.text
    # The zoo factory exposes the same option for its weights_path.
    built = create_model("resnet18", num_classes=10, weights_path=str(path), reset_head=True)
    assert torch.equal(built.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_reset_head_on_torchvision_mobilenet_v2(tmp_path):
    state = create_model("mobilenet_v2", num_classes=1000).state_dict()
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=r"1000-class classifier \(classifier.1\).*10 classes"):
        load_weights(create_model("mobilenet_v2", num_classes=10), path)
    model = load_weights(create_model("mobilenet_v2", num_classes=10), path, reset_head=True)
    assert torch.equal(model.features[18][0].weight, state["features.18.0.weight"])
    assert model.classifier[1].out_features == 10


def test_reset_head_still_rejects_other_mismatches(tmp_path):
    path = tmp_path / "resnet20.pth"
    torch.save({"model": create_model("resnet20", num_classes=100).state_dict()}, path)
    with pytest.raises(UserError, match="does not fit"):
        load_weights(create_model("resnet32", num_classes=10), path, reset_head=True)
    # Another architecture with another class count is not mistaken for a head-only mismatch.
    with pytest.raises(UserError, match="does not fit"):
        load_weights(create_model("resnet8x4", num_classes=10), path)


def test_cnn_checkpoint_with_authors_keys_and_another_class_count(tmp_path):
    # The InDistill authors save net.state_dict() of Cnn32 (conv1, conv1_bn, ..., fc1, fc2) on CIFAR-10.
    src = create_model("cnn32", num_classes=10)
    theirs = {}
    for key, value in src.state_dict().items():
        for i in (1, 2, 3):
            key = key.replace(f"block{i}.conv.", f"conv{i}.").replace(f"block{i}.bn.", f"conv{i}_bn.")
        theirs[key] = value
    path = tmp_path / "auxiliary_baseline_cifar10.pt"
    torch.save(theirs, path)
    _equal_states(load_weights(create_model("cnn32", num_classes=10), path).state_dict(), src.state_dict())
    model = load_weights(create_model("cnn32", num_classes=100), path, reset_head=True)
    assert torch.equal(model.fc1.weight, src.fc1.weight) and model.fc2.out_features == 100


def test_safetensors_export_roundtrip(tmp_path):
    src = _trained("mobile_half")
    path = export_safetensors(src, tmp_path / "mobile_half.safetensors")
    _equal_states(load_weights(create_model("mobile_half", num_classes=100), path).state_dict(), src.state_dict())
    with pytest.raises(UserError, match="not found"):
        load_weights(src, tmp_path / "missing.safetensors")
