"""MobileNetV2 for CIFAR as in CRD / mdistiller (``mobile_half``): ``mobilenetv2_cifar``.

A 3x3 stride-2 stem ``conv1``, seven stages ``blocks.0``..``blocks.6`` of
inverted residuals (expansion ``t``, channels 16/24/32/64/96/160/320 times
``width_mult``, strides 1/1/2/2/1/2/1), a 1x1 ``conv2`` to 1280 channels,
global average pooling and ``classifier.0``. The default is theirs
``mobile_half``: ``t = 6``, ``width_mult = 0.5``. Unlike torchvision's,
every inverted residual keeps its expansion 1x1 conv, also when ``t = 1``:
that is what their state dicts hold (``blocks.I.J.conv.0`` .. ``conv.7``).

Taps follow their feature list: ``stage1`` = ``blocks.1`` (stride 2),
``stage2`` = ``blocks.2`` (4), ``stage3`` = ``blocks.4`` (8),
``stage4`` = ``blocks.6`` (16); on 32x32 inputs 12x16x16, 16x8x8, 48x4x4
and 160x2x2 for ``mobile_half``. The embedding is the pooled 1280-d ``conv2``
output (the classifier's input).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ...errors import UserError
from ..registry import register_model
from ._common import check_io

MOBILENETV2_CIFAR_TAPS = {
    "stage1": "blocks.1",
    "stage2": "blocks.2",
    "stage3": "blocks.4",
    "stage4": "blocks.6",
    "embedding": "classifier.0:in",
    "logits": "@output",
}

# (expansion (None = the network's t), channels, blocks, first stride) per stage.
_STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
           (None, 160, 3, 2), (None, 320, 1, 1))


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expand + BN + ReLU, 3x3 depthwise + BN + ReLU, 1x1 project + BN; identity sum when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 with a stride-2 stem for 32x32 inputs; ``expand`` is t, ``width_mult`` scales the stages."""

    def __init__(self, num_classes: int, in_channels: int = 3, expand: int = 6, width_mult: float = 0.5):
        super().__init__()
        check_io(num_classes, in_channels)
        if not isinstance(expand, int) or expand < 1:
            raise UserError(f"expand must be a positive integer (6 in mobile_half), got {expand!r}")
        if not isinstance(width_mult, (int, float)) or not width_mult > 0 or int(16 * width_mult) < 1:
            raise UserError(f"width_mult must be a number >= 0.0625 (0.5 in mobile_half), got {width_mult!r}")
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, cin, 3, stride=2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _STAGES:
            cout = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, expand if t is None else t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self._init()

    def _init(self) -> None:
        # He-normal with fan_out = k*k*out_channels, as the reference code initialises.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.flatten(self.avgpool(self.conv2(x))))


@register_model("mobilenetv2_cifar", taps=MOBILENETV2_CIFAR_TAPS, aliases=("mobile_half", "MobileNetV2"))
def mobilenetv2_cifar(num_classes: int, in_channels: int = 3, **kw) -> MobileNetV2Cifar:
    """CIFAR MobileNetV2, by default the KD literature's ``mobile_half`` (t=6, width 0.5)."""
    return MobileNetV2Cifar(num_classes, in_channels, **kw)
