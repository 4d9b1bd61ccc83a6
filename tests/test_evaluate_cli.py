"""`indistill evaluate`: a key=value after the target is an override (never the CONFIG), and a run
directory gets one table."""

import json
import shutil

import pytest

from indistill.cli import main

FAST = ["data.name=digits", "data.train_subset=200", "data.test_subset=60", "progress=false", "device=cpu",
        "evaluate.protocols=[standard]", "evaluate.metrics=[cosine]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A cnn32 (not the default model, cnn32_small) trained for one epoch: its checkpoint records its architecture."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "model.name=cnn32", "train.epochs=1", *FAST, f"out_dir={out}", "name=t"]) == 0
    return out / "t"


def test_an_override_after_the_checkpoint_is_not_the_config(trained, capsys):
    capsys.readouterr()
    ckpt = trained / "checkpoints" / "model.pt"
    # before: `data.test_subset=50` became the CONFIG, so the default cnn32_small was built and the cnn32 refused
    code = main(["evaluate", str(ckpt), "data.test_subset=50", "evaluate.protocols=[standard]"])
    out, err = capsys.readouterr()
    assert code == 0, err
    ev = json.loads((trained / "eval" / "model" / "results.json").read_text())
    assert ev["models"]["model"]["model"] == "cnn32"
    assert ev["models"]["model"]["num_test"] == 50  # the override took effect
    assert ev["command"] == f"indistill evaluate {ckpt} data.test_subset=50 evaluate.protocols=[standard]"
    assert "Training curves" not in out  # an evaluation trains nothing: no empty curves line


def test_a_config_file_is_still_the_config(trained, tmp_path, capsys):
    cfg = tmp_path / "model=cnn32.yaml"  # an existing file is the CONFIG, even with '=' in its name
    cfg.write_text("model: {name: cnn32}\ndata: {name: digits, test_subset: 40}\nevaluate: {protocols: [standard]}\n")
    code = main(["evaluate", str(trained / "checkpoints" / "model.pt"), str(cfg)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((trained / "eval" / "model" / "results.json").read_text())["models"]["model"]["num_test"] == 40


def test_a_run_directory_prints_one_table(trained, capsys):
    shutil.copy(trained / "checkpoints" / "model.pt", trained / "checkpoints" / "copy.pt")
    try:
        capsys.readouterr()
        code = main(["evaluate", str(trained), "data.test_subset=50", "evaluate.protocols=[standard]"])
        out, err = capsys.readouterr()
    finally:
        (trained / "checkpoints" / "copy.pt").unlink()
    assert code == 0, err
    results, deployment = out.split("## Deployment")  # the deployment view follows the one results table
    assert results.count("| model | role |") == 1  # one table (one protocol), not one report per checkpoint
    rows = [ln for ln in results.splitlines() if ln.startswith("| copy |") or ln.startswith("| model |")]
    assert len(rows) == 3  # header + the two checkpoints
    assert sum(ln.startswith("| copy |") for ln in deployment.splitlines()) == 1
    assert out.count("# Evaluation:") == 1 and "# Results:" not in out
    assert "Training curves" not in out
    for name in ("model", "copy"):  # each checkpoint still gets its own report
        md = (trained / "eval" / name / "results.md").read_text()
        assert "Training curves" not in md
