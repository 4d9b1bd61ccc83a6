"""CIFAR ResNets of the KD literature (CRD / mdistiller ``resnet.py`` definitions).

``resnet{8,14,20,32,44,56,110}``: a 3x3 stem of 16 channels and three stages of
BasicBlocks with 16/32/64 channels, ``(depth - 2) / 6`` blocks each.
``resnet8x4`` / ``resnet32x4``: stem 32, stages 64/128/256. A 1x1 conv + BN
``downsample`` shortcut is used wherever the block changes shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ...errors import UserError
from ..registry import register_model
from ._common import check_io, check_widths, kaiming_init

RESNET_CIFAR_TAPS = {
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "embedding": "fc:in",
    "logits": "@output",
}


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet-``depth`` for small images; ``depth = 6n + 2``.

    ``widths`` are the three stage widths; ``stem_width`` (default
    ``widths[0]``) the stem's. Global average pooling makes any input size work.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        stem_width: int | None = None,
    ):
        super().__init__()
        check_io(num_classes, in_channels)
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise UserError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110), got {depth!r}")
        w = check_widths("widths", widths, 3)
        stem = w[0] if stem_width is None else check_widths("stem_width", (stem_width,), 1)[0]
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(stem, w[0], n, stride=1)
        self.layer2 = self._make_layer(w[0], w[1], n, stride=2)
        self.layer3 = self._make_layer(w[1], w[2], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(w[2], num_classes)
        kaiming_init(self)

    @staticmethod
    def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(inplanes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _register(
    depth: int, suffix: str = "", widths: tuple[int, int, int] = (16, 32, 64), stem: int | None = None
) -> None:
    name = f"resnet{depth}{suffix}"

    def factory(num_classes: int, in_channels: int = 3, **kw) -> CifarResNet:
        kw.setdefault("widths", widths)
        kw.setdefault("stem_width", stem)
        return CifarResNet(depth, num_classes, in_channels, **kw)

    factory.__name__ = name
    factory.__doc__ = f"CIFAR ResNet-{depth}{suffix}: stem {stem or widths[0]}, stages {'/'.join(map(str, widths))}."
    register_model(name, taps=RESNET_CIFAR_TAPS)(factory)
    globals()[name] = factory


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(_depth)
_register(8, "x4", (64, 128, 256), 32)
_register(32, "x4", (64, 128, 256), 32)
