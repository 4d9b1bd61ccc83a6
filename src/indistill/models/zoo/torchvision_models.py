"""ImageNet models from ``torchvision.models``: ``resnet18``, ``resnet34``, ``resnet50``, ``mobilenet_v2``.

Weights are never downloaded: ``weights_path`` loads a local state dict
(``.pt``/``.pth`` via ``torch.load(weights_only=True)``, or ``.safetensors``),
e.g. torchvision's own ImageNet files, which are plain state dicts with the
same keys. For another class count pass ``reset_head=True``: everything but
the classifier (``fc`` / ``classifier.1``) is loaded.
``in_channels != 3`` replaces the first convolution (fresh weights, so a loaded
RGB checkpoint needs ``in_channels=3``).

MobileNetV2 taps are the last ``features`` block before each stride change,
i.e. the ends of the stride-4/8/16/32 stages:
``features.3`` (24 ch), ``features.6`` (32 ch), ``features.13`` (96 ch) and
``features.18`` (the 1x1 conv to 1280 ch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from ...checkpoint import allow_numpy_scalars, load_state, model_state
from ...errors import UserError
from ..registry import register_model
from ._common import check_io

RESNET_TAPS = {
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "stage4": "layer4",
    "embedding": "fc:in",
    "logits": "@output",
}

MOBILENET_V2_TAPS = {
    "stage1": "features.3",
    "stage2": "features.6",
    "stage3": "features.13",
    "stage4": "features.18",
    "embedding": "classifier.1:in",
    "logits": "@output",
}


def _replace_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=conv.bias is not None,
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state dict (``.safetensors`` or a ``torch.save`` file) without unpickling code.

    Training checkpoints that wrap the weights (``{"model": ...}``,
    ``{"state_dict": ...}``, ``{"net": ...}``) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file '{path}' does not exist; give the path of a local state dict")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with allow_numpy_scalars():
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read weights file '{path}': {str(e).splitlines()[0]}") from None
    return model_state(state)


def _load_weights(model: nn.Module, weights_path: str | Path, reset_head: bool = False) -> None:
    load_state(model, load_state_dict_file(weights_path), str(weights_path), reset_head=reset_head)


def _build(
    ctor: Callable[..., nn.Module],
    set_first_conv: Callable[[nn.Module, int], None],
    num_classes: int,
    in_channels: int,
    weights_path: str | Path | None,
    reset_head: bool = False,
    **kw: Any,
) -> nn.Module:
    check_io(num_classes, in_channels)
    if "weights" in kw and kw["weights"] is not None:
        raise UserError("downloading torchvision weights is not supported; save them locally and pass weights_path")
    kw.pop("weights", None)
    model = ctor(weights=None, num_classes=num_classes, **kw)
    if in_channels != 3:
        set_first_conv(model, in_channels)
    if weights_path is not None:
        # The classifier (fc / classifier.1) is the model's last nn.Linear, which is what load_state resets.
        _load_weights(model, weights_path, reset_head)
    elif reset_head:
        raise UserError("reset_head=True needs a weights_path to load; remove reset_head or give the weights")
    return model


def _resnet_conv1(model: nn.Module, in_channels: int) -> None:
    model.conv1 = _replace_first_conv(model.conv1, in_channels)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")


def _mobilenet_conv1(model: nn.Module, in_channels: int) -> None:
    model.features[0][0] = _replace_first_conv(model.features[0][0], in_channels)
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")


@register_model("resnet18", taps=RESNET_TAPS)
def resnet18(num_classes: int, in_channels: int = 3, weights_path: str | Path | None = None, **kw: Any) -> nn.Module:
    """torchvision ResNet-18 (ImageNet stem)."""
    return _build(torchvision.models.resnet18, _resnet_conv1, num_classes, in_channels, weights_path, **kw)


@register_model("resnet34", taps=RESNET_TAPS)
def resnet34(num_classes: int, in_channels: int = 3, weights_path: str | Path | None = None, **kw: Any) -> nn.Module:
    """torchvision ResNet-34 (ImageNet stem)."""
    return _build(torchvision.models.resnet34, _resnet_conv1, num_classes, in_channels, weights_path, **kw)


@register_model("resnet50", taps=RESNET_TAPS)
def resnet50(num_classes: int, in_channels: int = 3, weights_path: str | Path | None = None, **kw: Any) -> nn.Module:
    """torchvision ResNet-50 (bottleneck blocks; stages 256/512/1024/2048)."""
    return _build(torchvision.models.resnet50, _resnet_conv1, num_classes, in_channels, weights_path, **kw)


@register_model("mobilenet_v2", taps=MOBILENET_V2_TAPS)
def mobilenet_v2(
    num_classes: int, in_channels: int = 3, weights_path: str | Path | None = None, **kw: Any
) -> nn.Module:
    """torchvision MobileNetV2 (width_mult and other torchvision kwargs pass through)."""
    return _build(torchvision.models.mobilenet_v2, _mobilenet_conv1, num_classes, in_channels, weights_path, **kw)
