"""Any model, zero wiring: timm/torchvision models by name, taps found by a dry forward, automatic stage pairs.

The done-when test at the end builds a timm ResNet-18 teacher and a timm MobileNetV3 student with no taps in
the config, prints their automatic pairing (checked against a table worked out by hand), and runs the
InDistill warmup and a KD method on a small ImageFolder dataset it writes.
"""

import json
import socket
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from indistill.cli import main
from indistill.config import ModelSpec, load_config
from indistill.deploy import count_flops, deployment_ratios, deployment_stats, deployment_table
from indistill.errors import UserError
from indistill.models import create_model, model_taps, tap_shapes
from indistill.models.auto import discover_taps
from indistill.pairing import TapPairs, TapSide, _auto_pairs, _spread, pair_taps
from indistill.pipeline import build_model

pytest.importorskip("timm", reason="timm is the optional extra indistill[timm] (CI installs it)")

SHAPE = (3, 32, 32)


def _data(in_channels=3, size=32, classes=3):
    return SimpleNamespace(num_classes=classes, in_channels=in_channels, image_size=size, name="fake")


def _table(model, shape=SHAPE):
    """{tap: (spec, shape)} of a built model: what the hand-checked tables below are compared with."""
    taps = model_taps(model)
    shapes = tap_shapes(model, taps, shape)
    return {k: (v, shapes[k]) for k, v in taps.items() if k != "logits"}


# --------------------------------------------------------------------------- 1. timm: / torchvision: by name


def test_timm_and_torchvision_models_by_name_with_classes_and_channels():
    t = build_model(ModelSpec(name="timm:mobilenetv3_small_050"), _data(in_channels=1, classes=7))
    assert t.conv_stem.in_channels == 1 and t(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
    v = build_model(ModelSpec(name="torchvision:mobilenet_v3_small"), _data(in_channels=1, classes=5))
    assert v.features[0][0].in_channels == 1 and v(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    assert model_taps(v)["logits"] == "@output"


@pytest.mark.parametrize("name, match", [
    ("timm:mobilenetv3_smal_050", "timm has no model 'mobilenetv3_smal_050' \\(did you mean: mobilenetv3_small_050"),
    ("torchvision:mobilenet_v3_smal", "torchvision has no classification model .*did you mean: mobilenet_v3_small"),
    ("timm:", "names no architecture"),
])
def test_unknown_external_models_are_one_line_errors(name, match):
    with pytest.raises(UserError, match=match):
        build_model(ModelSpec(name=name), _data())


def test_weights_are_never_downloaded():
    with pytest.raises(UserError, match="never downloads weights.*checkpoint: PATH"):
        build_model(ModelSpec(name="timm:mobilenetv3_small_050", kwargs={"pretrained": True}), _data())
    with pytest.raises(UserError, match="never downloads weights"):
        build_model(ModelSpec(name="torchvision:mobilenet_v3_small", kwargs={"weights": "DEFAULT"}), _data())


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(UserError, match=r"needs timm.*pip install 'indistill\[timm\]'"):
        build_model(ModelSpec(name="timm:resnet18"), _data())


def test_weights_from_a_local_checkpoint_without_network(tmp_path, monkeypatch):
    """`checkpoint:` loads a local state dict (torchvision's own files are plain state dicts); no socket opens."""
    from indistill.checkpoint import load_weights

    src = build_model(ModelSpec(name="torchvision:mobilenet_v3_small"), _data(classes=4))
    torch.save(src.state_dict(), tmp_path / "w.pth")

    def no_network(*_a, **_k):
        raise AssertionError("a socket was opened: weights must never be downloaded")

    monkeypatch.setattr(socket, "socket", no_network)
    dst = load_weights(build_model(ModelSpec(name="torchvision:mobilenet_v3_small"), _data(classes=4)), tmp_path / "w.pth")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    # another class count: everything but the (auto-found) classifier, which keeps its fresh init
    other = load_weights(build_model(ModelSpec(name="torchvision:mobilenet_v3_small"), _data(classes=9)),
                         tmp_path / "w.pth", reset_head=True)
    assert torch.equal(other.features[0][0].weight, src.features[0][0].weight)


# --------------------------------------------------------------------------- 2. taps found, not typed


def test_found_taps_of_a_torchvision_mobilenet_match_a_hand_checked_table():
    # MobileNetV3-Small on 32x32: stem conv /2, then blocks ending at /4 (features.1), /8 (features.3),
    # /16 (features.8) and the 1x1 conv to 576 at /32 (features.12); the SE gates' 1x1 maps are not stages.
    m = build_model(ModelSpec(name="torchvision:mobilenet_v3_small"), _data())
    assert _table(m) == {
        "stage1": ("features.0", (16, 16, 16)), "stage2": ("features.1", (16, 8, 8)),
        "stage3": ("features.3", (24, 4, 4)), "stage4": ("features.8", (48, 2, 2)),
        "stage5": ("features.12", (576, 1, 1)), "embedding": ("classifier.3:in", (1024,)),
    }


def test_found_taps_depend_on_the_input_size():
    m = create_model("torchvision:resnet18", 3, input_shape=(3, 64, 64))
    assert _table(m, (3, 64, 64)) == {
        "stage1": ("relu", (64, 32, 32)), "stage2": ("layer1", (64, 16, 16)), "stage3": ("layer2", (128, 8, 8)),
        "stage4": ("layer3", (256, 4, 4)), "stage5": ("layer4", (512, 2, 2)), "embedding": ("fc:in", (512,)),
    }


def test_a_plain_module_gets_taps_without_any_in_the_config():
    from .user_models import make_net

    m = build_model(ModelSpec(name="tests.user_models:make_net", kwargs={"width": 4}), _data(in_channels=1))
    # the last map before each pooling: 0.2 (ReLU at 32x32), then the pooled block outputs 0 (16x16), 1 (8x8)
    assert _table(m, (1, 32, 32)) == {"stage1": ("0.2", (4, 32, 32)), "stage2": ("0", (4, 16, 16)),
                                      "stage3": ("1", (8, 8, 8)), "embedding": ("4:in", (8,))}
    assert discover_taps(make_net(3, 1, 4), (1, 32, 32)) == model_taps(m)


def test_explicit_taps_win():
    # a zoo model: the config's taps update the registered ones by name
    z = build_model(ModelSpec(name="resnet20", taps={"stage1": "layer1.0"}), _data())
    assert model_taps(z)["stage1"] == "layer1.0" and model_taps(z)["stage3"] == "layer3"
    # a found-taps model: explicit stage taps replace the found stages as a set; embedding/logits still found
    u = build_model(ModelSpec(name="tests.user_models:make_net", taps={"stage1": "1"}), _data(in_channels=1))
    assert model_taps(u) == {"stage1": "1", "embedding": "4:in", "logits": "@output"}
    # taps: auto on a zoo model finds them instead of reading the registry (cnn32: + the 30x30 map before block1's pool)
    a = build_model(ModelSpec(name="cnn32", taps="auto"), _data())
    assert list(model_taps(a).values()) == ["block1.relu", "block1", "block2", "block3", "fc2:in", "@output"]
    assert load_config(None, ["student.taps=auto"]).student.taps == "auto"
    with pytest.raises(UserError, match="student.taps: 'manual' is neither auto nor a mapping"):
        load_config(None, ["student.taps=manual"])


# --------------------------------------------------------------------------- 3. automatic pairs


def _sides(prefix, shapes):
    return [TapSide(f"{prefix}{i}", f"m{i}", s) for i, s in enumerate(shapes, 1)]


def test_pairs_by_equal_size_evenly_spaced_or_by_depth_with_resize():
    assert _spread(4, 2) == [1, 3] and _spread(3, 3) == [0, 1, 2] and _spread(5, 0) == []
    t = _sides("t", [(16, 32, 32), (16, 32, 32), (16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)])
    s = _sides("s", [(8, 32, 32), (8, 32, 32), (16, 16, 16), (16, 4, 4)])
    got = [(a.name, b.name) for a, b in _auto_pairs(t, s, None)]
    # 32x32: 4 teacher taps for 2 student taps -> teacher 2 and 4; 16x16 pairs; nothing at 8x8 / 4x4
    assert got == [("t2", "s1"), ("t4", "s2"), ("t5", "s3")]
    got = [(a.name, b.name) for a, b in _auto_pairs(t, s, "avgpool")]
    assert got == [("t2", "s1"), ("t3", "s2"), ("t5", "s3"), ("t6", "s4")]  # by depth, 6 spread over 4


def test_pairing_errors_are_one_line():
    t = create_model("resnet20", 3)  # maps of 32, 16 and 8 pixels
    s = create_model("cnn32_small", 3)  # maps of 15, 6 and 2 pixels: no size in common
    with pytest.raises(UserError, match="no teacher and student stage taps of equal H x W.*warmup.resize: avgpool"):
        pair_taps(t, s, SHAPE)
    narrow = pair_taps(create_model("cnn32_small", 3), create_model("cnn32", 3), SHAPE)
    with pytest.raises(UserError, match=r"teacher tap stage1 \(8, 15, 15\).*narrower.*a wider teacher"):
        narrow.check_prunable()


def test_tap_pairs_is_a_mapping_and_its_yaml_pins_the_same_pairs():
    t = build_model(ModelSpec(name="tests.user_models:make_net", kwargs={"width": 8}), _data(in_channels=1))
    s = build_model(ModelSpec(name="tests.user_models:make_net", kwargs={"width": 4}), _data(in_channels=1))
    pairs = pair_taps(t, s, (1, 32, 32))
    assert isinstance(pairs, TapPairs) and dict(pairs) == {"stage1": "stage1", "stage2": "stage2", "stage3": "stage3"}
    assert [r["pruned"] for r in pairs.table()] == [4, 4, 8]
    pinned = yaml.safe_load(pairs.yaml())
    assert pinned["teacher"]["taps"] == {"stage1": "0.2", "stage2": "0", "stage3": "1"}
    t2 = build_model(ModelSpec(name="tests.user_models:make_net", kwargs={"width": 8}, taps=pinned["teacher"]["taps"]),
                     _data(in_channels=1))
    s2 = build_model(ModelSpec(name="tests.user_models:make_net", kwargs={"width": 4}, taps=pinned["student"]["taps"]),
                     _data(in_channels=1))
    again = pair_taps(t2, s2, (1, 32, 32), pairs=pinned["warmup"]["pairs"])
    assert again.table() == pairs.table() and again.how == "warmup.pairs"


# --------------------------------------------------------------------------- 6. the deployment view


def test_flops_are_pytorchs_count_and_students_not_smaller_or_faster_are_flagged():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3))
    # conv: 2 FLOPs x (2 x 4 x 4 outputs) x (1 x 3 x 3) MACs each; linear: 2 x 32 x 3
    assert count_flops(net, (1, 4, 4)) == 2 * 32 * 9 + 2 * 32 * 3
    stats = deployment_stats(net, (1, 4, 4), repeats=2)
    assert stats["params"] == 2 * 9 + 2 + 32 * 3 + 3 and stats["latency"]["threads"] == torch.get_num_threads()
    assert set(stats["latency"]) >= {"batch1_ms", "batch64_ms", "device"}
    models = {
        "teacher": {"role": "teacher", "deployment": {"params": 100, "flops": 1000, "weights_bytes": 400,
                                                      "latency": {"batch1_ms": 2.0, "batch64_ms": 20.0}}},
        "small": {"role": "student", "deployment": {"params": 10, "flops": 100, "weights_bytes": 40,
                                                    "latency": {"batch1_ms": 1.0, "batch64_ms": 10.0}}},
        "big": {"role": "student", "deployment": {"params": 200, "flops": 900, "weights_bytes": 800,
                                                  "latency": {"batch1_ms": 3.0, "batch64_ms": 10.0}}},
    }
    r = deployment_ratios(models)
    assert r["small"] == {"ratios": {"params": 0.1, "flops": 0.1, "size": 0.1, "latency_batch1": 0.5,
                                     "latency_batch64": 0.5}, "flags": []}
    assert r["big"]["flags"] == ["not smaller than its teacher", "not faster than its teacher at batch 1"]
    table = deployment_table(models)
    assert "| big | student | 0.000M" in table and "2.00x / 0.90x / 1.50x / 0.50x | not smaller" in table


# --------------------------------------------------------------------------- done when


def _image_folder(root):
    """3 classes of tiny 32x32 RGB images: 2 training images and 1 test image each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for c in ("ant", "bee", "cat"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


# Worked out by hand: timm ResNet-18 on 32x32 halves the map at conv1 (act1: 64 ch, 16x16), maxpool (layer1:
# 64 ch, 8x8), layer2..4 (128/256/512 ch at 4x4, 2x2, 1x1). timm MobileNetV3-Small-0.5: its feature_info modules
# bn1 (stem, 16 ch at 16x16), blocks.0 (8 ch, 8x8), blocks.1 (16 ch, 4x4), blocks.3 (24 ch, 2x2), blocks.5
# (288 ch, 1x1). One tap per size on each side: pairs stage k -> stage k, every teacher tap wider.
EXPECTED = [
    ("stage1", "act1", [64, 16, 16], "stage1", "bn1", [16, 16, 16], 48),
    ("stage2", "layer1", [64, 8, 8], "stage2", "blocks.0", [8, 8, 8], 56),
    ("stage3", "layer2", [128, 4, 4], "stage3", "blocks.1", [16, 4, 4], 112),
    ("stage4", "layer3", [256, 2, 2], "stage4", "blocks.3", [24, 2, 2], 232),
    ("stage5", "layer4", [512, 1, 1], "stage5", "blocks.5", [288, 1, 1], 224),
]


def test_done_when_timm_teacher_and_mobilenet_student_with_no_taps(tmp_path, capsys):
    _image_folder(tmp_path / "imgs")
    common = [f"data.root={tmp_path / 'imgs'}", "data.name=imagefolder", "data.kwargs={image_size: 32}",
              "data.num_workers=0", "data.batch_size=6", "teacher.name=timm:resnet18",
              "student.name=timm:mobilenetv3_small_050", "progress=false", "device=cpu"]
    assert main(["pair", *common]) == 0
    out = capsys.readouterr().out
    print(out)  # the pairing, as a user sees it
    assert "| stage2 | `layer1` | 64 x 8 x 8 | stage2 | `blocks.0` | 8 x 8 x 8 | 64 -> 8 (56 pruned) |" in out
    assert "warmup:\n  pairs: {stage1: stage1, stage2: stage2" in out

    run = [*common, "teacher.train.epochs=1", "warmup.phase_epochs=[1, 1, 1, 1, 1]", "student.train.epochs=6",
           "arms=[{name: indistill_at, warmup: indistill, method: at}]", "evaluate.protocols=[standard]",
           "evaluate.metrics=[cosine]", "evaluate.ks=[1]", "evaluate.latency_repeats=1", f"out_dir={tmp_path}", "name=z"]
    assert main(["run", "--defaults", *run]) == 0, capsys.readouterr().err
    rd = tmp_path / "z"
    res = json.loads((rd / "results.json").read_text())
    pairing = res["models"]["indistill_at"]["pairing"]
    got = [(r["teacher_tap"], r["teacher_module"], r["teacher_shape"], r["student_tap"], r["student_module"],
            r["student_shape"], r["pruned"]) for r in pairing["pairs"]]
    assert got == EXPECTED and pairing["how"] == "equal H x W, shallow to deep"
    phases = [json.loads(x)["phase"] for x in (rd / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["stage"] == "indistill_at"]
    assert phases == [f"warmup:stage{k}:mse" for k in range(1, 6)] + ["kd:at"]
    kept = json.loads((rd / "prune_indistill_at.json").read_text())["kept"]
    assert {k: len(v) for k, v in kept.items()} == {f"stage{k}": c for k, c in zip(range(1, 6), (16, 8, 16, 24, 288))}
    assert "stage pairs by equal H x W" in (rd / "log.txt").read_text()
    md = (rd / "results.md").read_text()
    assert "## Deployment" in md and "## Stage pairs: indistill_at" in md
    assert res["deployment"]["indistill_at"]["ratios"]["params"] < 0.1  # 0.57M against 11.2M parameters
