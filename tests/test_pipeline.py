"""Pipeline-level behaviour: resume inside a warmup phase, stage reuse."""

import json

import torch
from safetensors.torch import load_file

from indistill.cli import main
from indistill.engine import Engine

ARGS = [
    "data.name=digits", "data.train_subset=300", "data.test_subset=100", "progress=false", "device=cpu",
    "teacher.name=cnn32", "student.name=cnn32_small", "teacher.train.epochs=1", "warmup.phase_epochs=[1, 2, 2]",
    "warmup.epochs=6", "kd.train.epochs=1", "kd.method=kd", "evaluate.protocols=[standard]",
    "evaluate.metrics=[cosine]", "name=r",
]


def test_killed_inside_a_warmup_phase_resumes_exactly(tmp_path, monkeypatch, capsys):
    assert main(["run", *ARGS, f"out_dir={tmp_path / 'full'}"]) == 0

    real_epoch = Engine._epoch
    state = {"fired": False}

    def dying_epoch(self, stage, epoch, opt, scaler):
        # the second epoch of the stage2 phase (epochs 1-2): a kill in the middle of a phase
        if stage.name.endswith(".warmup") and epoch == 2 and not state["fired"]:
            state["fired"] = True
            raise KeyboardInterrupt
        return real_epoch(self, stage, epoch, opt, scaler)

    monkeypatch.setattr(Engine, "_epoch", dying_epoch)
    assert main(["run", *ARGS, f"out_dir={tmp_path / 'cut'}"]) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err
    run = tmp_path / "cut" / "r"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows if r["stage"] == "student.warmup"] == ["stage1:mse", "stage2:mse"]
    assert main(["run", *ARGS, f"out_dir={tmp_path / 'cut'}"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows if r["stage"] == "student.warmup"] == [
        "stage1:mse", "stage2:mse", "stage2:mse", "stage3:mse", "stage3:mse", "embedding:pkt"]
    a = load_file(str(tmp_path / "full" / "r" / "export" / "student.safetensors"))
    b = load_file(str(run / "export" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
