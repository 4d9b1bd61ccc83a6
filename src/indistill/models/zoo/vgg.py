"""CIFAR VGG with BatchNorm (CRD's ``vgg.py``): ``vgg8``, ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19``.

Five conv blocks ``block0``..``block4`` (3x3 conv, BN, ReLU each), max-pools
``pool0``..``pool2`` after the first three, ``pool3`` after ``block3`` only when
its map is larger than 4x4 (CRD pools there for 64x64 inputs, not for 32x32),
then global average pooling ``pool4`` and a linear ``classifier``.

Taps: ``stage1``..``stage3`` are the pooled outputs of blocks 0-2 and
``stage4`` is the last conv block's output (``block4``); on 32x32 inputs these
are 16x16, 8x8, 4x4 and 4x4 maps.

State-dict keys are CRD's / mdistiller's (``block0.0``, ``block0.1``, ...,
``classifier``), whose ``vggN_bn`` functions are also aliases here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ...errors import UserError
from ..registry import register_model
from ._common import MaxPool2d, check_io

VGG_TAPS = {
    "stage1": "pool0",
    "stage2": "pool1",
    "stage3": "pool2",
    "stage4": "block4",
    "embedding": "classifier:in",
    "logits": "@output",
}

# Per-block conv widths, as CRD's cfg 'S', 'A', 'B', 'D' and 'E'.
VGG_CFGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _block(cin: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG-BN for small images; ``cfg`` lists the conv widths of the five blocks."""

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int, in_channels: int = 3):
        super().__init__()
        check_io(num_classes, in_channels)
        cfg = [tuple(b) for b in cfg]
        if len(cfg) != 5 or not all(b and all(isinstance(w, int) and w > 0 for w in b) for b in cfg):
            raise UserError(f"VGG cfg must be 5 non-empty lists of positive widths, got {cfg!r}")
        cins = [in_channels] + [b[-1] for b in cfg[:-1]]
        for i, (cin, widths) in enumerate(zip(cins, cfg)):
            self.add_module(f"block{i}", _block(cin, widths))
        self.pool0 = MaxPool2d(2, 2)
        self.pool1 = MaxPool2d(2, 2)
        self.pool2 = MaxPool2d(2, 2)
        self.pool3 = MaxPool2d(2, 2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if x.shape[-1] > 4 and x.shape[-2] > 4:
            x = self.pool3(x)
        x = self.block4(x)
        return self.classifier(self.flatten(self.pool4(x)))


def _register(name: str) -> None:
    def factory(num_classes: int, in_channels: int = 3, **kw) -> CifarVGG:
        return CifarVGG(VGG_CFGS[name], num_classes, in_channels, **kw)

    factory.__name__ = name
    factory.__doc__ = f"CIFAR {name.upper()} with BatchNorm."
    register_model(name, taps=VGG_TAPS, aliases=(f"{name}_bn",))(factory)
    globals()[name] = factory


for _name in VGG_CFGS:
    _register(_name)

