"""Wide ResNets (pre-activation), as in CRD's ``wrn.py``: ``wrn_{depth}_{k}``.

Stem 16, then three ``NetworkBlock`` stages (``block1``..``block3``) of
``(depth - 4) / 6`` pre-activation blocks with 16k, 32k, 64k channels, a final
BatchNorm + ReLU, global average pooling and ``fc``. Because the blocks are
pre-activation, the representation handed onward after stage 3 is the final
``relu`` output, which is therefore the ``stage3`` tap.

State-dict keys are those of CRD / mdistiller (``block2.layer.0.convShortcut``),
so their WRN checkpoints load with ``strict=True``; files saved by earlier
versions of this zoo (``conv_shortcut``) still load, renamed on the fly.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...errors import UserError
from ..registry import register_model
from ._common import check_io, kaiming_init

WRN_TAPS = {
    "stage1": "block1",
    "stage2": "block2",
    "stage3": "relu",
    "embedding": "fc:in",
    "logits": "@output",
}


class WideBasic(nn.Module):
    """Pre-activation block; when the shape changes, the 1x1 shortcut reads the pre-activated input."""

    def __init__(self, inplanes: int, planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.equal_in_out = inplanes == planes and stride == 1
        # camelCase on purpose: the key name of the CRD / mdistiller checkpoints.
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self._register_load_state_dict_pre_hook(_accept_legacy_shortcut_key)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        out = self.conv2(self.drop(self.relu2(self.bn2(self.conv1(pre)))))
        return out + shortcut


def _accept_legacy_shortcut_key(state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
    # Earlier indistill checkpoints named the shortcut conv_shortcut.
    old = f"{prefix}conv_shortcut.weight"
    if old in state_dict:
        state_dict.setdefault(f"{prefix}convShortcut.weight", state_dict.pop(old))


class NetworkBlock(nn.Module):
    """A stage: ``layer`` holds its blocks (module paths ``blockK.layer.I``)."""

    def __init__(self, n: int, inplanes: int, planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasic(inplanes if i == 0 else planes, planes, stride if i == 0 else 1, drop_rate) for i in range(n)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; ``depth = 6n + 4``."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3, drop_rate: float = 0.0
    ):
        super().__init__()
        check_io(num_classes, in_channels)
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise UserError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40), got {depth!r}")
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise UserError(f"WRN widen_factor must be a positive integer, got {widen_factor!r}")
        n = (depth - 4) // 6
        c = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, c[0], 3, padding=1, bias=False)
        self.block1 = NetworkBlock(n, c[0], c[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, c[1], c[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, c[2], c[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(c[3], num_classes)
        kaiming_init(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.flatten(self.avgpool(x)))


WRN_VARIANTS = ((16, 1), (16, 2), (16, 4), (28, 2), (28, 4), (40, 1), (40, 2), (40, 4))


def _register(depth: int, k: int) -> None:
    name = f"wrn_{depth}_{k}"

    def factory(num_classes: int, in_channels: int = 3, **kw) -> WideResNet:
        return WideResNet(depth, k, num_classes, in_channels, **kw)

    factory.__name__ = name
    factory.__doc__ = f"Wide ResNet depth {depth}, widen factor {k} (stages {16 * k}/{32 * k}/{64 * k})."
    register_model(name, taps=WRN_TAPS)(factory)
    globals()[name] = factory


for _depth, _k in WRN_VARIANTS:
    _register(_depth, _k)
