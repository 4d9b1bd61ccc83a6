"""The paper's small CNNs (InDistill, Sec. 4): ``cnn32`` (auxiliary) and ``cnn32_small`` (student).

Each of the three blocks is a 3x3 convolution without padding, BatchNorm,
ReLU and 2x2 max-pooling; on 32x32 inputs the maps go 32->30->15->13->6->4->2.
Two ReLU fully connected layers follow, then the classifier.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from ...errors import UserError
from ..registry import register_model
from ._common import MaxPool2d, check_io, check_widths

CNN_TAPS = {
    "stage1": "block1",
    "stage2": "block2",
    "stage3": "block3",
    "embedding": "classifier:in",
    "logits": "@output",
}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel_size=3, padding=0),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(),
            pool=MaxPool2d(2),
        )
    )


class Cnn32(nn.Module):
    """Three conv blocks (``block1``..``block3``), ``fc1``, ``fc2`` and ``classifier``.

    ``input_size`` is the (square) input side the flattened size is computed
    for: 32 gives a 2x2 final map, 28 (Fashion-MNIST) a 1x1 map.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        fc: Sequence[int] = (256, 128),
        input_size: int = 32,
    ):
        super().__init__()
        check_io(num_classes, in_channels)
        w = check_widths("widths", widths, 3)
        f = check_widths("fc", fc, 2)
        side = input_size
        for _ in range(3):
            side = (side - 2) // 2  # valid 3x3 conv, then floor 2x2 pool
        if side < 1:
            raise UserError(f"input_size {input_size} is too small for three conv+pool blocks; use at least 22")
        self.block1 = _block(in_channels, w[0])
        self.block2 = _block(w[0], w[1])
        self.block3 = _block(w[1], w[2])
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(w[2] * side * side, f[0])
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(f[0], f[1])
        self.relu2 = nn.ReLU()
        self.classifier = nn.Linear(f[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.classifier(x)


@register_model("cnn32", taps=CNN_TAPS)
def cnn32(num_classes: int, in_channels: int = 3, **kw) -> Cnn32:
    """The paper's auxiliary network: convs 16/32/64, fc 256-128."""
    kw.setdefault("widths", (16, 32, 64))
    kw.setdefault("fc", (256, 128))
    return Cnn32(num_classes, in_channels, **kw)


@register_model("cnn32_small", taps=CNN_TAPS)
def cnn32_small(num_classes: int, in_channels: int = 3, **kw) -> Cnn32:
    """The paper's student network: convs 8/16/32, fc 128-64."""
    kw.setdefault("widths", (8, 16, 32))
    kw.setdefault("fc", (128, 64))
    return Cnn32(num_classes, in_channels, **kw)
