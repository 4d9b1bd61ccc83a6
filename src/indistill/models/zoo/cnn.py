"""The paper's small CNNs (InDistill, Sec. 4): ``cnn32`` (auxiliary) and ``cnn32_small`` (student).

As the authors' ``Cnn32`` / ``Cnn32_Small``: three blocks of a 3x3 convolution
without padding, BatchNorm, ReLU and 2x2 max-pooling (on 32x32 inputs the maps
go 32->30->15->13->6->4->2; 28x28 inputs end at 1x1), then ONE hidden fully
connected layer ``fc1`` + ReLU and the classifier ``fc2``. The embedding is
fc1's output after the ReLU, i.e. the classifier's input.

``fc`` lists the hidden widths: the default is the authors' single layer
(128 for ``cnn32``, 64 for ``cnn32_small``); two widths give the older
two-hidden-layer head (``fc=(256, 128)``), whose classifier is then ``fc3``.
The authors' published state dicts (``conv1``, ``conv1_bn``, ... ``fc1``,
``fc2``) load unchanged: their conv keys are renamed onto ours on load.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ...errors import UserError
from ..registry import register_model
from ._common import MaxPool2d, check_io, check_widths

# The authors' conv / BN names -> ours (their files: models/cnn32.py, models/cnn32_small.py).
_AUTHOR_KEY = re.compile(r"conv([123])(_bn)?\.")


def cnn_taps(model: nn.Module) -> dict[str, str]:
    """Stage taps are the pooled block outputs; the embedding is the classifier's input."""
    return {
        "stage1": "block1",
        "stage2": "block2",
        "stage3": "block3",
        "embedding": f"{model.classifier_name}:in",
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
    """Three conv blocks (``block1``..``block3``), hidden ``fc1`` (``fc2``), classifier last.

    ``input_size`` is the (square) input side the flattened size is computed
    for: 32 gives a 2x2 final map, 28 (Fashion-MNIST unpadded) a 1x1 map.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        fc: Sequence[int] = (128,),
        input_size: int = 32,
    ):
        super().__init__()
        check_io(num_classes, in_channels)
        w = check_widths("widths", widths, 3)
        fc = tuple(fc) if isinstance(fc, (list, tuple)) else (fc,)
        if len(fc) not in (1, 2):
            raise UserError(f"fc must be 1 or 2 hidden widths (the paper uses 1, e.g. fc: [128]), got {fc!r}")
        f = check_widths("fc", fc, len(fc))
        side = input_size
        for _ in range(3):
            side = (side - 2) // 2  # valid 3x3 conv, then floor 2x2 pool
        if side < 1:
            raise UserError(f"input_size {input_size} is too small for three conv+pool blocks; use at least 22")
        self.block1 = _block(in_channels, w[0])
        self.block2 = _block(w[0], w[1])
        self.block3 = _block(w[1], w[2])
        self.flatten = nn.Flatten(1)
        cin = w[2] * side * side
        for i, width in enumerate(f, 1):
            self.add_module(f"fc{i}", nn.Linear(cin, width))
            self.add_module(f"relu{i}", nn.ReLU())
            cin = width
        self.hidden = len(f)
        self.classifier_name = f"fc{len(f) + 1}"
        self.add_module(self.classifier_name, nn.Linear(cin, num_classes))
        self._register_load_state_dict_pre_hook(self._rename_author_keys)

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (``fc2`` for the paper's head)."""
        return getattr(self, self.classifier_name)

    @staticmethod
    def _rename_author_keys(state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
        # The authors' checkpoints name the convs conv1/conv1_bn; ours live in block1.conv/block1.bn.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            m = _AUTHOR_KEY.match(key, len(prefix))
            if m:
                new = f"{prefix}block{m.group(1)}.{'bn' if m.group(2) else 'conv'}.{key[m.end():]}"
                state_dict.setdefault(new, state_dict.pop(key))

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(self.block3(self.block2(self.block1(x))))
        x = self.relu1(self.fc1(x))
        if self.hidden == 2:
            x = self.relu2(self.fc2(x))
        return self.classifier(x)


@register_model("cnn32", taps=cnn_taps)
def cnn32(num_classes: int, in_channels: int = 3, **kw: Any) -> Cnn32:
    """The paper's auxiliary network: convs 16/32/64, fc1 128, fc2 classes."""
    kw.setdefault("widths", (16, 32, 64))
    kw.setdefault("fc", (128,))
    return Cnn32(num_classes, in_channels, **kw)


@register_model("cnn32_small", taps=cnn_taps)
def cnn32_small(num_classes: int, in_channels: int = 3, **kw: Any) -> Cnn32:
    """The paper's student network: convs 8/16/32, fc1 64, fc2 classes."""
    kw.setdefault("widths", (8, 16, 32))
    kw.setdefault("fc", (64,))
    return Cnn32(num_classes, in_channels, **kw)
