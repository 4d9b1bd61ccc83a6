"""Width alignment by pruning: L1 choice, BN-exact pruned taps, residual stages, errors, one forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
import torch_pruning as tp
from torch import nn

from indistill.errors import UserError
from indistill.models import Taps, create_model, model_taps
from indistill.prune import (
    PrunedTeacher,
    find_producers,
    l1_filter_ranking,
    physically_pruned_block,
    prune_to_student,
)

SHAPE = (3, 32, 32)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine params and moved running statistics, then eval mode: a 'trained-looking' teacher."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *SHAPE, generator=g) * 2.0 + 0.5)
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # the statistics really moved away from the (0, 1) init
            assert (m.running_mean.abs() > 1e-3).any() and ((m.running_var - 1).abs() > 1e-3).any()
    return model


def _teacher_taps(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad(), Taps(model, model_taps(model)) as taps:
        return taps(x)[1]


def _ln_structured_kept(layer: nn.Module, keep: int) -> torch.Tensor:
    """Channels torch's own structured L1 pruning keeps, on a copy of the layer."""
    clone = copy.deepcopy(layer)
    torch_prune.ln_structured(clone, "weight", amount=clone.weight.shape[0] - keep, n=1, dim=0)
    return torch.nonzero(clone.weight_mask.flatten(1).sum(1)).flatten()


# --------------------------------------------------------------------------- 1. the L1 choice


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (64, 32, 3, 3), (32, 16, 1, 1), (40, 24)])
def test_l1_ranking_matches_ln_structured(seed, shape):
    torch.manual_seed(seed)
    layer = nn.Conv2d(shape[1], shape[0], shape[2:]) if len(shape) == 4 else nn.Linear(shape[1], shape[0])
    ranking = l1_filter_ranking(layer.weight)
    assert sorted(ranking.tolist()) == list(range(shape[0]))
    for keep in (1, shape[0] // 4, shape[0] // 2, shape[0] - 1, shape[0]):
        expected = _ln_structured_kept(layer, keep)
        assert ranking[:keep].sort().values.tolist() == expected.tolist()


def test_l1_ranking_ties_by_index_and_rejects_vectors():
    w = torch.ones(6, 2, 3, 3)
    w[4] *= 2  # the largest filter first, then the equal ones in index order
    assert l1_filter_ranking(w).tolist() == [4, 0, 1, 2, 3, 5]
    with pytest.raises(UserError):
        l1_filter_ranking(torch.ones(5))


# --------------------------------------------------------------------------- 2. plain CNN: BN-exact


def test_cnn_pruned_taps_equal_physically_pruned_blocks():
    torch.manual_seed(0)
    teacher = _randomise(create_model("cnn32", 10, 3), seed=1)
    student = create_model("cnn32_small", 10, 3)
    pruned = prune_to_student(teacher, student, ["stage1", "stage2", "stage3"], input_shape=SHAPE)
    x = torch.randn(4, *SHAPE)
    full = _teacher_taps(teacher, x)
    out = pruned(x)

    prev = x
    for k, stage in enumerate(["stage1", "stage2", "stage3"], start=1):
        block = getattr(teacher, f"block{k}")
        kept = pruned.kept[stage]
        assert kept.tolist() == _ln_structured_kept(block.conv, len(kept)).tolist()
        assert pruned.producers[stage] == f"block{k}.conv"
        # The smaller layer reads the teacher's UNPRUNED previous activation.
        phys = nn.Sequential(*physically_pruned_block(block.conv, block.bn, kept), nn.ReLU(), nn.MaxPool2d(2)).eval()
        with torch.no_grad():
            expected = phys(prev)
        assert out[stage].shape == expected.shape == (4, len(kept), *full[stage].shape[2:])
        torch.testing.assert_close(out[stage], expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(out[stage], full[stage][:, kept], atol=0, rtol=0)

        # The reference code's defect: BN rebuilt with fresh statistics and zero bias gives other values.
        bad = nn.Sequential(
            physically_pruned_block(block.conv, None, kept)[0], nn.BatchNorm2d(len(kept)), nn.ReLU(), nn.MaxPool2d(2)
        ).eval()
        with torch.no_grad():
            assert (bad(prev) - expected).abs().max() > 1e-2
        prev = full[stage]

    # Unpruned embedding and logits ride along from the same forward.
    torch.testing.assert_close(out["embedding"], full["embedding"], atol=0, rtol=0)
    torch.testing.assert_close(out["logits"], full["logits"], atol=0, rtol=0)
    assert pruned.table()[1] == {
        "teacher_tap": "stage2", "student_tap": "stage2", "teacher_shape": (32, 6, 6),
        "student_shape": (16, 6, 6), "kept": 16, "producer": "block2.conv", "bn": "teacher",
    }
    assert pruned.widths == {"stage1": (16, 8), "stage2": (32, 16), "stage3": (64, 32)}


def test_physically_pruned_block_carries_bn_exactly():
    conv, bn = nn.Conv2d(3, 6, 3, bias=True), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    bn.eps = 1e-3
    bn.eval()
    kept = torch.tensor([0, 3, 5])
    block = physically_pruned_block(conv, bn, kept)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    # Golden: BatchNorm written out in float64 from the teacher's own parameters.
    z = F.conv2d(x, conv.weight.double(), conv.bias.double())[:, kept]
    rm, rv = bn.running_mean.double()[kept], bn.running_var.double()[kept]
    golden = (z - rm[:, None, None]) / torch.sqrt(rv[:, None, None] + 1e-3) * bn.weight.double()[kept][:, None, None]
    golden = golden + bn.bias.double()[kept][:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(block.double()(x), golden)
    assert not block[1].training and block[1].eps == 1e-3


# --------------------------------------------------------------------------- 3. residual stages


def _capture_block_input(block: nn.Module, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    store = {}
    h = block.register_forward_pre_hook(lambda _m, inp: store.__setitem__("x", inp[0]))
    with torch.no_grad():
        teacher(x)
    h.remove()
    return store["x"]


@pytest.mark.parametrize("importance", ["l1", "group"])
def test_resnet_stage_is_pruned_branch_plus_restricted_shortcut(importance):
    torch.manual_seed(0)
    teacher = _randomise(create_model("resnet20", 10, 3), seed=2)
    student = create_model("resnet20", 10, 3, widths=(8, 16, 32))
    pruned = prune_to_student(teacher, student, ["stage1", "stage2", "stage3"], input_shape=SHAPE, importance=importance)
    x = torch.randn(2, *SHAPE)
    out = pruned(x)
    full = _teacher_taps(teacher, x)
    for i, stage in enumerate(["stage1", "stage2", "stage3"], start=1):
        kept = pruned.kept[stage]
        width = (8, 16, 32)[i - 1]
        assert kept.tolist() == sorted(set(kept.tolist())) and len(kept) == width
        assert pruned.producers[stage] == f"layer{i}.2.conv2"
        last = getattr(teacher, f"layer{i}")[-1]
        xin = _capture_block_input(last, teacher, x)
        with torch.no_grad():
            h = last.relu1(last.bn1(last.conv1(xin)))
            branch = physically_pruned_block(last.conv2, last.bn2, kept).eval()(h)
            shortcut = xin if last.downsample is None else last.downsample(xin)
            manual = F.relu(branch + shortcut[:, kept])
        torch.testing.assert_close(out[stage], manual, atol=1e-6, rtol=0)
        torch.testing.assert_close(out[stage], full[stage][:, kept], atol=0, rtol=0)
        if importance == "l1":
            assert kept.tolist() == _ln_structured_kept(last.conv2, width).tolist()


def test_downsample_shortcut_is_restricted_too():
    # resnet8: one block per stage, so stage2's only block has a 1x1 conv + BN shortcut.
    teacher = _randomise(create_model("resnet8", 10, 3), seed=3)
    student = create_model("resnet8", 10, 3, widths=(8, 16, 32))
    pruned = prune_to_student(teacher, student, ["stage2"], input_shape=SHAPE)
    x = torch.randn(2, *SHAPE)
    block = teacher.layer2[0]
    assert block.downsample is not None
    kept = pruned.kept["stage2"]
    xin = _capture_block_input(block, teacher, x)
    with torch.no_grad():
        h = block.relu1(block.bn1(block.conv1(xin)))
        branch = physically_pruned_block(block.conv2, block.bn2, kept).eval()(h)
        short = physically_pruned_block(block.downsample[0], block.downsample[1], kept).eval()(xin)
        manual = F.relu(branch + short)
    torch.testing.assert_close(pruned(x)["stage2"], manual, atol=1e-6, rtol=0)


def _group_l1_golden_resnet20_stage1(model: nn.Module) -> torch.Tensor:
    """Group L1 importance of resnet20's stage-1 channels, written out by hand in float64.

    Every layer coupled to those 16 channels through the residual additions:
    the stem conv + BN, each block's conv2 + bn2 (writers), each block's conv1
    and layer2.0's conv1 and downsample conv (readers). Mean and sum rank alike.
    """
    d = lambda t: t.detach().double()  # noqa: E731
    out_l1 = lambda conv: d(conv.weight).abs().flatten(1).sum(1)  # noqa: E731
    in_l1 = lambda conv: d(conv.weight).abs().transpose(0, 1).flatten(1).sum(1)  # noqa: E731
    total = out_l1(model.conv1) + d(model.bn1.weight).abs()
    for b in model.layer1:
        total = total + out_l1(b.conv2) + d(b.bn2.weight).abs() + in_l1(b.conv1)
    return total + in_l1(model.layer2[0].conv1) + in_l1(model.layer2[0].downsample[0])


def test_group_importance_runs_through_torch_pruning(monkeypatch):
    calls = {"build": 0, "group": 0}
    build, get_group = tp.DependencyGraph.build_dependency, tp.DependencyGraph.get_pruning_group

    def spy_build(self, *a, **kw):
        calls["build"] += 1
        return build(self, *a, **kw)

    def spy_group(self, *a, **kw):
        calls["group"] += 1
        return get_group(self, *a, **kw)

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", spy_build)
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", spy_group)

    teacher = _randomise(create_model("resnet20", 10, 3), seed=4)
    for p in teacher.layer3.parameters():  # a partly frozen teacher must come back exactly as it was
        p.requires_grad_(False)
    stats = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = create_model("resnet20", 10, 3, widths=(8, 16, 32))
    group = prune_to_student(teacher, student, ["stage1", "stage2", "stage3"], input_shape=SHAPE, importance="group")
    assert calls == {"build": 1, "group": 3}
    assert all(torch.equal(stats[k], v) for k, v in teacher.state_dict().items())  # tracing moved no BN statistic

    golden = _group_l1_golden_resnet20_stage1(teacher)
    assert group.kept["stage1"].tolist() == torch.argsort(golden, descending=True)[:8].sort().values.tolist()

    teacher2 = _randomise(create_model("resnet20", 10, 3), seed=4)
    l1 = prune_to_student(teacher2, student, ["stage1", "stage2", "stage3"], input_shape=SHAPE, importance="l1")
    assert any(group.kept[s].tolist() != l1.kept[s].tolist() for s in ("stage1", "stage2", "stage3"))


def test_wrn_preactivation_stage_and_group_mode():
    teacher = _randomise(create_model("wrn_16_2", 10, 3), seed=5)
    student = create_model("wrn_16_1", 10, 3)
    x = torch.randn(2, *SHAPE)
    full = _teacher_taps(teacher, x)
    kept_by_mode = {}
    for importance in ("l1", "group"):
        pruned = prune_to_student(teacher, student, ["stage1", "stage2", "stage3"], input_shape=SHAPE, importance=importance)
        out = pruned(x)
        assert pruned.producers == {"stage1": "block1.layer.1.conv2", "stage2": "block2.layer.1.conv2",
                                    "stage3": "block3.layer.1.conv2"}
        for stage, width in zip(("stage1", "stage2", "stage3"), (16, 32, 64)):
            kept = pruned.kept[stage]
            assert len(set(kept.tolist())) == width and kept.tolist() == sorted(kept.tolist())
            torch.testing.assert_close(out[stage], full[stage][:, kept], atol=0, rtol=0)
        last = teacher.block1.layer[-1]  # pre-activation: the stage output is conv2(...) + x, no BN after conv2
        kept = pruned.kept["stage1"]
        xin = _capture_block_input(last, teacher, x)
        with torch.no_grad():
            h = last.relu2(last.bn2(last.conv1(last.relu1(last.bn1(xin)))))
            manual = physically_pruned_block(last.conv2, None, kept)(h) + xin[:, kept]
        torch.testing.assert_close(out["stage1"], manual, atol=1e-5, rtol=0)
        kept_by_mode[importance] = {s: v.tolist() for s, v in pruned.kept.items()}
    assert kept_by_mode["l1"] != kept_by_mode["group"]


# --------------------------------------------------------------------------- producers


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.late = nn.Conv2d(8, 8, 1)  # registered first, runs last
        self.early = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return self.late(self.early(x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Body()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.pool(self.body(x)).flatten(1))


def test_producer_follows_execution_order_and_overrides():
    specs = {"stage1": "body", "pooled": "pool", "embedding": "fc:in", "logits": "@output"}
    found = find_producers(_Net(), specs, (3, 4, 4))
    assert found == {"stage1": "body.late", "pooled": "body.late", "embedding": "body.late", "logits": "fc"}
    assert find_producers(_Net(), specs, (3, 4, 4), overrides={"stage1": "body.early"})["stage1"] == "body.early"
    with pytest.raises(UserError, match="producer .fc. for tap embedding"):
        find_producers(_Net(), {"embedding": "fc:in"}, (3, 4, 4), overrides={"embedding": "fc"})
    with pytest.raises(UserError, match="unknown tap"):
        find_producers(_Net(), specs, (3, 4, 4), overrides={"stage9": "body.late"})

    cnn = create_model("cnn32", 10, 3)
    assert find_producers(cnn, model_taps(cnn), SHAPE)["embedding"] == "fc1"
    res = create_model("resnet20", 10, 3)
    assert find_producers(res, model_taps(res), SHAPE)["embedding"] == "layer3.2.conv2"


def test_producer_override_and_explicit_specs_for_user_models():
    teacher = _randomise(create_model("resnet20", 10, 3), seed=6)
    student = create_model("resnet20", 10, 3, widths=(8, 16, 32))
    pruned = prune_to_student(
        teacher, student, {"s1": "first"}, input_shape=SHAPE, producers={"s1": "layer1.1.conv2"},
        teacher_taps={"s1": "layer1", "logits": "@output"}, student_taps={"first": "layer1"},
    )
    assert pruned.producers["s1"] == "layer1.1.conv2"
    assert pruned.kept["s1"].tolist() == _ln_structured_kept(teacher.layer1[1].conv2, 8).tolist()
    out = pruned(torch.randn(2, *SHAPE))
    assert sorted(out) == ["first", "logits"] and out["first"].shape == (2, 8, 32, 32)


def test_equal_widths_keep_everything():
    teacher = create_model("resnet20", 10, 3)
    pruned = prune_to_student(teacher, create_model("resnet20", 10, 3), None, input_shape=SHAPE)
    assert list(pruned.pairs) == ["stage1", "stage2", "stage3"]
    x = torch.randn(2, *SHAPE)
    full = _teacher_taps(teacher, x)
    out = pruned(x)
    for s, c in zip(pruned.pairs, (16, 32, 64)):
        assert pruned.kept[s].tolist() == list(range(c))
        assert torch.equal(out[s], full[s])


# --------------------------------------------------------------------------- 4. errors and resize


def test_student_wider_than_teacher_is_a_user_error():
    with pytest.raises(UserError) as e:
        prune_to_student(create_model("cnn32_small", 10, 3), create_model("cnn32", 10, 3), ["stage1"], input_shape=SHAPE)
    msg = str(e.value)
    assert "teacher tap stage1 (8, 15, 15)" in msg and "student tap stage1 (16, 15, 15)" in msg and "\n" not in msg


def test_spatial_mismatch_error_and_avgpool_opt_in():
    teacher, student = _randomise(create_model("cnn32", 10, 3), seed=7), create_model("cnn32", 10, 3, widths=(4, 8, 16))
    with pytest.raises(UserError, match=r"teacher tap stage1 \(16, 15, 15\).*student tap stage2 \(8, 6, 6\).*resize"):
        prune_to_student(teacher, student, {"stage1": "stage2"}, input_shape=SHAPE)
    with pytest.raises(UserError, match="only shrinks"):
        prune_to_student(teacher, student, {"stage2": "stage1"}, input_shape=SHAPE, resize="avgpool")

    pruned = prune_to_student(teacher, student, {"stage1": "stage2"}, input_shape=SHAPE, resize="avgpool")
    x = torch.randn(2, *SHAPE)
    got = pruned(x)["stage2"]
    kept = pruned.kept["stage1"]
    assert kept.tolist() == _ln_structured_kept(teacher.block1.conv, 8).tolist()
    src = _teacher_taps(teacher, x)["stage1"][:, kept].double()
    # Golden adaptive average pooling 15 -> 6 by its window formula.
    golden = torch.empty(2, 8, 6, 6, dtype=torch.float64)
    win = [(math.floor(i * 15 / 6), math.ceil((i + 1) * 15 / 6)) for i in range(6)]
    for i, (a, b) in enumerate(win):
        for j, (c, d) in enumerate(win):
            golden[:, :, i, j] = src[:, :, a:b, c:d].mean(dim=(2, 3))
    torch.testing.assert_close(got.double(), golden, atol=1e-6, rtol=0)


def test_bad_arguments_are_user_errors():
    t, s = create_model("cnn32", 10, 3), create_model("cnn32_small", 10, 3)
    with pytest.raises(UserError, match="importance"):
        prune_to_student(t, s, ["stage1"], input_shape=SHAPE, importance="l2")
    with pytest.raises(UserError, match="resize 'nearest'.*'avgpool', 'bilinear'"):
        prune_to_student(t, s, ["stage1"], input_shape=SHAPE, resize="nearest")
    with pytest.raises(UserError, match="did you mean: stage1"):
        prune_to_student(t, s, {"stage_1": "stage1"}, input_shape=SHAPE)
    with pytest.raises(UserError, match="declares no taps"):
        prune_to_student(nn.Conv2d(3, 4, 3), s, ["stage1"], input_shape=SHAPE)
    with pytest.raises(UserError, match="different ranks"):
        prune_to_student(t, s, {"stage3": "embedding"}, input_shape=SHAPE)


def _bilinear_golden(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Bilinear resize with half-pixel centres and edge clamping (align_corners=False), written out in float64."""
    x = x.double()
    n, c, h, w = x.shape

    def taps(n_out: int, n_in: int) -> list[tuple[int, int, float]]:
        rows = []
        for i in range(n_out):
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            lo = min(int(math.floor(src)), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            rows.append((lo, hi, src - lo))
        return rows

    out = torch.empty(n, c, out_h, out_w, dtype=torch.float64)
    for i, (y0, y1, fy) in enumerate(taps(out_h, h)):
        for j, (x0, x1, fx) in enumerate(taps(out_w, w)):
            out[:, :, i, j] = ((1 - fy) * ((1 - fx) * x[:, :, y0, x0] + fx * x[:, :, y0, x1])
                               + fy * ((1 - fx) * x[:, :, y1, x0] + fx * x[:, :, y1, x1]))
    return out


def test_bilinear_enlarges_a_smaller_teacher_map():
    # Teacher stage2 (32, 6, 6) is smaller than student stage1 (4, 15, 15): avgpool cannot, bilinear can.
    teacher, student = _randomise(create_model("cnn32", 10, 3), seed=11), create_model("cnn32", 10, 3, widths=(4, 8, 16))
    with pytest.raises(UserError, match=r"teacher tap stage2 \(32, 6, 6\).*only shrinks.*resize: bilinear"):
        prune_to_student(teacher, student, {"stage2": "stage1"}, input_shape=SHAPE, resize="avgpool")
    with pytest.raises(UserError, match="resize: avgpool.*resize: bilinear"):
        prune_to_student(teacher, student, {"stage2": "stage1"}, input_shape=SHAPE)
    pruned = prune_to_student(teacher, student, {"stage2": "stage1"}, input_shape=SHAPE, resize="bilinear")
    assert pruned.shapes["stage2"] == ((32, 6, 6), (4, 15, 15))
    x = torch.randn(3, *SHAPE)
    got = pruned(x)["stage1"]
    kept = _ln_structured_kept(teacher.block2.conv, 4)  # independent of the pruner's own ranking
    assert pruned.kept["stage2"].tolist() == kept.tolist()
    src = _teacher_taps(teacher, x)["stage2"][:, kept]
    assert got.shape == (3, 4, 15, 15)
    torch.testing.assert_close(got, F.interpolate(src, size=(15, 15), mode="bilinear", align_corners=False))
    torch.testing.assert_close(got.double(), _bilinear_golden(src, 15, 15), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["avgpool", "bilinear"])
def test_resize_on_a_heterogeneous_zoo_pair(mode):
    # vgg13 -> MobileNetV2 (the CRD benchmark pair): stage1..3 have equal sizes and are NOT resized;
    # stage4 is (512, 4, 4) -> (160, 2, 2); shrinking by 2, bilinear (no antialias) equals 2x2 average pooling.
    teacher = _randomise(create_model("vgg13", 100, 3), seed=12)
    student = create_model("MobileNetV2", 100, 3)
    pairs = {f"stage{k}": f"stage{k}" for k in range(1, 5)}
    pruned = prune_to_student(teacher, student, pairs, input_shape=SHAPE, resize=mode)
    x = torch.randn(2, *SHAPE)
    got = pruned(x)
    full = _teacher_taps(teacher, x)
    s_shapes = {k: tuple(v.shape[1:]) for k, v in _teacher_taps(student.eval(), x).items()}
    for t, s in pairs.items():
        assert tuple(got[s].shape[1:]) == s_shapes[s]
        src = full[t][:, pruned.kept[t]]
        if t != "stage4":
            assert torch.equal(got[s], src)  # same size: the teacher's own activation, untouched
    src = full["stage4"][:, pruned.kept["stage4"]]
    torch.testing.assert_close(got["stage4"], F.adaptive_avg_pool2d(src, (2, 2)))
    torch.testing.assert_close(got["stage4"], F.avg_pool2d(src, 2))


def test_resize_map_and_config_choice():
    from indistill.config import load_config
    from indistill.prune import resize_map

    f = torch.randn(2, 3, 8, 8)
    assert resize_map(f, (8, 8), "bilinear") is f and resize_map(f, (4, 4), None) is f
    torch.testing.assert_close(resize_map(f, (3, 5), "avgpool"), F.adaptive_avg_pool2d(f, (3, 5)))
    torch.testing.assert_close(resize_map(f, (12, 12), "bilinear").double(), _bilinear_golden(f, 12, 12), atol=1e-5, rtol=0)
    assert load_config(None, ["warmup.resize=bilinear"]).warmup.resize == "bilinear"
    with pytest.raises(UserError, match="warmup.resize: 'nearest' is not one of null, avgpool, bilinear"):
        load_config(None, ["warmup.resize=nearest"])


# --------------------------------------------------------------------------- 5. one teacher forward


def test_one_teacher_forward_per_call_and_targets_from_reuse():
    teacher = _randomise(create_model("cnn32", 10, 3), seed=8)
    pruned = prune_to_student(teacher, create_model("cnn32_small", 10, 3), None, input_shape=SHAPE)
    counts = {"model": 0, "conv": 0}
    handles = [teacher.register_forward_hook(lambda *_: counts.__setitem__("model", counts["model"] + 1))]
    convs = [m for m in teacher.modules() if isinstance(m, nn.Conv2d)]
    handles += [c.register_forward_hook(lambda *_: counts.__setitem__("conv", counts["conv"] + 1)) for c in convs]
    pruned.train()  # the teacher stays in eval mode whatever the wrapper's mode
    x = torch.randn(3, *SHAPE)
    stats = teacher.block1.bn.running_mean.clone()
    out = pruned(x)
    assert counts == {"model": 1, "conv": len(convs)}
    assert not teacher.training and torch.equal(teacher.block1.bn.running_mean, stats)
    assert all(not p.requires_grad for p in teacher.parameters()) and not out["stage1"].requires_grad
    for h in handles:
        h.remove()

    with torch.no_grad(), Taps(teacher, pruned.tap_specs) as taps:
        _, feats = taps(x)
    reused = pruned.targets_from(feats)
    assert sorted(reused) == sorted(out) == ["embedding", "logits", "stage1", "stage2", "stage3"]
    assert all(torch.equal(reused[k], out[k]) for k in out)
    with pytest.raises(UserError, match="stage2"):
        pruned.targets_from({"stage1": feats["stage1"]})
    assert isinstance(pruned, PrunedTeacher)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pruned_teacher_moves_to_cuda():
    teacher = create_model("resnet8", 10, 3).cuda()
    student = create_model("resnet8", 10, 3, widths=(8, 16, 32)).cuda()
    pruned = prune_to_student(teacher, student, None, input_shape=SHAPE, importance="group")
    out = pruned(torch.randn(2, *SHAPE, device="cuda"))
    assert all(v.is_cuda for v in out.values()) and all(k.is_cuda for k in pruned.kept.values())
    assert out["stage1"].shape == (2, 8, 32, 32)
