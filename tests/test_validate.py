"""`indistill validate` tells the truth: it loads every checkpoint the config names and warns about
milestones outside a stage's epochs; `indistill run` without a config asks for one."""

import pytest
import torch

from indistill.cli import main
from indistill.config import load_config
from indistill.models import create_model
from indistill.pipeline import schedule_warnings

# digits (64 pixels, 10 classes), untrained, small subsets: validate builds and pushes one batch, no training
FAST = ["data.name=digits", "data.train_subset=100", "data.test_subset=50", "device=cpu", "progress=false",
        "teacher.name=cnn32", "student.name=cnn32_small", "arms=[{name: pkt, warmup: indistill, method: pkt}]"]


def _validate(args, capsys, tmp_path):
    code = main(["validate", *FAST, f"out_dir={tmp_path / 'runs'}", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _save(path, name: str, num_classes: int = 10, wrap: bool = True):
    model = create_model(name, num_classes=num_classes, in_channels=1)
    torch.save({"model": model.state_dict()} if wrap else model.state_dict(), path)
    return path


def _one_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_a_good_teacher_checkpoint_is_valid(tmp_path, capsys):
    ck = _save(tmp_path / "teacher.pt", "cnn32")
    code, out, err = _validate([f"teacher.checkpoint={ck}"], capsys, tmp_path)
    assert code == 0, err
    assert "ok: config is valid" in out and "warning" not in err
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("key", ["teacher", "auxiliary", "student"])
def test_a_corrupt_checkpoint_is_an_error(tmp_path, capsys, key):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"PK\x03\x04 not a checkpoint at all")
    aux = ["auxiliary.enabled=true", "auxiliary.name=cnn32"] if key == "auxiliary" else []
    code, _, err = _validate([*aux, f"{key}.checkpoint={bad}"], capsys, tmp_path)
    _one_error(code, err, "corrupt.pt", "corrupt")


def test_a_missing_checkpoint_is_an_error(tmp_path, capsys):
    code, _, err = _validate([f"teacher.checkpoint={tmp_path / 'nope.pt'}"], capsys, tmp_path)
    _one_error(code, err, "nope.pt", "not found")


def test_a_checkpoint_of_another_architecture_is_an_error(tmp_path, capsys):
    ck = _save(tmp_path / "small.pt", "cnn32_small")  # the student's architecture, given as the teacher
    code, _, err = _validate([f"teacher.checkpoint={ck}"], capsys, tmp_path)
    _one_error(code, err, "small.pt", "does not fit")


def test_a_checkpoint_with_another_class_count_is_an_error(tmp_path, capsys):
    ck = _save(tmp_path / "three.pt", "cnn32", num_classes=3, wrap=False)
    code, _, err = _validate([f"teacher.checkpoint={ck}"], capsys, tmp_path)
    _one_error(code, err, "three.pt", "3-class", "10 classes")


def test_an_auxiliary_checkpoint_of_another_architecture_is_an_error(tmp_path, capsys):
    ck = _save(tmp_path / "aux.pt", "cnn32_small")
    code, _, err = _validate(["auxiliary.enabled=true", "auxiliary.name=cnn32", f"auxiliary.checkpoint={ck}"],
                             capsys, tmp_path)
    _one_error(code, err, "aux.pt", "does not fit")


def test_milestones_beyond_the_epochs_warn(tmp_path, capsys):
    code, out, err = _validate(["student.train.epochs=13", "student.train.scheduler={name: multistep, milestones: [60]}"],
                               capsys, tmp_path)
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1, err
    assert "student.train.scheduler.milestones [60]" in warnings[0] and "epochs=13" in warnings[0]
    assert "never decays" in warnings[0]
    assert "ok: config is valid" in out


def test_schedule_warnings_name_only_what_the_run_trains():
    def notes(*args):
        return schedule_warnings(load_config(None, list(args)))

    assert notes("student.train.epochs=70", "student.train.scheduler={name: multistep, milestones: [60]}") == []
    assert notes("student.train.epochs=13", "student.train.scheduler={name: cosine}") == []
    partial = notes("student.train.epochs=40", "student.train.scheduler={name: multistep, milestones: [30, 60]}")
    assert len(partial) == 1 and "the decay at [60] never happens" in partial[0]
    # a milestone equal to the epochs acts after the last epoch: no effect either
    assert len(notes("teacher.train.epochs=5", "teacher.train.scheduler={name: multistep, milestones: [5]}")) == 1
    # a teacher loaded from a checkpoint does not train: its schedule does not matter
    assert notes("teacher.train.epochs=5", "teacher.train.scheduler={name: multistep, milestones: [9]}",
                 "teacher.checkpoint=t.pt") == []
    aux = notes("auxiliary.enabled=true", "auxiliary.pkt.epochs=4",
                "auxiliary.pkt.scheduler={name: multistep, milestones: [4]}")
    assert len(aux) == 1 and aux[0].startswith("auxiliary.pkt.scheduler.milestones")


def test_run_without_a_config_is_an_error_showing_the_usage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["run"], ["run", "name=x", "data.train_subset=50"]):
        code = main(argv)
        err = capsys.readouterr().err
        line = _one_error(code, err, "no config given", "usage: indistill run CONFIG", "--defaults")
        assert len(line) < 300
    assert list(tmp_path.iterdir()) == []  # no runs/run/ written


def test_run_defaults_with_a_config_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: c\n")
    code = main(["run", "--defaults", str(cfg), f"out_dir={tmp_path}"])
    _one_error(code, capsys.readouterr().err, "--defaults", "c.yaml")
