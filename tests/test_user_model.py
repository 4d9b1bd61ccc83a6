"""Bring your own nn.Module: taps by module path, in Python and through the CLI."""

import json

import torch

from indistill import Taps, prune_to_student
from indistill.cli import main

from .user_models import make_net

TAPS = {"stage1": "0", "stage2": "1", "embedding": "4:in", "logits": "@output"}


def test_python_api_example_from_readme():
    torch.manual_seed(0)
    teacher, student = make_net(10, 1, width=8).eval(), make_net(10, 1, width=4)
    pruned = prune_to_student(teacher, student, {"stage1": "stage1", "stage2": "stage2"}, input_shape=(1, 32, 32),
                              teacher_taps=TAPS, student_taps=TAPS)
    x = torch.randn(5, 1, 32, 32)
    targets = pruned(x)
    with Taps(teacher, TAPS) as taps:
        _, full = taps(x)
    assert targets["stage1"].shape == (5, 4, 16, 16)
    assert torch.equal(targets["stage1"], full["stage1"][:, pruned.kept["stage1"]])
    assert targets["embedding"].shape == (5, 16)
    with Taps(student, {"stage1": "0"}) as taps:
        _, feats = taps(x)
    loss = ((feats["stage1"] - targets["stage1"]) ** 2).mean()
    loss.backward()
    assert student[0][0].weight.grad is not None


def test_user_models_through_the_pipeline(tmp_path, capsys):
    taps = "{stage1: '0', stage2: '1', embedding: '4:in', logits: '@output'}"
    code = main([
        "run", "--defaults", "data.name=digits", "data.train_subset=300", "data.test_subset=100", f"out_dir={tmp_path}",
        "name=u", "progress=false", "teacher.name=tests.user_models:make_net", "teacher.kwargs={width: 8}",
        f"teacher.taps={taps}", "student.name=tests.user_models:make_net", "student.kwargs={width: 4}",
        f"student.taps={taps}", "teacher.train.epochs=1", "warmup.a=0", "warmup.embedding_epochs=1",
        "student.train.epochs=5",
        "kd.method=kd", "evaluate.protocols=[standard]",
    ])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "u" / "results.json").read_text())
    assert set(res["models"]) == {"teacher", "student"}
    kept = json.loads((tmp_path / "u" / "prune_student.json").read_text())["kept"]
    assert {k: len(v) for k, v in kept.items()} == {"stage1": 4, "stage2": 8}
