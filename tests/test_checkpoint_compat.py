"""Checkpoints of other projects load unchanged.

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
    """Random tensors of the given shapes (roughly trained-like scales); BN counters are 0-d int64 as torch saves them."""
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
