"""``student.checkpoint``: every arm of ``indistill run`` starts from its weights (it used to be ignored), and
``indistill validate`` / ``run`` refuse one that does not load with a one-line error; real tiny models on the
embedded digits data."""

import pytest
import torch

from indistill.checkpoint import classifier_path
from indistill.cli import main
from indistill.config import load_config
from indistill.engine import Engine
from indistill.errors import UserError
from indistill.models import create_model
from indistill.pipeline import Pipeline

FAST = ["data.name=digits", "data.train_subset=120", "data.test_subset=40", "device=cpu", "progress=false",
        "precision=fp32", "teacher.name=cnn32", "student.name=cnn32_small", "teacher.train.epochs=1",
        "student.train.epochs=1", "evaluate.protocols=[standard]", "evaluate.metrics=[cosine]",
        "evaluate.latency_repeats=1", "evaluate.sources=false",
        "arms=[{name: a_ce, warmup: none, method: ce}, {name: b_pkt, warmup: none, method: pkt}]"]


def _student_checkpoint(path, num_classes: int = 10):
    """A cnn32_small whose weights no seed of the pipeline draws: all constants, one per tensor."""
    model = create_model("cnn32_small", num_classes=num_classes, in_channels=1)
    with torch.no_grad():
        for i, t in enumerate(model.state_dict().values()):
            if t.is_floating_point():
                t.fill_(0.01 * (i + 1))
    torch.save({"model": model.state_dict()}, path)
    return path, model.state_dict()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_every_arm_of_run_starts_from_the_student_checkpoint(tmp_path, capsys, monkeypatch):
    ckpt, want = _student_checkpoint(tmp_path / "student.pt")
    started: dict[str, dict] = {}
    fit = Engine.fit

    def recording_fit(self, stage, *args, **kwargs):
        started[stage.name] = {k: v.detach().clone() for k, v in stage.model.state_dict().items()}
        return fit(self, stage, *args, **kwargs)

    monkeypatch.setattr(Engine, "fit", recording_fit)
    code = main(["run", "--defaults", *FAST, f"out_dir={tmp_path / 'runs'}", "name=r", f"student.checkpoint={ckpt}"])
    assert code == 0, capsys.readouterr().err
    assert set(started) == {"teacher", "a_ce", "b_pkt"}
    assert _equal(started["a_ce"], want) and _equal(started["b_pkt"], want)
    # the file's weights, not a seeded init that happens to be shared by the arms
    seeded = Pipeline(load_config(None, [*FAST, f"out_dir={tmp_path / 'other'}"])).seeded_model(
        load_config(None, FAST).student).state_dict()
    assert not _equal(seeded, want)


def test_reset_head_keeps_the_seeded_classifier(tmp_path):
    ckpt, want = _student_checkpoint(tmp_path / "three.pt", num_classes=3)
    cfg = load_config(None, [*FAST, f"out_dir={tmp_path}", f"student.checkpoint={ckpt}", "student.reset_head=true"])
    p = Pipeline(cfg)
    student, seeded = p.initial_student().state_dict(), p.seeded_model(cfg.student).state_dict()
    head = {k for k in student if k.startswith(f"{classifier_path(p.seeded_model(cfg.student))}.")}
    assert head and all(torch.equal(student[k], seeded[k]) for k in head)
    assert all(torch.equal(student[k], want[k]) for k in student if k not in head)


def _bad_checkpoints(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 not a checkpoint")
    other = tmp_path / "teacher_weights.pt"  # a cnn32: its keys and shapes are not the student's
    torch.save(create_model("cnn32", num_classes=10, in_channels=1).state_dict(), other)
    return {"corrupt": (corrupt, "corrupt"), "mismatch": (other, "does not fit")}


@pytest.mark.parametrize("command", ["run", "validate"])
@pytest.mark.parametrize("kind", ["corrupt", "mismatch"])
def test_a_student_checkpoint_that_does_not_load_is_a_one_line_error(tmp_path, capsys, command, kind):
    path, words = _bad_checkpoints(tmp_path)[kind]
    opts = ["--defaults"] if command == "run" else []
    code = main([command, *opts, *FAST, f"out_dir={tmp_path / 'runs'}", f"student.checkpoint={path}"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: student.checkpoint: "), err
    assert "Traceback" not in err and path.name in lines[0] and words in lines[0]
    assert "unset student.checkpoint" in lines[0]  # the way out
    assert not (tmp_path / "runs").exists()  # refused before the run directory is claimed


def test_initial_student_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    path, _ = _bad_checkpoints(tmp_path)["mismatch"]
    p = Pipeline(load_config(None, [*FAST, f"out_dir={tmp_path}", f"student.checkpoint={path}"]))
    with pytest.raises(UserError, match="student.checkpoint: .*teacher_weights.pt.*does not fit"):
        p.initial_student()


def test_validate_accepts_a_good_student_checkpoint_without_warning(tmp_path, capsys):
    ckpt, _ = _student_checkpoint(tmp_path / "student.pt")
    code = main(["validate", *FAST, f"out_dir={tmp_path / 'runs'}", f"student.checkpoint={ckpt}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "ok: config is valid" in out.out and "warning" not in out.err
