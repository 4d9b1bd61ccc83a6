"""Model zoo: registration, tap shapes, parameter counts, block semantics, weights loading."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from indistill.errors import UserError
from indistill.models import Taps, create_model, list_models, model_aliases, model_name, model_taps, resolve_module, tap_shapes

TORCHVISION = {"resnet18", "resnet34", "resnet50", "mobilenet_v2"}


def _table(*stages: tuple[int, int, int], classes: int = 10) -> dict[str, tuple[int, ...]]:
    """Tap table from stage shapes; the embedding is the last stage's channel count (global pooling)."""
    table: dict[str, tuple[int, ...]] = {f"stage{i}": s for i, s in enumerate(stages, 1)}
    return {**table, "embedding": (stages[-1][0],), "logits": (classes,)}


def _cifar3(c1: int, c2: int, c3: int) -> dict[str, tuple[int, ...]]:
    return _table((c1, 32, 32), (c2, 16, 16), (c3, 8, 8))


WRNS = [(16, 1), (16, 2), (16, 4), (28, 2), (28, 4), (40, 1), (40, 2), (40, 4)]

# Written by hand from each architecture. CIFAR models at 32x32, torchvision models at 64x64:
# their stem (stride 2 conv + stride 2 pool) leaves 16x16 for stage 1, then /2 per stage.
EXPECTED: dict[str, dict[str, tuple[int, ...]]] = {
    # 32 -conv-> 30 -pool-> 15 -conv-> 13 -pool-> 6 -conv-> 4 -pool-> 2; the embedding is fc1's width.
    "cnn32": {**_table((16, 15, 15), (32, 6, 6), (64, 2, 2)), "embedding": (128,)},
    "cnn32_small": {**_table((8, 15, 15), (16, 6, 6), (32, 2, 2)), "embedding": (64,)},
    **{f"resnet{d}": _cifar3(16, 32, 64) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _cifar3(64, 128, 256),
    "resnet32x4": _cifar3(64, 128, 256),
    **{f"wrn_{d}_{k}": _cifar3(16 * k, 32 * k, 64 * k) for d, k in WRNS},
    # VGG: pools after blocks 0-2 (16, 8, 4); no pool after block3 at 32x32, so block4 is 4x4.
    **{
        v: _table((64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 4, 4))
        for v in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")
    },
    # 64-channel stem at stride 1, four stages; bottlenecks expand by 4.
    "resnet18_cifar": _table((64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)),
    "resnet50_cifar": _table((256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)),
    # mobile_half: stride-2 stem; taps after blocks 1, 2, 4, 6 (24/32/96/160 channels halved); 1280-d conv2.
    "mobilenetv2_cifar": {**_table((12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)), "embedding": (1280,)},
    # ShuffleNets: stride-1 stem, every stage halves the map.
    "shufflenet_v1": _table((240, 16, 16), (480, 8, 8), (960, 4, 4)),
    "shufflenet_v2": {**_table((116, 16, 16), (232, 8, 8), (464, 4, 4)), "embedding": (1024,)},
    "preact_resnet18": _table((64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)),
    "resnet18": _table((64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)),
    "resnet34": _table((64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)),
    "resnet50": _table((256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)),
    # MobileNetV2 ends of the stride-4/8/16/32 stages: features.3 (24), .6 (32), .13 (96), .18 (1280).
    "mobilenet_v2": _table((24, 16, 16), (32, 8, 8), (96, 4, 4), (1280, 2, 2)),
}

GRAYSCALE = {
    "cnn32", "resnet20", "wrn_16_1", "vgg8", "preact_resnet18", "resnet18", "mobilenet_v2",
    "mobilenetv2_cifar", "shufflenet_v2",
}


def test_every_registered_model_has_an_expected_shape_table():
    assert sorted(EXPECTED) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_tap_shapes(name: str):
    in_ch = 1 if name in GRAYSCALE else 3
    side = 64 if name in TORCHVISION else 32
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=in_ch)
    taps = model_taps(model)
    stages = [k for k in taps if k.startswith("stage")]
    assert stages == [f"stage{i}" for i in range(1, len(stages) + 1)]
    assert list(taps) == stages + ["embedding", "logits"]
    shapes = tap_shapes(model, taps, (in_ch, side, side))
    assert shapes == EXPECTED[name]
    sides = [shapes[s][-1] for s in stages]
    assert sides == sorted(sides, reverse=True), "stages must go shallow to deep"
    classifier = resolve_module(model, taps["embedding"].removesuffix(":in"))
    assert isinstance(classifier, nn.Linear) and shapes["embedding"] == (classifier.in_features,)
    assert classifier.out_features == 10


# ---- parameter counts -------------------------------------------------------------------------
# Independent arithmetic for the architectures (weights + biases + BN affine), no model code.


def _conv(cin: int, cout: int, k: int, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def _bn(c: int) -> int:
    return 2 * c


def _count_cifar_resnet(depth: int, stem: int, widths: tuple[int, int, int], classes: int) -> int:
    n = (depth - 2) // 6
    total = _conv(3, stem, 3) + _bn(stem)
    cin = stem
    for stage, w in enumerate(widths):
        for i in range(n):
            total += _conv(cin, w, 3) + _bn(w) + _conv(w, w, 3) + _bn(w)
            if i == 0 and (cin != w or stage > 0):  # shape changes: 1x1 conv + BN shortcut
                total += _conv(cin, w, 1) + _bn(w)
            cin = w
    return total + cin * classes + classes


def _count_wrn(depth: int, k: int, classes: int) -> int:
    n = (depth - 4) // 6
    total = _conv(3, 16, 3)
    cin = 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += _bn(cin) + _conv(cin, w, 3) + _bn(w) + _conv(w, w, 3)
            if cin != w:  # 1x1 conv shortcut, no BN
                total += _conv(cin, w, 1)
            cin = w
    return total + _bn(cin) + cin * classes + classes


def _count_vgg(blocks: list[list[int]], classes: int) -> int:
    total, cin = 0, 3
    for block in blocks:
        for w in block:
            total += _conv(cin, w, 3, bias=True) + _bn(w)
            cin = w
    return total + cin * classes + classes


def _count_cnn(widths: tuple[int, int, int], fc: tuple[int, ...], classes: int, in_ch: int = 3, side: int = 2) -> int:
    total, cin = 0, in_ch
    for w in widths:
        total += _conv(cin, w, 3, bias=True) + _bn(w)
        cin = w
    cin *= side * side
    for width in (*fc, classes):  # hidden layers, then the classifier
        total += cin * width + width
        cin = width
    return total


def _params(name: str, classes: int, **kw) -> int:
    return sum(p.numel() for p in create_model(name, num_classes=classes, **kw).parameters())


@pytest.mark.parametrize(
    "name,expected",
    [
        ("resnet20", _count_cifar_resnet(20, 16, (16, 32, 64), 100)),
        ("resnet56", _count_cifar_resnet(56, 16, (16, 32, 64), 100)),
        ("resnet8x4", _count_cifar_resnet(8, 32, (64, 128, 256), 100)),
        ("resnet32x4", _count_cifar_resnet(32, 32, (64, 128, 256), 100)),
        ("wrn_16_2", _count_wrn(16, 2, 100)),
        ("wrn_40_2", _count_wrn(40, 2, 100)),
        ("vgg8", _count_vgg([[64], [128], [256], [512], [512]], 100)),
        ("vgg13", _count_vgg([[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]], 100)),
        ("cnn32", _count_cnn((16, 32, 64), (128,), 100)),
        ("cnn32_small", _count_cnn((8, 16, 32), (64,), 100)),
    ],
)
def test_exact_parameter_counts(name: str, expected: int):
    assert _params(name, 100) == expected


def test_hand_count_of_resnet20():
    # Worked by hand: stem 464, layer1 3*4672, layer2 14528 + 2*18560, layer3 57728 + 2*73984, fc 6500.
    assert _count_cifar_resnet(20, 16, (16, 32, 64), 100) == 278_324 == _params("resnet20", 100)


# Published CIFAR-100 sizes (CRD / DKD tables, in millions to two decimals, some truncated) and torchvision's
# documented 11,689,512 parameters for ImageNet ResNet-18.
@pytest.mark.parametrize(
    "name,classes,millions",
    [
        ("resnet56", 100, 0.86),
        ("resnet20", 100, 0.28),  # 0.27M in He et al. uses parameter-free shortcuts; KD code uses 1x1 convs
        ("resnet8x4", 100, 1.23),
        ("resnet32x4", 100, 7.43),
        ("wrn_16_2", 100, 0.70),
        ("wrn_40_1", 100, 0.57),
        ("wrn_40_2", 100, 2.25),
        ("vgg8", 100, 3.96),
        ("vgg13", 100, 9.46),
    ],
)
def test_literature_parameter_counts(name: str, classes: int, millions: float):
    assert abs(_params(name, classes) / 1e6 - millions) < 0.01


def test_torchvision_resnet18_matches_documented_size():
    assert _params("resnet18", 1000) == 11_689_512


def test_half_width_resnet20():
    model = create_model("resnet20", num_classes=10, widths=(8, 16, 32))
    shapes = tap_shapes(model, model_taps(model), (3, 32, 32))
    assert shapes["stage1"] == (8, 32, 32) and shapes["stage3"] == (32, 8, 8) and shapes["embedding"] == (32,)
    assert _params("resnet20", 10, widths=(8, 16, 32)) == _count_cifar_resnet(20, 8, (8, 16, 32), 10)


# The authors' Cnn32 / Cnn32_Small (docs/spec.md): one hidden layer. Their counts for 10 classes.
@pytest.mark.parametrize(
    "name,in_ch,expected",
    [("cnn32", 3, 57_994), ("cnn32", 1, 57_706), ("cnn32_small", 3, 15_050), ("cnn32_small", 1, 14_906)],
)
def test_cnn_parameter_counts_match_the_authors(name: str, in_ch: int, expected: int):
    widths, fc = ((16, 32, 64), (128,)) if name == "cnn32" else ((8, 16, 32), (64,))
    assert _count_cnn(widths, fc, 10, in_ch) == expected
    assert _params(name, 10, in_channels=in_ch) == expected
    model = create_model(name, num_classes=10, in_channels=in_ch)
    assert [n for n, m in model.named_children() if isinstance(m, nn.Linear)] == ["fc1", "fc2"]


def test_cnn_two_hidden_layer_head_is_an_option():
    # The former default head (fc 256-128 / 128-64) stays available; its classifier is fc3.
    model = create_model("cnn32", num_classes=10, in_channels=1, fc=(256, 128))
    assert _params("cnn32", 10, in_channels=1, fc=(256, 128)) == _count_cnn((16, 32, 64), (256, 128), 10, 1) == 123_498
    assert _params("cnn32_small", 10, in_channels=1, fc=(128, 64)) == 31_418
    taps = model_taps(model)
    assert taps["embedding"] == "fc3:in"
    assert tap_shapes(model, taps, (1, 32, 32))["embedding"] == (128,)
    with pytest.raises(UserError, match="fc must be 1 or 2"):
        create_model("cnn32", num_classes=10, fc=(64, 32, 16))


@torch.no_grad()
def test_cnn_embedding_is_fc1_after_relu():
    model = create_model("cnn32_small", num_classes=10).eval()
    _randomize_bn(model)
    x = torch.randn(3, 3, 32, 32)
    with Taps(model, model_taps(model)) as taps:
        logits, feats = taps(x)
    flat = model.block3(model.block2(model.block1(x))).flatten(1)
    torch.testing.assert_close(feats["embedding"], F.relu(F.linear(flat, model.fc1.weight, model.fc1.bias)))
    torch.testing.assert_close(logits, F.linear(feats["embedding"], model.fc2.weight, model.fc2.bias))


def test_cnn_on_28x28_inputs():
    # Fashion-MNIST unpadded: 28 -> 26 -> 13 -> 11 -> 5 -> 3 -> 1, so fc1 reads 32 * 1 * 1 features.
    model = create_model("cnn32_small", num_classes=10, in_channels=1, input_size=28)
    shapes = tap_shapes(model, model_taps(model), (1, 28, 28))
    assert shapes["stage3"] == (32, 1, 1) and model.fc1.in_features == 32 and shapes["embedding"] == (64,)
    assert _params("cnn32_small", 10, in_channels=1, input_size=28) == _count_cnn((8, 16, 32), (64,), 10, 1, side=1)


@pytest.mark.parametrize("name", ["cnn32", "cnn32_small"])
def test_cnn_loads_the_authors_state_dict_layout(name: str):
    # The authors' files save net.state_dict() with keys conv{i}, conv{i}_bn, fc1, fc2 (models/cnn32*.py).
    src = create_model(name, num_classes=10)
    _randomize_bn(src)
    theirs = {}
    for key, value in src.state_dict().items():
        for i in (1, 2, 3):
            key = key.replace(f"block{i}.conv.", f"conv{i}.").replace(f"block{i}.bn.", f"conv{i}_bn.")
        theirs[key] = value.clone()
    expected = {"conv1", "conv1_bn", "conv2", "conv2_bn", "conv3", "conv3_bn", "fc1", "fc2"}
    assert {k.split(".")[0] for k in theirs} == expected
    dst = create_model(name, num_classes=10)
    dst.load_state_dict(theirs, strict=True)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


# ---- block semantics, against functional re-implementations ----------------------------------


def _bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@torch.no_grad()
def test_resnet_block_is_post_activation_with_projection_shortcut():
    model = create_model("resnet8", num_classes=10).eval()
    _randomize_bn(model)
    block = model.layer2[0]  # 16 -> 32 channels, stride 2: has a downsample
    x = torch.randn(2, 16, 8, 8)
    h = F.relu(_bn_eval(F.conv2d(x, block.conv1.weight, stride=2, padding=1), block.bn1))
    h = _bn_eval(F.conv2d(h, block.conv2.weight, padding=1), block.bn2)
    sc = _bn_eval(F.conv2d(x, block.downsample[0].weight, stride=2), block.downsample[1])
    torch.testing.assert_close(block(x), F.relu(h + sc))
    ident = model.layer1[0]
    assert ident.downsample is None
    x = torch.randn(2, 16, 8, 8)
    h = F.relu(_bn_eval(F.conv2d(x, ident.conv1.weight, padding=1), ident.bn1))
    torch.testing.assert_close(ident(x), F.relu(_bn_eval(F.conv2d(h, ident.conv2.weight, padding=1), ident.bn2) + x))


@torch.no_grad()
def test_wrn_block_is_pre_activation_and_shortcut_reads_activated_input():
    model = create_model("wrn_16_2", num_classes=10).eval()
    _randomize_bn(model)
    block = model.block2.layer[0]  # 32 -> 64, stride 2
    x = torch.randn(2, 32, 8, 8)
    pre = F.relu(_bn_eval(x, block.bn1))
    h = F.relu(_bn_eval(F.conv2d(pre, block.conv1.weight, stride=2, padding=1), block.bn2))
    expected = F.conv2d(h, block.conv2.weight, padding=1) + F.conv2d(pre, block.convShortcut.weight, stride=2)
    torch.testing.assert_close(block(x), expected)
    ident = model.block2.layer[1]
    x = torch.randn(2, 64, 4, 4)
    pre = F.relu(_bn_eval(x, ident.bn1))
    h = F.relu(_bn_eval(F.conv2d(pre, ident.conv1.weight, padding=1), ident.bn2))
    torch.testing.assert_close(ident(x), F.conv2d(h, ident.conv2.weight, padding=1) + x)


@torch.no_grad()
def test_preact_stage4_is_the_classifier_input_map():
    model = create_model("preact_resnet18", num_classes=10).eval()
    _randomize_bn(model)
    with Taps(model, model_taps(model)) as taps:
        logits, feats = taps(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(feats["embedding"], feats["stage4"].mean(dim=(2, 3)))
    torch.testing.assert_close(logits, feats["embedding"] @ model.fc.weight.T + model.fc.bias)
    assert (feats["stage4"] >= 0).all()


@torch.no_grad()
def test_cnn_block_order_conv_bn_relu_pool():
    model = create_model("cnn32", num_classes=10).eval()
    _randomize_bn(model)
    assert [n for n, _ in model.block1.named_children()] == ["conv", "bn", "relu", "pool"]
    x = torch.randn(2, 3, 32, 32)
    b = model.block1
    expected = F.max_pool2d(F.relu(_bn_eval(F.conv2d(x, b.conv.weight, b.conv.bias), b.bn)), 2)
    torch.testing.assert_close(b(x), expected)


@pytest.mark.parametrize(
    "alias,name",
    [("mobile_half", "mobilenetv2_cifar"), ("MobileNetV2", "mobilenetv2_cifar"), ("ShuffleV1", "shufflenet_v1"),
     ("ShuffleV2", "shufflenet_v2"), ("ResNet50", "resnet50_cifar"), ("ResNet18", "resnet18_cifar"),
     ("vgg13_bn", "vgg13")],
)
def test_aliases_build_the_same_model(alias: str, name: str):
    assert model_aliases()[alias] == name and alias not in list_models()
    a, b = create_model(alias, num_classes=7), create_model(name, num_classes=7)
    assert type(a) is type(b) and model_taps(a) == model_taps(b) and model_name(a) == name
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_channel_shuffle_interleaves_groups():
    from indistill.models.zoo.shufflenet import channel_shuffle

    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]


@torch.no_grad()
def test_shufflenet_v1_downsampling_block_concatenates_pooled_input():
    model = create_model("shufflenet_v1", num_classes=10).eval()
    _randomize_bn(model)
    block = model.layer2[0]  # 240 -> 480 channels: a 240-channel branch next to the pooled input
    x = torch.randn(2, 240, 8, 8)
    h = F.relu(_bn_eval(F.conv2d(x, block.conv1.weight, groups=3), block.bn1))
    n, c, hh, ww = h.shape
    h = h.view(n, 3, c // 3, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
    h = F.relu(_bn_eval(F.conv2d(h, block.conv2.weight, stride=2, padding=1, groups=c), block.bn2))
    h = _bn_eval(F.conv2d(h, block.conv3.weight, groups=3), block.bn3)
    pooled = F.avg_pool2d(x, 3, stride=2, padding=1)
    torch.testing.assert_close(block(x), F.relu(torch.cat([h, pooled], 1)))
    ident = model.layer2[1]
    y = block(x)
    assert ident(y).shape == y.shape


@torch.no_grad()
def test_shufflenet_v2_basic_block_passes_half_the_channels_through():
    model = create_model("shufflenet_v2", num_classes=10).eval()
    _randomize_bn(model)
    block = model.layer1[1]  # 116 channels: 58 kept, 58 transformed, then interleaved
    x = torch.randn(2, 116, 16, 16)
    out = block(x)
    torch.testing.assert_close(out[:, 0::2], x[:, :58])
    b = x[:, 58:]
    h = F.relu(_bn_eval(F.conv2d(b, block.conv1.weight), block.bn1))
    h = _bn_eval(F.conv2d(h, block.conv2.weight, padding=1, groups=58), block.bn2)
    h = F.relu(_bn_eval(F.conv2d(h, block.conv3.weight), block.bn3))
    torch.testing.assert_close(out[:, 1::2], h)


@torch.no_grad()
def test_mobilenetv2_cifar_inverted_residual():
    model = create_model("mobilenetv2_cifar", num_classes=10).eval()
    _randomize_bn(model)
    block = model.blocks[1][1]  # 12 -> 12 channels, stride 1: identity sum
    seq = block.conv
    x = torch.randn(2, 12, 16, 16)
    h = F.relu(_bn_eval(F.conv2d(x, seq[0].weight), seq[1]))
    h = F.relu(_bn_eval(F.conv2d(h, seq[3].weight, padding=1, groups=72), seq[4]))
    h = _bn_eval(F.conv2d(h, seq[6].weight), seq[7])
    torch.testing.assert_close(block(x), x + h)
    assert not model.blocks[2][0].use_residual  # stride 2: no sum
    assert model.blocks[0][0].conv[0].weight.shape == (16, 16, 1, 1)  # t = 1 keeps its 1x1 expansion conv


@torch.no_grad()
def test_resnet50_cifar_bottleneck_with_projection():
    model = create_model("resnet50_cifar", num_classes=10).eval()
    _randomize_bn(model)
    block = model.layer2[0]  # 256 -> 512 channels, stride 2 on the 3x3
    x = torch.randn(1, 256, 8, 8)
    h = F.relu(_bn_eval(F.conv2d(x, block.conv1.weight), block.bn1))
    h = F.relu(_bn_eval(F.conv2d(h, block.conv2.weight, stride=2, padding=1), block.bn2))
    h = _bn_eval(F.conv2d(h, block.conv3.weight), block.bn3)
    sc = _bn_eval(F.conv2d(x, block.shortcut[0].weight, stride=2), block.shortcut[1])
    torch.testing.assert_close(block(x), F.relu(h + sc))
    assert len(model.layer2[1].shortcut) == 0  # identity shortcut holds no weights


# ---- options and errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("resnet20", {"widths": (8, 16)}, "widths"),
        ("cnn32", {"input_size": 16}, "input_size"),
        ("cnn32", {"num_classes": 0}, "num_classes"),
        ("vgg8", {"in_channels": 0}, "in_channels"),
        ("resnet18", {"weights": "IMAGENET1K_V1"}, "weights_path"),
        ("resnet18", {"weights_path": "/nonexistent/w.pt"}, "does not exist"),
        ("wrn_16_2", {"nonsense": 1}, "bad options"),
        ("cnn32", {"fc": (64, 32, 16)}, "fc must be 1 or 2"),
        ("shufflenet_v1", {"out_planes": (100, 200, 400)}, "groups"),
        ("shufflenet_v2", {"out_channels": (115, 232, 464, 1024)}, "even"),
        ("mobilenetv2_cifar", {"width_mult": 0}, "width_mult"),
        ("resnet18", {"reset_head": True}, "needs a weights_path"),
    ],
)
def test_bad_options_raise_user_error(name: str, kw: dict, match: str):
    kw = {"num_classes": 10, **kw}
    with pytest.raises(UserError, match=match):
        create_model(name, **kw)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_torchvision_weights_path_roundtrip(tmp_path, suffix: str):
    src = create_model("mobilenet_v2", num_classes=7, in_channels=1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": src.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = create_model("mobilenet_v2", num_classes=7, in_channels=1, weights_path=str(path))
    for (k, a), (_, b) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(UserError, match="num_classes"):
        create_model("mobilenet_v2", num_classes=10, in_channels=1, weights_path=str(path))


def test_torchvision_weights_file_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": nn.Linear(2, 2)}, path)  # a pickled module, not a state dict
    with pytest.raises(UserError, match="cannot read weights"):
        create_model("resnet18", num_classes=2, weights_path=str(path))


def test_unknown_model_suggests():
    with pytest.raises(UserError, match=r"did you mean: .*resnet20"):
        create_model("resnet21", num_classes=10)


def test_wrong_tap_path_suggests_near_matches():
    model = create_model("resnet20", num_classes=10)
    with pytest.raises(UserError, match=r"no module 'layr2'.*did you mean: layer2"):
        Taps(model, {"stage2": "layr2"})
    with pytest.raises(UserError, match="did you mean"):
        tap_shapes(model, {"embedding": "fcc:in"}, (3, 32, 32))


def test_user_model_tapped_by_path():
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                OrderedDict(c1=nn.Conv2d(1, 4, 3, padding=1), act=nn.ReLU(), pool=nn.AvgPool2d(2))
            )
            self.head = nn.Linear(4 * 4 * 4, 3)

        def forward(self, x):
            return self.head(self.body(x).flatten(1))

    model = Mine()
    with pytest.raises(UserError, match="declares no taps"):
        model_taps(model)
    specs = {"stage1": "body.act", "stage2": "body", "embedding": "head:in", "logits": "@output"}
    expected = {"stage1": (4, 8, 8), "stage2": (4, 4, 4), "embedding": (64,), "logits": (3,)}
    assert tap_shapes(model, specs, (1, 8, 8)) == expected
    x = torch.randn(2, 1, 8, 8)
    with Taps(model, specs) as taps:
        out, feats = taps(x)
    torch.testing.assert_close(feats["stage1"], F.relu(model.body.c1(x)))
    torch.testing.assert_close(feats["embedding"], F.avg_pool2d(F.relu(model.body.c1(x)), 2).flatten(1))
    assert feats["logits"] is out


def test_taps_carry_gradients_for_training():
    model = create_model("cnn32_small", num_classes=10)
    with Taps(model, model_taps(model)) as taps:
        _, feats = taps(torch.randn(4, 3, 32, 32))
    feats["stage2"].pow(2).mean().backward()
    assert model.block1.conv.weight.grad is not None and model.block1.conv.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None


def test_zoo_maxpool_fast_path_is_exact_with_and_without_grad():
    from indistill.models.zoo._common import MaxPool2d

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (5, 6, 13, 13), generator=g).float()  # many ties inside windows
    pool, ref = MaxPool2d(2), torch.nn.MaxPool2d(2)
    with torch.no_grad():
        out = pool(x)
    assert out.is_contiguous() and torch.equal(out, ref(x))
    xg = x.clone().requires_grad_()
    pool(xg).sum().backward()
    xr = x.clone().requires_grad_()
    ref(xr).sum().backward()
    assert torch.equal(xg.grad, xr.grad)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(pool(cl), ref(x))
    m = create_model("cnn32_small", num_classes=10, in_channels=1).eval()
    assert isinstance(m.block1.pool, torch.nn.MaxPool2d)
