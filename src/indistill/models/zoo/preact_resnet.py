"""Pre-activation ResNet-18 for CIFAR (the paper's CIFAR-10 teacher).

As kuangliu/pytorch-cifar's ``PreActResNet18`` (3x3 stem of 64, stages
64/128/256/512 with two pre-activation blocks each, 1x1 conv shortcuts where
the shape changes), plus the final BatchNorm + ReLU of He et al. (2016) that a
pre-activation network needs before pooling. ``stage4`` is that final ``relu``,
the representation actually fed to the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..registry import register_model
from ._common import check_io, check_widths, kaiming_init

PREACT_TAPS = {
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "stage4": "relu",
    "embedding": "fc:in",
    "logits": "@output",
}


class PreActBlock(nn.Module):
    """``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``; a 1x1 shortcut reads the pre-activated input."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with ``blocks`` per stage and stage ``widths``."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        blocks: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
    ):
        super().__init__()
        check_io(num_classes, in_channels)
        b = check_widths("blocks", blocks, 4)
        w = check_widths("widths", widths, 4)
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, padding=1, bias=False)
        cin = w[0]
        for i in range(4):
            stride = 1 if i == 0 else 2
            layer = [PreActBlock(cin, w[i], stride)] + [PreActBlock(w[i], w[i]) for _ in range(b[i] - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            cin = w[i]
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)
        kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.relu(self.bn(x))
        return self.fc(self.flatten(self.avgpool(x)))


@register_model("preact_resnet18", taps=PREACT_TAPS)
def preact_resnet18(num_classes: int, in_channels: int = 3, **kw) -> PreActResNet:
    """PreActResNet-18 for 32x32 inputs (stages 64/128/256/512, two blocks each)."""
    return PreActResNet(num_classes, in_channels, **kw)
