"""Performance changes must not change results: bit-identical targets, losses and weights."""

import copy

import pytest
import torch

from indistill.config import ArmSpec, load_config
from indistill.data.memory import make_in_memory_splits
from indistill.models import Taps, create_model, model_taps
from indistill.pipeline import Pipeline


def _data(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return make_in_memory_splits("random", 10, x, y, x[:64], y[:64], pad=4, flip=True)


def test_capture_returns_the_taps_of_a_full_forward():
    model = create_model("cnn32", num_classes=10, in_channels=1).eval()
    x = torch.randn(4, 1, 32, 32)
    with Taps(model, model_taps(model)) as taps, torch.no_grad():
        _, full = taps(x)
        for name in full:
            got = taps.capture(x, names=[name])
            assert list(got) == [name] and torch.equal(got[name], full[name]), name
        both = taps.capture(x, names=["stage2", "embedding"])
        assert all(torch.equal(both[k], full[k]) for k in both)


@pytest.mark.parametrize("pair,extra", [(("cnn32", "cnn32_small"), []),
                                        (("resnet20", "cnn32_small"), ["warmup.resize=avgpool"])])
def test_warmup_target_equals_the_pruned_forward(tmp_path, pair, extra):
    cfg = load_config(None, [f"out_dir={tmp_path}", "device=cpu", f"teacher.name={pair[0]}",
                             f"student.name={pair[1]}", "warmup.embedding_epochs=1", *extra])
    pipe = Pipeline(cfg, data=_data(64))
    warmup = pipe.warmup_for(ArmSpec(name="a", warmup="indistill", method="pkt"),
                             pipe.seeded_model(cfg.teacher), pipe.seeded_model(cfg.student))
    x = torch.randn(8, 1, 32, 32)
    full = warmup.pruned(x)
    keys = [p.tap if p.loss == "mse" else "embedding" for p in warmup.schedule]
    assert "embedding" in keys and len(keys) >= 3
    for key in keys:
        assert torch.equal(warmup.target(x, key), full[key]), key


def _train_arm(tmp_path, name, reference: bool):
    """An InDistill arm through every warmup phase and two KD epochs, 2 batches each; losses and weights."""
    cfg = load_config(None, [f"out_dir={tmp_path / name}", "device=cpu", "progress=false", "data.batch_size=32",
                             "teacher.name=cnn32", "student.name=cnn32_small", "warmup.phase_epochs=[1, 1, 1]",
                             "warmup.embedding_epochs=1", "student.train.epochs=6", "loss_guard=0"])
    data = _data(64)
    pipe = Pipeline(cfg, data=data)
    stage = pipe.arm(ArmSpec(name="arm", warmup="indistill", method="pkt", params={}),
                     pipe.seeded_model(cfg.teacher), pipe.seeded_model(cfg.student))
    if reference:  # the code before the change: the whole pruned source forward, then one key
        warmup = stage.warmup
        warmup.target = lambda x, key: warmup.pruned(x)[key]
    state = pipe.engine.begin(stage)
    losses = []
    try:
        for epoch in range(cfg.student.train.epochs):
            row = pipe.engine.run_epoch(stage, epoch, state)
            losses.append((row["phase"], row["loss"]))
    finally:
        stage.close()
    return losses, copy.deepcopy(stage.model.state_dict())


def test_warmup_training_is_bit_identical_to_the_full_source_forward(tmp_path):
    new_losses, new_w = _train_arm(tmp_path, "new", reference=False)
    ref_losses, ref_w = _train_arm(tmp_path, "ref", reference=True)
    assert [p for p, _ in new_losses] == ["warmup:stage1:mse", "warmup:stage2:mse", "warmup:stage3:mse",
                                          "warmup:embedding:pkt", "kd:pkt", "kd:pkt"]
    assert new_losses == ref_losses
    assert new_w.keys() == ref_w.keys() and all(torch.equal(new_w[k], ref_w[k]) for k in new_w)
