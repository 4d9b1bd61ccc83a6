"""The library calls the commands are thin over (issue 20): train one model, load a trained run, build an
arm's warmup and stage, evaluate a checkpoint from its metadata, prune and pair reports; real tiny models on
the embedded digits data."""

import json
import shutil

import pytest
import torch

from indistill.api import (
    arm_summaries, evaluate_checkpoint, evaluate_target, evaluation_summary, load_checkpoint_model, load_run,
    load_source, pair_report, prune_report,
)
from indistill.config import ArmSpec, load_config, resolve_arms
from indistill.errors import UserError
from indistill.pipeline import Pipeline, load_data, source_spec
from indistill.warmup import InDistillWarmup

FAST = ["data.name=digits", "data.train_subset=200", "data.test_subset=60", "progress=false", "device=cpu",
        "precision=fp32", "evaluate.protocols=[standard]", "evaluate.metrics=[cosine]", "evaluate.latency_repeats=1",
        "teacher.name=cnn32", "student.name=cnn32_small"]


def _cfg(tmp_path, *extra):
    return load_config(None, [*FAST, f"out_dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``Pipeline.train_model``: a cnn32 trained one epoch; its checkpoint records its architecture."""
    cfg = _cfg(tmp_path_factory.mktemp("runs"), "model.name=cnn32", "train.epochs=1", "name=t")
    model, results = Pipeline(cfg).train_model(command="test")
    return cfg, model, results


def test_train_model_trains_evaluates_and_reports(trained):
    cfg, model, results = trained
    assert model.checkpoint == cfg.run_dir / "checkpoints" / "model.pt" and model.checkpoint.is_file()
    assert results["model"]["model"] == "cnn32" and results["model"]["role"] == "model"
    assert json.loads((cfg.run_dir / "results.json").read_text())["command"] == "test"


def test_a_checkpoint_is_rebuilt_from_its_metadata_without_changing_the_config(trained, tmp_path):
    ckpt = trained[1].checkpoint
    cfg = load_config(None, ["data.name=fashion_mnist", "data.root=/nowhere", "model.name=resnet20"])
    loaded = load_checkpoint_model(ckpt, cfg)
    assert loaded.spec.name == "cnn32" and loaded.data.name == "digits" and loaded.meta["role"] == "model"
    assert cfg.data.name == "fashion_mnist" and loaded.cfg.data.name == "digits"  # the caller's config is untouched
    # without metadata, the config must name the model
    bare = tmp_path / "bare.pt"
    torch.save(loaded.model.state_dict(), bare)
    with pytest.raises(UserError, match="does not record its architecture"):
        load_checkpoint_model(bare, cfg)
    assert load_checkpoint_model(bare, _cfg(tmp_path, "model.name=cnn32"), model_from_config=True).spec.name == "cnn32"


def test_evaluate_checkpoint_and_run_directory(trained):
    cfg, model, results = trained
    ev = evaluate_checkpoint(model.checkpoint, _cfg(cfg.out_dir), command="indistill evaluate x")
    assert ev.name == "model" and ev.out_dir == cfg.run_dir / "eval" / "model"
    on_disk = json.loads((ev.out_dir / "results.json").read_text())
    assert on_disk["command"] == "indistill evaluate x" and on_disk["models"]["model"]["model"] == "cnn32"
    assert ev.results["top1"] == pytest.approx(results["model"]["top1"])  # same model, same test split
    shutil.copy(model.checkpoint, cfg.run_dir / "checkpoints" / "copy.pt")
    try:
        evaluated = evaluate_target(cfg.run_dir, _cfg(cfg.out_dir), command="c")
    finally:
        (cfg.run_dir / "checkpoints" / "copy.pt").unlink()
    assert [e.name for e in evaluated] == ["copy", "model"]
    text = evaluation_summary(cfg.run_dir, evaluated, "c")
    assert text.startswith(f"# Evaluation: {cfg.run_dir} (2 checkpoints)") and "## Deployment" in text
    assert text.splitlines()[-1].endswith("for copy, model")


def test_source_prune_report_and_load_run(trained, tmp_path):
    cfg = _cfg(tmp_path, "name=p")
    data = load_data(cfg)
    assert source_spec(cfg).role == "teacher" and source_spec(cfg).stage == "teacher"
    source = load_source(cfg, data)
    assert not source.trained and source.describe().startswith("note: no trained teacher yet")
    report = prune_report(cfg, source)
    assert {k: len(v) for k, v in report.record()["kept"].items()} == {"stage1": 8, "stage2": 16, "stage3": 32}
    assert report.record()["source"] == "teacher" and report.record()["trained"] is False
    assert "kept[stage3]" in report.text() and report.text().splitlines()[-1].startswith("schedule: ")
    assert load_run(cfg, data) == {}
    (cfg.run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(trained[1].checkpoint, cfg.run_dir / "checkpoints" / "teacher.pt")  # a cnn32 on digits
    source = load_source(cfg, data)
    assert source.trained and source.describe() == f"pruning the trained teacher: {source.checkpoint}"
    run = load_run(cfg, data)
    assert list(run) == ["teacher"] and run["teacher"].role == "teacher" and not run["teacher"].model.training
    want = trained[1].model.state_dict()
    assert all(torch.equal(v.cpu(), want[k].cpu()) for k, v in run["teacher"].model.state_dict().items())


def test_pipeline_builds_seeded_models_warmups_and_arm_stages(tmp_path):
    cfg = _cfg(tmp_path, "warmup.a=0", "warmup.embedding_epochs=1", "student.train.epochs=10")
    p = Pipeline(cfg)
    teacher, student = p.seeded_model(cfg.teacher), p.seeded_model(cfg.student)
    again = p.seeded_model(cfg.student)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))
    assert p.warmup_for(ArmSpec(name="ce", warmup="none", method="ce"), teacher, student) is None
    warm = p.warmup_for(ArmSpec(name="w", warmup="indistill", method="pkt"), teacher, student)
    assert isinstance(warm, InDistillWarmup) and warm.epochs >= 1
    stage = p.arm(ArmSpec(name="w", warmup="indistill", method="pkt", params={}), teacher, student)
    try:
        assert stage.warmup is not None and stage.warmup.epochs == warm.epochs
        assert stage.pairs is not None and stage.pairs.student_taps == ["stage1", "stage2", "stage3"]
    finally:
        stage.close()
    plain = p.arm(ArmSpec(name="ce", warmup="none", method="ce", params={}), teacher, student)
    assert plain.warmup is None and plain.pairs is None  # declared on every Stage, never probed for
    plain.close()
    # without student.checkpoint, every arm starts from the seeded student
    first = p.initial_student()
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), student.state_dict().values()))
    # the seeded builders do not shadow the module-level build_model / warmup.build_warmup
    assert not hasattr(Pipeline, "build_model") and not hasattr(Pipeline, "build_warmup")


def test_pair_report_and_arm_summaries(tmp_path):
    cfg = _cfg(tmp_path, "warmup.taps=[stage2]")
    report = pair_report(cfg)
    text = report.text()
    assert text.startswith("# Stage pairs: teacher cnn32 -> student cnn32_small (digits, inputs 1 x 32 x 32)")
    assert "To pin this pairing" in text and text.endswith("The warmup distils stage2 (warmup.taps: ['stage2']).")
    report.check()
    lines = arm_summaries(cfg)
    assert len(lines) == len(resolve_arms(cfg)) and all("source teacher" in ln for ln in lines)
    aux = arm_summaries(_cfg(tmp_path, "auxiliary.enabled=true"))
    assert all("source auxiliary" in ln for ln in aux)
