"""Write the state-dict key lists of the CIFAR-100 models of mdistiller and CRD (RepDistiller).

Each ``<arch>.json`` is a list of ``[key, shape]``: the entries of
``model.state_dict()`` of their model ``<arch>`` built with ``num_classes=100``
and 3 input channels. The lists are facts about their checkpoints, written
down here from reading their model definitions (megvii-research/mdistiller
``mdistiller/models/cifar/*.py`` at e8c5bb3 and HobbitLong/RepDistiller
``models/*.py`` at eedab9d, identical in module names and shapes), by
plain bookkeeping on names and shapes: no torch, no ``nn.Module`` and
nothing from indistill, so the compatibility test does not check our models
against themselves.

Run ``python tests/data/mdistiller_keys/generate.py`` to rewrite the files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

Entry = tuple[str, list[int]]
CLASSES = 100


def conv(p: str, cin: int, cout: int, k: int, groups: int = 1, bias: bool = False) -> Iterator[Entry]:
    yield f"{p}.weight", [cout, cin // groups, k, k]
    if bias:
        yield f"{p}.bias", [cout]


def bn(p: str, c: int) -> Iterator[Entry]:
    # BatchNorm2d saves its affine parameters, running statistics and the batch counter (a 0-d tensor).
    for name in ("weight", "bias", "running_mean", "running_var"):
        yield f"{p}.{name}", [c]
    yield f"{p}.num_batches_tracked", []


def linear(p: str, cin: int, cout: int) -> Iterator[Entry]:
    yield f"{p}.weight", [cout, cin]
    yield f"{p}.bias", [cout]


def resnet(depth: int, filters: list[int]) -> Iterator[Entry]:
    """resnet.py ``ResNet(depth, num_filters, 'basicblock')``: downsample.0/.1 where the shape changes."""
    n = (depth - 2) // 6
    yield from conv("conv1", 3, filters[0], 3)
    yield from bn("bn1", filters[0])
    cin = filters[0]
    for stage in range(3):
        planes, stride = filters[stage + 1], (1 if stage == 0 else 2)
        for i in range(n):
            p = f"layer{stage + 1}.{i}"
            s = stride if i == 0 else 1
            yield from conv(f"{p}.conv1", cin, planes, 3)
            yield from bn(f"{p}.bn1", planes)
            yield from conv(f"{p}.conv2", planes, planes, 3)
            yield from bn(f"{p}.bn2", planes)
            if s != 1 or cin != planes:
                yield from conv(f"{p}.downsample.0", cin, planes, 1)
                yield from bn(f"{p}.downsample.1", planes)
            cin = planes
    yield from linear("fc", filters[3], CLASSES)


def resnet50() -> Iterator[Entry]:
    """resnetv2.py ``ResNet50``: bottlenecks 3/4/6/3, shortcut.0/.1 where the shape changes, ``linear``."""
    yield from conv("conv1", 3, 64, 3)
    yield from bn("bn1", 64)
    cin = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for i in range(n):
            p = f"layer{stage + 1}.{i}"
            s = 2 if (stage > 0 and i == 0) else 1
            yield from conv(f"{p}.conv1", cin, planes, 1)
            yield from bn(f"{p}.bn1", planes)
            yield from conv(f"{p}.conv2", planes, planes, 3)
            yield from bn(f"{p}.bn2", planes)
            yield from conv(f"{p}.conv3", planes, 4 * planes, 1)
            yield from bn(f"{p}.bn3", 4 * planes)
            if s != 1 or cin != 4 * planes:
                yield from conv(f"{p}.shortcut.0", cin, 4 * planes, 1)
                yield from bn(f"{p}.shortcut.1", 4 * planes)
            cin = 4 * planes
    yield from linear("linear", 2048, CLASSES)


def wrn(depth: int, k: int) -> Iterator[Entry]:
    """wrn.py ``WideResNet``: pre-activation blocks, ``convShortcut`` where in != out planes."""
    n = (depth - 4) // 6
    ch = [16, 16 * k, 32 * k, 64 * k]
    yield from conv("conv1", 3, 16, 3)
    for b in range(3):
        for i in range(n):
            cin, cout = (ch[b] if i == 0 else ch[b + 1]), ch[b + 1]
            p = f"block{b + 1}.layer.{i}"
            yield from bn(f"{p}.bn1", cin)
            yield from conv(f"{p}.conv1", cin, cout, 3)
            yield from bn(f"{p}.bn2", cout)
            yield from conv(f"{p}.conv2", cout, cout, 3)
            if cin != cout:
                yield from conv(f"{p}.convShortcut", cin, cout, 1)
    yield from bn("bn1", ch[3])
    yield from linear("fc", ch[3], CLASSES)


VGG_CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def vgg(name: str) -> Iterator[Entry]:
    """vgg.py ``vggN_bn``: blockB is [conv, bn, relu] * n without its last relu; convs have biases."""
    cin = 3
    for b, widths in enumerate(VGG_CFG[name]):
        for j, w in enumerate(widths):
            yield from conv(f"block{b}.{3 * j}", cin, w, 3, bias=True)
            yield from bn(f"block{b}.{3 * j + 1}", w)
            cin = w
    yield from linear("classifier", 512, CLASSES)


def mobile_half() -> Iterator[Entry]:
    """mobilenetv2.py ``mobile_half`` = MobileNetV2(T=6, width_mult=0.5): every block has conv.0-7."""
    t, wm = 6, 0.5
    setting = [[1, 16, 1, 1], [t, 24, 2, 1], [t, 32, 3, 2], [t, 64, 4, 2],
               [t, 96, 3, 1], [t, 160, 3, 2], [t, 320, 1, 1]]
    cin = int(32 * wm)
    yield from conv("conv1.0", 3, cin, 3)
    yield from bn("conv1.1", cin)
    for s, (e, c, n, _stride) in enumerate(setting):
        cout = int(c * wm)
        for i in range(n):
            p, hidden = f"blocks.{s}.{i}.conv", cin * e
            yield from conv(f"{p}.0", cin, hidden, 1)
            yield from bn(f"{p}.1", hidden)
            yield from conv(f"{p}.3", hidden, hidden, 3, groups=hidden)
            yield from bn(f"{p}.4", hidden)
            yield from conv(f"{p}.6", hidden, cout, 1)
            yield from bn(f"{p}.7", cout)
            cin = cout
    yield from conv("conv2.0", cin, 1280, 1)
    yield from bn("conv2.1", 1280)
    yield from linear("classifier.0", 1280, CLASSES)


def shufflev1() -> Iterator[Entry]:
    """ShuffleNetv1.py ``ShuffleV1``: groups 3; conv1 ungrouped when it reads the 24-channel stem."""
    groups = 3
    yield from conv("conv1", 3, 24, 1)
    yield from bn("bn1", 24)
    cin = 24
    for stage, (planes, n) in enumerate(zip((240, 480, 960), (4, 8, 4))):
        for i in range(n):
            p = f"layer{stage + 1}.{i}"
            cout = planes - cin if i == 0 else planes
            mid = cout // 4
            g = 1 if cin == 24 else groups
            yield from conv(f"{p}.conv1", cin, mid, 1, groups=g)
            yield from bn(f"{p}.bn1", mid)
            yield from conv(f"{p}.conv2", mid, mid, 3, groups=mid)
            yield from bn(f"{p}.bn2", mid)
            yield from conv(f"{p}.conv3", mid, cout, 1, groups=groups)
            yield from bn(f"{p}.bn3", cout)
            cin = planes
    yield from linear("linear", 960, CLASSES)


def shufflev2() -> Iterator[Entry]:
    """ShuffleNetv2.py ``ShuffleV2`` (net_size 1): each layer = DownBlock + 3/7/3 BasicBlocks, then conv2/bn2."""
    yield from conv("conv1", 3, 24, 1)
    yield from bn("bn1", 24)
    cin = 24
    for stage, (c, n) in enumerate(zip((116, 232, 464), (3, 7, 3))):
        p, mid = f"layer{stage + 1}.0", c // 2
        yield from conv(f"{p}.conv1", cin, cin, 3, groups=cin)
        yield from bn(f"{p}.bn1", cin)
        yield from conv(f"{p}.conv2", cin, mid, 1)
        yield from bn(f"{p}.bn2", mid)
        yield from conv(f"{p}.conv3", cin, mid, 1)
        yield from bn(f"{p}.bn3", mid)
        yield from conv(f"{p}.conv4", mid, mid, 3, groups=mid)
        yield from bn(f"{p}.bn4", mid)
        yield from conv(f"{p}.conv5", mid, mid, 1)
        yield from bn(f"{p}.bn5", mid)
        for i in range(1, n + 1):
            p, h = f"layer{stage + 1}.{i}", c // 2
            yield from conv(f"{p}.conv1", h, h, 1)
            yield from bn(f"{p}.bn1", h)
            yield from conv(f"{p}.conv2", h, h, 3, groups=h)
            yield from bn(f"{p}.bn2", h)
            yield from conv(f"{p}.conv3", h, h, 1)
            yield from bn(f"{p}.bn3", h)
        cin = c
    yield from conv("conv2", 464, 1024, 1)
    yield from bn("bn2", 1024)
    yield from linear("linear", 1024, CLASSES)


# Their model names (mdistiller's cifar_model_dict / RepDistiller's model_dict keys).
ARCHS = {
    **{f"resnet{d}": (lambda d=d: resnet(d, [16, 16, 32, 64])) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda: resnet(8, [32, 64, 128, 256]),
    "resnet32x4": lambda: resnet(32, [32, 64, 128, 256]),
    "ResNet50": resnet50,
    **{f"wrn_{d}_{k}": (lambda d=d, k=k: wrn(d, k)) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{name: (lambda name=name: vgg(name)) for name in VGG_CFG},
    "mobile_half": mobile_half,
    "ShuffleV1": shufflev1,
    "ShuffleV2": shufflev2,
}


def main() -> None:
    out = Path(__file__).parent
    for arch, fn in ARCHS.items():
        entries = [[k, s] for k, s in fn()]
        assert len({k for k, _ in entries}) == len(entries), arch
        text = "[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n"
        (out / f"{arch}.json").write_text(text)


if __name__ == "__main__":
    main()
