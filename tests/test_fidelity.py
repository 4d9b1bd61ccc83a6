"""What the method description leaves open, as described or as the authors released it (issue 22):
optimizer resets, the authors' pruned BatchNorm, ``warmup.reference`` and the boundary diagnostic."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from indistill.config import ArmSpec, TrainSpec, load_config, resolve_arms
from indistill.data.memory import InMemorySplit
from indistill.engine import Engine
from indistill.errors import UserError
from indistill.models import create_model, declare_model
from indistill.prune import find_norms
from indistill.stages import arm_stage, reset_epochs
from indistill.methods import create_method, MethodContext
from indistill.warmup import build_warmup
from indistill.config import WarmupSpec


def _trained_like_teacher(seed: int = 0) -> nn.Module:
    """A cnn32 whose BatchNorms hold non-trivial running statistics and affine parameters."""
    torch.manual_seed(seed)
    t = create_model("cnn32", num_classes=10, in_channels=1)
    with torch.no_grad():
        for m in t.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.2, 1.5)
                m.bias.uniform_(-1.0, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return t.eval()


def _warmup(bn: str | None, reference: str = "described"):
    teacher = _trained_like_teacher()
    student = create_model("cnn32_small", num_classes=10, in_channels=1)
    spec = WarmupSpec(reference=reference, pruned_bn=bn)
    return teacher, build_warmup(spec, teacher, student, (1, 32, 32))


def test_teacher_bn_target_is_the_teachers_eval_activation_restricted():
    teacher, w = _warmup("teacher")
    x = torch.randn(16, 1, 32, 32, dtype=torch.float32)
    kept = w.pruned.kept["stage2"]
    with torch.no_grad():  # by hand: the teacher's own eval-mode block2, then the kept channels
        h = teacher.block1(x)
        z = teacher.block2.conv(h)
        bn = teacher.block2.bn
        y = (z - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var[None, :, None, None] + bn.eps)
        y = y * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
        expect = F.max_pool2d(F.relu(y), 2)[:, kept]
    torch.testing.assert_close(w.target(x, "stage2"), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tap,block", [("stage1", "block1"), ("stage2", "block2"), ("stage3", "block3")])
def test_authors_bn_target_equals_their_rebuilt_pruned_network(tap, block):
    """The authors' utils.prune_model_l1_structured rebuilt each layer: a new Conv2d holding the kept filters
    (a fresh random bias), a new BatchNorm2d(len(kept)) with the kept gamma, beta 0 and fresh statistics, left
    in training mode; its input is the unpruned auxiliary's previous (eval-mode) activation. Computed here in
    float64 from those pieces, independently of the hook the library uses."""
    teacher, w = _warmup("authors")
    assert w.pruned.norms == {f"stage{k}": f"block{k}.bn" for k in (1, 2, 3)}
    x = torch.randn(32, 1, 32, 32)
    kept = w.pruned.kept[tap]
    with torch.no_grad():
        h = x
        for b in ("block1", "block2", "block3"):
            if b == block:
                break
            h = getattr(teacher, b)(h)  # the teacher's own eval-mode activation feeds the pruned layer
        conv, bn = getattr(teacher, block).conv, getattr(teacher, block).bn
        rebuilt = nn.Conv2d(conv.in_channels, len(kept), 3).double()
        rebuilt.weight.copy_(conv.weight[kept].double())  # rebuilt.bias stays random, as theirs
        new_bn = nn.BatchNorm2d(len(kept)).double().train()
        new_bn.weight.copy_(bn.weight[kept].double())
        expect = F.max_pool2d(F.relu(new_bn(rebuilt(h.double()))), 2).float()
    got = w.target(x, tap)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    # and it is not the teacher-BN target (beta, running statistics differ)
    _, w_teacher = _warmup("teacher")
    assert not torch.allclose(got, w_teacher.target(x, tap), atol=1e-3)


def test_authors_bn_forward_matches_per_tap_targets_and_leaves_the_teacher_untouched():
    teacher, w = _warmup("authors")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(8, 1, 32, 32)
    out = w.pruned(x)
    for key in ("stage1", "stage2", "stage3", "embedding"):
        torch.testing.assert_close(out[key], w.target(x, key), rtol=0, atol=0)
    # the embedding passes through unpruned: the teacher's own (eval-mode) forward, no hook left behind
    with torch.no_grad():
        feats = teacher.relu1(teacher.fc1(teacher.flatten(teacher.block3(teacher.block2(teacher.block1(x))))))
    torch.testing.assert_close(out["embedding"], feats)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(UserError, match="authors"):
        w.pruned.targets_from({})


def test_find_norms_names_the_bn_reading_the_producer_and_refuses_a_missing_one():
    t = create_model("cnn32", num_classes=10, in_channels=1)
    assert find_norms(t, {"stage2": "block2.conv"}, (1, 32, 32)) == {"stage2": "block2.bn"}
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(UserError, match="pruned_bn: teacher"):
        find_norms(plain, {"stage1": "0"}, (1, 8, 8))


def test_authors_bn_keeps_the_teacher_activation_where_no_batchnorm_reads_the_producer():
    # A pre-activation-like teacher: stage1's producer feeds a ReLU directly (no BatchNorm to rebuild),
    # stage2's producer feeds a BatchNorm. The default (authors) must still run, and say which is which.
    torch.manual_seed(0)
    teacher = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
    ).eval()
    with torch.no_grad():
        teacher[1][1].weight.uniform_(0.5, 1.5)
        teacher[1][1].bias.uniform_(-1.0, -0.2)
    student = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
    )
    taps = {"stage1": "0", "stage2": "1"}
    w = build_warmup(WarmupSpec(pairs={"stage1": "stage1", "stage2": "stage2"}), declare_model(teacher, taps),
                     declare_model(student, taps), (1, 8, 8))
    rows = {r["teacher_tap"]: r["bn"] for r in w.table()}
    assert rows["stage1"].startswith("teacher (no BatchNorm reads the output of 0.0")
    assert rows["stage2"] == "authors (1.1)"
    assert w.pruned.teacher_bn_taps == ["stage1"]
    x = torch.randn(6, 1, 8, 8)
    k1, k2 = w.pruned.kept["stage1"], w.pruned.kept["stage2"]
    with torch.no_grad():  # by hand: stage1 is the teacher's own activation; stage2 the authors' batch-stat BN
        h = teacher[0](x)
        torch.testing.assert_close(w.target(x, "stage1"), h[:, k1])
        z = teacher[1][0](h)
        mean, var = z.mean(dim=(0, 2, 3), keepdim=True), z.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        y = F.relu((z - mean) / torch.sqrt(var + 1e-5) * teacher[1][1].weight[None, :, None, None])
        torch.testing.assert_close(w.target(x, "stage2"), y[:, k2], rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="pruned_bn: teacher"):  # asked for by name, it is still required
        find_norms(teacher, {"stage1": "0.0"}, (1, 8, 8))


def test_reference_sets_the_open_choices_and_explicit_keys_win():
    cfg = load_config(None, ["warmup.reference=authors"])
    (arm,) = resolve_arms(cfg)
    assert (arm.reference, arm.optimizer_reset, arm.pruned_bn) == ("authors", "epoch", "authors")
    (arm,) = resolve_arms(load_config(None, []))
    assert (arm.reference, arm.optimizer_reset, arm.pruned_bn) == ("authors", "epoch", "authors")
    (arm,) = resolve_arms(load_config(None, ["warmup.reference=described"]))
    assert (arm.reference, arm.optimizer_reset, arm.pruned_bn) == ("described", "phase", "teacher")
    (arm,) = resolve_arms(load_config(None, ["warmup.reference=authors", "student.optimizer_reset=boundary"]))
    assert (arm.optimizer_reset, arm.pruned_bn) == ("boundary", "authors")
    cfg = load_config(None, ["arms=[{name: a, reference: authors, pruned_bn: teacher}]"])
    assert resolve_arms(cfg)[0].pruned_bn == "teacher"
    with pytest.raises(UserError, match="optimizer_reset"):
        load_config(None, ["student.optimizer_reset=sometimes"])


def test_legacy_kd_boundary_reads_as_optimizer_reset():
    assert load_config(None, ["student.kd_boundary=keep"]).student.optimizer_reset == "none"
    assert load_config(None, ["student.kd_boundary=reset"]).student.optimizer_reset == "boundary"
    with pytest.raises(UserError, match="disagree"):
        load_config(None, ["student.kd_boundary=keep", "student.optimizer_reset=phase"])


def test_reset_epochs_per_mode():
    _, w = _warmup("teacher")  # phases 3, 4, 5 epochs: starts 0, 3, 7; boundary 12
    assert reset_epochs("none", w, 20) == ()
    assert reset_epochs("boundary", w, 20) == (12,)
    assert reset_epochs("phase", w, 20) == (3, 7, 12)
    assert reset_epochs("epoch", w, 20) == tuple(range(1, 20))
    assert reset_epochs("phase", None, 20) == () and reset_epochs("epoch", None, 4) == (1, 2, 3)


def _tiny_arm(mode: str, tmp_path, epochs: int = 5):
    """A student arm on 64 random images: warmup phases 1 + 1 + 1 epochs, then PKT."""
    torch.manual_seed(0)
    teacher = _trained_like_teacher()
    student = create_model("cnn32_small", num_classes=10, in_channels=1)
    w = build_warmup(WarmupSpec(phase_epochs=[1, 1, 1]), teacher, student, (1, 32, 32))
    ctx = MethodContext(student_shapes={"embedding": (64,)}, teacher_shapes={"embedding": (128,)}, num_classes=10,
                        num_samples=64, epochs=epochs)
    method = create_method("pkt", ctx, {})
    arm = ArmSpec(name=f"arm_{mode}", warmup="indistill", method="pkt")
    train = TrainSpec(epochs=epochs, eval_every=0)
    train.scheduler.name, train.scheduler.milestones = "multistep", [3]
    stage = arm_stage(arm, student, teacher, warmup=w, method=method, t_want={"embedding": "fc2:in"},
                      s_want={"embedding": "fc2:in", "logits": "@output"}, train=train, optimizer_reset=mode)
    g = torch.Generator().manual_seed(1)
    split = InMemorySplit(torch.randint(0, 256, (64, 1, 32, 32), generator=g, dtype=torch.uint8),
                          torch.randint(0, 10, (64,), generator=g), (0.5,), (0.25,))
    engine = Engine(tmp_path / mode, split, batch_size=16, progress=False)
    return engine, stage, w


@pytest.mark.parametrize("mode", ["none", "boundary", "phase", "epoch"])
def test_adam_state_is_empty_right_after_each_reset_and_kept_elsewhere(mode, tmp_path):
    engine, stage, warmup = _tiny_arm(mode, tmp_path)
    state = engine.begin(stage)
    seen: list[tuple[int, int, float]] = []  # (epoch, steps Adam had taken before this epoch's first step, lr)
    for epoch in range(stage.train.epochs):
        first = {}

        def pre_hook(opt, _args, _kwargs, first=first):
            if not first:
                steps = [float(s["step"]) for s in opt.state.values()]
                first["steps"] = int(max(steps)) if steps else 0

        h = state.optimizer.register_step_pre_hook(pre_hook)
        row = engine.run_epoch(stage, epoch, state)
        h.remove()
        engine.end_epoch(stage, epoch, state, row)
        seen.append((epoch, first["steps"], row["lr"]))
    resets = set(reset_epochs(mode, warmup, stage.train.epochs))
    assert tuple(sorted(resets)) == tuple(stage.reset_optimizer_at)
    for epoch, steps, _lr in seen:
        if epoch == 0 or epoch in resets:
            assert steps == 0, (mode, epoch)  # empty state: Adam starts afresh
        else:
            assert steps == 4 * (epoch - max([0] + [r for r in resets if r <= epoch])), (mode, epoch)
    # one schedule over absolute epochs in every mode
    assert [lr for _, _, lr in seen] == [1e-3, 1e-3, 1e-3, 1e-4, 1e-4]
    rows = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] - 1 for r in rows if r.get("optimizer_reset")] == sorted(resets)
    # the diagnostic at every loss change (phases start at 1, 2; PKT at 3), before any reset clears the state
    changed = [r for r in rows if "adam_vhat_grad_ratio/g0" in r]
    assert [r["epoch"] - 1 for r in changed] == [1, 2, 3]
    assert all(r["adam_vhat_grad_ratio/g0"] > 0 for r in changed)


def test_ratio_is_sqrt_vhat_over_grad_rms_by_hand():
    """The diagnostic, checked against Adam's moments computed by hand for one parameter."""
    from indistill.engine import adam_denominators, second_moment_ratio

    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.9, 0.999))
    grads = [torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64) * (k + 1) for k in range(3)]
    v = torch.zeros(4, dtype=torch.float64)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        v = 0.999 * v + 0.001 * g * g
    v_hat = v / (1 - 0.999 ** 3)
    stale = adam_denominators(opt)
    p.grad = torch.full((4,), 0.01, dtype=torch.float64)  # the new loss's much smaller gradient
    (ratio,) = second_moment_ratio(opt, stale)
    expect = float(v_hat.sqrt().pow(2).mean().sqrt() / 0.01)
    assert ratio == pytest.approx(expect, rel=1e-6)
    assert adam_denominators(torch.optim.SGD([p], lr=0.1)) is None


def test_epoch_mode_equals_the_authors_loop_that_creates_adam_every_epoch(tmp_path):
    """`optimizer_reset: epoch` against an independent re-creation of the authors' loop
    (`for epoch in ...: optimizer = optim.Adam(params, lr=lr)`), same initial weights, batches and LR
    per epoch: the weights must agree to float rounding; one Adam kept throughout must not."""
    from indistill.engine import Stage

    def model_and_split():
        torch.manual_seed(3)
        m = create_model("cnn32_small", num_classes=10, in_channels=1)
        g = torch.Generator().manual_seed(4)
        sp = InMemorySplit(torch.randint(0, 256, (48, 1, 32, 32), generator=g, dtype=torch.uint8),
                           torch.randint(0, 10, (48,), generator=g), (0.5,), (0.25,))
        return m, sp

    train = TrainSpec(epochs=4, eval_every=0)
    train.scheduler.name, train.scheduler.milestones = "multistep", [2]
    lrs = [1e-3, 1e-3, 1e-4, 1e-4]

    def run_engine(mode_epochs, name):
        model, split = model_and_split()
        stage = Stage(name, model, lambda b, _e: {"ce": F.cross_entropy(model(b.images), b.labels)}, train,
                      reset_optimizer_at=mode_epochs)
        Engine(tmp_path / name, split, batch_size=16, progress=False, seed=7).fit(stage)
        return model

    by_engine = run_engine(reset_epochs("epoch", None, 4), "epoch_mode")
    kept = run_engine((), "kept")

    model, split = model_and_split()  # the authors' loop, written out
    model.train()
    for epoch, lr in enumerate(lrs):
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for batch in split.batches(16, shuffle=True, seed=7, epoch=epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(batch.images), batch.labels).backward()
            optimizer.step()
    for (name, a), b, c in zip(model.state_dict().items(), by_engine.state_dict().values(), kept.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.allclose(a, c, atol=1e-6) for a, c in zip(model.state_dict().values(), kept.state_dict().values())
               if a.dtype.is_floating_point)
