"""Pipeline-level behaviour: one budget per arm, exact resume at every boundary, the warmup factory."""

import json

import pytest
import torch
from safetensors.torch import load_file

from indistill.cli import main
from indistill.engine import Engine

BASE = [
    "data.name=digits", "data.train_subset=300", "data.test_subset=100", "progress=false", "device=cpu",
    "teacher.name=cnn32", "student.name=cnn32_small", "teacher.train.epochs=1", "evaluate.protocols=[standard]",
    "evaluate.metrics=[cosine]", "name=r",
]
ARGS = [*BASE, "warmup.phase_epochs=[1, 2, 2]", "warmup.embedding_epochs=1", "student.train.epochs=7", "kd.method=kd"]


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _same_exports(a, b):
    for f in sorted((a / "export").glob("*.safetensors")):
        x, y = load_file(str(f)), load_file(str(b / "export" / f.name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f.name


def test_killed_inside_a_warmup_phase_resumes_exactly(tmp_path, monkeypatch, capsys):
    assert main(["run", *ARGS, f"out_dir={tmp_path / 'full'}"]) == 0

    real_epoch = Engine.run_epoch
    state = {"fired": False}

    def dying_epoch(self, stage, epoch, st, split=None):
        # the second epoch of the stage2 phase (epochs 1-2): a kill in the middle of a phase
        if stage.name == "student" and epoch == 2 and not state["fired"]:
            state["fired"] = True
            raise KeyboardInterrupt
        return real_epoch(self, stage, epoch, st, split)

    monkeypatch.setattr(Engine, "run_epoch", dying_epoch)
    assert main(["run", *ARGS, f"out_dir={tmp_path / 'cut'}"]) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err
    run = tmp_path / "cut" / "r"
    assert [r["phase"] for r in _rows(run) if r["stage"] == "student"] == ["warmup:stage1:mse", "warmup:stage2:mse"]
    assert main(["run", *ARGS, f"out_dir={tmp_path / 'cut'}"]) == 0
    assert [r["phase"] for r in _rows(run) if r["stage"] == "student"] == [
        "warmup:stage1:mse", "warmup:stage2:mse", "warmup:stage2:mse", "warmup:stage3:mse", "warmup:stage3:mse",
        "warmup:embedding:pkt", "kd:kd"]
    _same_exports(tmp_path / "full" / "r", run)


def test_arms_with_and_without_warmup_share_one_budget_and_schedule(tmp_path):
    """Both arms: the same number of student epochs under the same per-epoch learning rate."""
    arms = "arms=[{name: kd, warmup: none, method: kd}, {name: indistill_kd, warmup: indistill, method: kd}]"
    assert main(["run", *BASE, "warmup.a=0", "student.train.epochs=8", "student.train.optimizer.lr=0.002",
                 "student.train.scheduler={name: multistep, milestones: [6], gamma: 0.1}", arms,
                 f"out_dir={tmp_path}"]) == 0
    rows = _rows(tmp_path / "r")
    plain = [r for r in rows if r["stage"] == "kd"]
    warm = [r for r in rows if r["stage"] == "indistill_kd"]
    assert len(plain) == len(warm) == 8
    assert [r["lr"] for r in plain] == [r["lr"] for r in warm] == pytest.approx([0.002] * 6 + [0.0002] * 2)
    assert [r["phase"] for r in warm] == ["warmup:stage1:mse", "warmup:stage2:mse", "warmup:stage2:mse"] + \
        ["warmup:stage3:mse"] * 3 + ["kd:kd"] * 2
    assert {r["phase"] for r in plain} == {"kd:kd"}
    # the checkpoint knows what it holds, and `indistill evaluate RUN_DIR` needs no model.name
    ck = torch.load(tmp_path / "r" / "checkpoints" / "indistill_kd.pt", weights_only=True)
    assert ck["meta"]["arch"] == "cnn32_small" and ck["meta"]["dataset"] == "digits"
    assert ck["meta"]["warmup_epochs"] == 6 and ck["meta"]["method"] == "kd"
    before = (tmp_path / "r" / "results.json").read_text()
    assert main(["evaluate", str(tmp_path / "r" / "checkpoints" / "kd.pt"), "data.train_subset=300",
                 "data.test_subset=100", "evaluate.protocols=[standard]"]) == 0
    assert (tmp_path / "r" / "results.json").read_text() == before  # the run's own results are untouched
    ev = json.loads((tmp_path / "r" / "eval" / "kd" / "results.json").read_text())["models"]["kd"]
    assert ev["top1"] == pytest.approx(json.loads(before)["models"]["kd"]["top1"])


def test_warmup_longer_than_the_budget_is_an_error(tmp_path, capsys):
    assert main(["run", *BASE, "warmup.a=2", "student.train.epochs=10", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "warmup takes 12 epochs" in err and "student.train.epochs=10" in err
    assert not (tmp_path / "r" / "config.yaml").exists()  # a failed start claims nothing


def test_logit_kd_needs_no_stage_taps(tmp_path, capsys):
    """`Method.uses` drives the taps: plain KD pairs only the logits, so a student without stage taps works."""
    taps = "{embedding: '4:in', logits: '@output'}"
    code = main(["run", *BASE, "student.name=tests.user_models:make_net", f"student.taps={taps}",
                 "student.kwargs={width: 4}", "warmup=none", "kd.method=kd", "student.train.epochs=1",
                 f"out_dir={tmp_path}"])
    assert code == 0, capsys.readouterr().err


def test_prune_command_shows_the_channels_the_run_used(tmp_path, capsys):
    args = [*BASE, "warmup.a=0", "student.train.epochs=6", f"out_dir={tmp_path}"]
    assert main(["prune", *args]) == 0
    assert "UNTRAINED teacher" in capsys.readouterr().out
    assert main(["run", *args]) == 0
    capsys.readouterr()
    assert main(["prune", *args]) == 0
    out = capsys.readouterr().out
    assert "pruning the trained teacher" in out
    shown = json.loads((tmp_path / "r" / "prune.json").read_text())["kept"]
    used = json.loads((tmp_path / "r" / "prune_student.json").read_text())["kept"]
    assert shown == used and {k: len(v) for k, v in used.items()} == {"stage1": 8, "stage2": 16, "stage3": 32}


BOUNDARY_ARMS = ("arms=[{name: fitnet, warmup: indistill, method: fitnet}, {name: vid, warmup: none, method: vid}, "
                 "{name: crd, warmup: indistill, method: crd, params: {nce_k: 64}}]")


@pytest.mark.parametrize("kill", ["teacher", "fitnet", "vid", "fitnet@3", "crd@3"])
def test_kill_at_every_stage_boundary_resumes_bit_identical(tmp_path, monkeypatch, capsys, kill):
    """FitNet's regressor, VID's heads and CRD's embeddings and memory are drawn from (seed, stage), so a
    run killed after any stage (or at an arm's warmup -> KD boundary) re-runs to the same weights."""
    args = [*BASE, "warmup.phase_epochs=[1, 1, 1]", "student.train.epochs=5", BOUNDARY_ARMS]
    assert main(["run", *args, f"out_dir={tmp_path / 'full'}"]) == 0
    stage, _, epoch = kill.partition("@")
    if epoch:  # after the warmup's last epoch is checkpointed, before the first KD epoch
        real = Engine.end_epoch

        def dying(self, st, e, state, row):
            out = real(self, st, e, state, row)
            if st.name == stage and e + 1 == int(epoch):
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(Engine, "end_epoch", dying)
    else:  # after the stage's final checkpoint is written
        real = Engine.finish

        def dying(self, st, summary):
            out = real(self, st, summary)
            if st.name == stage:
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(Engine, "finish", dying)
    assert main(["run", *args, f"out_dir={tmp_path / 'cut'}"]) == 130
    monkeypatch.undo()
    assert main(["run", *args, f"out_dir={tmp_path / 'cut'}"]) == 0
    _same_exports(tmp_path / "full" / "r", tmp_path / "cut" / "r")
    for name in ("fitnet", "vid", "crd"):
        a = torch.load(tmp_path / "full" / "r" / "checkpoints" / f"{name}.pt", weights_only=True)["extra"]
        b = torch.load(tmp_path / "cut" / "r" / "checkpoints" / f"{name}.pt", weights_only=True)["extra"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    full = json.loads((tmp_path / "full" / "r" / "results.json").read_text())["models"]
    cut = json.loads((tmp_path / "cut" / "r" / "results.json").read_text())["models"]
    assert {k: v["top1"] for k, v in full.items()} == {k: v["top1"] for k, v in cut.items()}
