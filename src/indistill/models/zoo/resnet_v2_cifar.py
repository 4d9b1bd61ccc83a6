"""CIFAR ResNet-18/50 with a 64-channel stem (CRD / mdistiller ``resnetv2.py``): ``resnet18_cifar``, ``resnet50_cifar``.

Unlike the ``resnet{depth}`` family (16-channel stem, three stages), these
have the ImageNet stage layout (64/128/256/512 planes, four stages) on a 3x3
stride-1 stem with no max-pool, so 32x32 inputs give 32/16/8/4 maps.
``resnet50_cifar`` uses bottleneck blocks (expansion 4, stages
256/512/1024/2048 channels): the CIFAR-100 ``ResNet50`` teacher of the KD
literature (aliases ``ResNet50``; ``ResNet18`` for the basic-block version).

State-dict keys are theirs (``layerK.I.shortcut.0``, ``linear``) so their
published checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..registry import register_model
from ._common import check_io, check_widths, kaiming_init

RESNET_V2_TAPS = {
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "stage4": "layer4",
    "embedding": "linear:in",
    "logits": "@output",
}


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    """1x1 conv + BN shortcut where the block changes shape; an empty (identity) Sequential otherwise."""
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlockV2(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(cin, planes, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class BottleneckV2(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand to ``4 * planes``; post-activation sum."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _projection(cin, cout, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class CifarResNetV2(nn.Module):
    """Four-stage ResNet for small images: stem ``conv1``/``bn1``, ``layer1``..``layer4``, ``linear``."""

    def __init__(
        self,
        block: type[BasicBlockV2] | type[BottleneckV2],
        blocks: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
    ):
        super().__init__()
        check_io(num_classes, in_channels)
        n = check_widths("blocks", blocks, 4)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        cin = 64
        for i, planes in enumerate((64, 128, 256, 512)):
            layers = []
            for j in range(n[i]):
                layers.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(cin, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.flatten(self.avgpool(x)))


@register_model("resnet18_cifar", taps=RESNET_V2_TAPS, aliases=("ResNet18",))
def resnet18_cifar(num_classes: int, in_channels: int = 3) -> CifarResNetV2:
    """ResNet-18 for 32x32 inputs (basic blocks 2/2/2/2, stages 64/128/256/512)."""
    return CifarResNetV2(BasicBlockV2, (2, 2, 2, 2), num_classes, in_channels)


@register_model("resnet50_cifar", taps=RESNET_V2_TAPS, aliases=("ResNet50",))
def resnet50_cifar(num_classes: int, in_channels: int = 3) -> CifarResNetV2:
    """ResNet-50 for 32x32 inputs (bottlenecks 3/4/6/3, stages 256/512/1024/2048)."""
    return CifarResNetV2(BottleneckV2, (3, 4, 6, 3), num_classes, in_channels)
