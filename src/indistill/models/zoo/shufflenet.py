"""CIFAR ShuffleNets of CRD / mdistiller: ``shufflenet_v1`` (``ShuffleV1``), ``shufflenet_v2`` (``ShuffleV2``).

Both start with a 1x1 conv to 24 channels (no stride: CIFAR inputs are
small) and three stages ``layer1``..``layer3`` that each halve the map, so
32x32 inputs give 16/8/4 maps; these are the stage taps. The embedding is the
classifier (``linear``) input after global average pooling.

- V1 (groups 3): stages of 4/8/4 bottlenecks to 240/480/960 channels. A
  stride-2 bottleneck concatenates its branch with a 3x3 average-pooled
  input; the others add. The first 1x1 conv of the network's first block is
  ungrouped (it reads the 24-channel stem).
- V2 (net size 1): each stage is a down-sampling block, then 3/7/3 basic
  blocks (116/232/464 channels), then ``conv2`` to 1024 channels + BN + ReLU.

State-dict keys are theirs, so their checkpoints load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...errors import UserError
from ..registry import register_model
from ._common import check_io, check_widths

SHUFFLE_TAPS = {
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "embedding": "linear:in",
    "logits": "@output",
}

STEM = 24


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` equal groups: (g, C/g) -> (C/g, g)."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    """Grouped 1x1, shuffle, 3x3 depthwise (stride), grouped 1x1; add (stride 1) or concat with pooled input (2)."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        mid = cout // 4
        self.stride = stride
        self.shuffle_groups = first_groups
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(self.relu1(self.bn1(self.conv1(x))), self.shuffle_groups)
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.relu3(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """ShuffleNet V1: stem ``conv1``/``bn1``, ``layer1``..``layer3``, ``linear``."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        out_planes: Sequence[int] = (240, 480, 960),
        num_blocks: Sequence[int] = (4, 8, 4),
        groups: int = 3,
    ):
        super().__init__()
        check_io(num_classes, in_channels)
        planes = check_widths("out_planes", out_planes, 3)
        blocks = check_widths("num_blocks", num_blocks, 3)
        cin = STEM
        for p in planes:
            # Each stage's first block concatenates its input, so its branch makes p - cin channels.
            if p <= cin or (p - cin) % (4 * groups) or p % (4 * groups):
                raise UserError(
                    f"ShuffleNetV1 out_planes {planes} do not fit groups={groups}; use e.g. (240, 480, 960)"
                )
            cin = p
        self.conv1 = nn.Conv2d(in_channels, STEM, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM)
        self.relu = nn.ReLU()
        cin = STEM
        for i, (p, n) in enumerate(zip(planes, blocks)):
            layers = []
            for j in range(n):
                cout = p - cin if j == 0 else p
                first_groups = 1 if (i == 0 and j == 0) else groups
                layers.append(ShuffleV1Block(cin, cout, 2 if j == 0 else 1, groups, first_groups))
                cin = p
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


class ShuffleV2Block(nn.Module):
    """Split channels in half; the second half: 1x1 + BN + ReLU, 3x3 dw + BN, 1x1 + BN + ReLU; concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.half = half
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        keep, branch = x[:, : self.half], x[:, self.half :]
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(branch)))))
        out = self.relu3(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([keep, out], 1), 2)


class ShuffleV2Down(nn.Module):
    """Stride-2 block; concat of left (3x3 dw + BN, 1x1 + BN + ReLU) and right (1x1 + BN + ReLU,
    3x3 dw + BN, 1x1 + BN + ReLU), then shuffle."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.relu3(self.bn3(self.conv3(x)))))
        right = self.relu5(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2: stem ``conv1``/``bn1``, ``layer1``..``layer3``, ``conv2``/``bn2``, ``linear``."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        out_channels: Sequence[int] = (116, 232, 464, 1024),
        num_blocks: Sequence[int] = (3, 7, 3),
    ):
        super().__init__()
        check_io(num_classes, in_channels)
        chans = check_widths("out_channels", out_channels, 4)
        blocks = check_widths("num_blocks", num_blocks, 3)
        if any(c % 2 for c in chans[:3]):
            raise UserError(f"ShuffleNetV2 stage channels must be even (they are split in half), got {chans[:3]}")
        self.conv1 = nn.Conv2d(in_channels, STEM, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM)
        self.relu = nn.ReLU()
        cin = STEM
        for i, (c, n) in enumerate(zip(chans[:3], blocks)):
            stage = [ShuffleV2Down(cin, c), *[ShuffleV2Block(c) for _ in range(n)]]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            cin = c
        self.conv2 = nn.Conv2d(cin, chans[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(chans[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(chans[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(self.flatten(self.avgpool(x)))


@register_model("shufflenet_v1", taps=SHUFFLE_TAPS, aliases=("ShuffleV1",))
def shufflenet_v1(num_classes: int, in_channels: int = 3, **kw) -> ShuffleNetV1:
    """ShuffleNet V1 (groups 3, 240/480/960 channels) for 32x32 inputs."""
    return ShuffleNetV1(num_classes, in_channels, **kw)


@register_model("shufflenet_v2", taps=SHUFFLE_TAPS, aliases=("ShuffleV2",))
def shufflenet_v2(num_classes: int, in_channels: int = 3, **kw) -> ShuffleNetV2:
    """ShuffleNet V2 (net size 1: 116/232/464 channels, 1024-d embedding) for 32x32 inputs."""
    return ShuffleNetV2(num_classes, in_channels, **kw)
