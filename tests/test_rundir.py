"""A finished run is never damaged: the lock, moved run directories, the evaluation cache, the loss guard."""

import json
import shutil
import subprocess
import sys

import torch

from indistill.cli import main
from indistill.rundir import RunDir

TINY = ["data.name=digits", "data.train_subset=200", "data.test_subset=100", "progress=false", "device=cpu",
        "teacher.train.epochs=1", "student.train.epochs=2", "warmup=none", "kd.method=kd",
        "evaluate.protocols=[standard]", "evaluate.metrics=[cosine]", "name=r"]


def test_a_run_directory_in_use_is_refused(tmp_path, capsys):
    held = RunDir(tmp_path / "r")
    held.lock()
    try:
        assert main(["run", "--defaults", *TINY, f"out_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by pid" in err[0]
    finally:
        held.unlock()
    assert main(["run", "--defaults", *TINY, f"out_dir={tmp_path}"]) == 0


def test_a_moved_run_directory_resumes_without_retraining(tmp_path):
    assert main(["run", "--defaults", *TINY, f"out_dir={tmp_path / 'a'}"]) == 0
    shutil.move(str(tmp_path / "a" / "r"), str(tmp_path / "b"))
    (tmp_path / "b").rename(tmp_path / "r")  # out_dir tmp_path, name r: somewhere else entirely
    rows = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert main(["run", "--defaults", *TINY, f"out_dir={tmp_path}"]) == 0
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == rows


def test_the_evaluation_cache_is_keyed_by_the_checkpoint(tmp_path):
    assert main(["run", "--defaults", *TINY, f"out_dir={tmp_path}"]) == 0
    run = tmp_path / "r"
    first = json.loads((run / "results.json").read_text())["models"]["student"]
    # another checkpoint under the same name: the cached result must not be reused for it
    ck = torch.load(run / "checkpoints" / "student.pt", weights_only=True)
    ck["model"] = {k: (torch.zeros_like(v) if v.is_floating_point() else v) for k, v in ck["model"].items()}
    torch.save(ck, run / "checkpoints" / "student.pt")
    assert main(["run", "--defaults", *TINY, f"out_dir={tmp_path}"]) == 0
    second = json.loads((run / "results.json").read_text())["models"]["student"]
    key = "retrieval/cosine/standard/map"
    assert second[key] != first[key]
    cached = json.loads((run / "eval" / "student.json").read_text())
    assert cached["result"][key] == second[key] and len(cached["key"]["checkpoint_sha256"]) == 64


def test_an_exploding_loss_stops_with_one_line_and_keeps_the_last_good_epoch(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "indistill", "train", "model.name=cnn32_small", "data.name=digits",
         "train.epochs=6", "train.optimizer.lr=1e6", "train.scheduler.name=none", f"out_dir={tmp_path}", "name=x",
         "progress=false", "loss_guard=100"],
        capture_output=True, text=True,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("exploded" in last or "loss is nan" in last.lower() or "inf" in last)
    assert not (tmp_path / "x" / "checkpoints" / "model.pt").exists()  # never reported as trained


def test_layers_into_a_closed_pipe_is_quiet():
    p = subprocess.run(f"{sys.executable} -m indistill layers resnet110 | head -1", shell=True,
                       capture_output=True, text=True)
    assert p.stdout.strip() == "taps:" and "BrokenPipe" not in p.stderr and "Traceback" not in p.stderr
