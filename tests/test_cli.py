"""End-to-end CLI tests on real (embedded) digits data, and the one-line error contract."""

import json
import subprocess
import sys

import pytest
import torch

from indistill.cli import main
from indistill.models import create_model

from .conftest import require_fashion_mnist

FAST_RUN = [
    "teacher.train.epochs=3", "warmup.a=0", "warmup.embedding_epochs=1", "student.train.epochs=9",
    "data.train_subset=400", "data.test_subset=200", "progress=false", "device=cpu",
]


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_pipeline_writes_everything_and_resumes(tmp_path, capsys):
    args = ["run", "configs/demo_digits.yaml", f"out_dir={tmp_path}", *FAST_RUN]
    code, out, _ = _run(args, capsys)
    assert code == 0
    run = tmp_path / "demo_digits"
    res = json.loads((run / "results.json").read_text())
    assert set(res["models"]) == {"teacher", "student_ce", "student_pkt", "student_indistill_pkt"}
    for name, r in res["models"].items():
        assert 0 <= r["top1"] <= 100
        for metric in ("cosine", "euclidean"):
            for proto in ("standard", "reference"):
                assert 0 < r[f"retrieval/{metric}/{proto}/map"] <= 1
    assert res["models"]["teacher"]["top1"] > 50  # 3 epochs on 400 digits already learn something
    assert "| student_indistill_pkt |" in out and (run / "results.md").is_file()
    assert (run / "plots" / "pr_curves.png").is_file()
    assert (run / "config.yaml").is_file() and (run / "log.txt").is_file()
    # the curriculum ran its phases in order, one loss per epoch, with the right lengths, then the KD method
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    arm = [r for r in rows if r["stage"] == "student_indistill_pkt"]
    warm = [r for r in arm if r["phase"].startswith("warmup:")]
    assert [r["phase"] for r in warm] == ["warmup:stage1:mse"] + ["warmup:stage2:mse"] * 2 + \
        ["warmup:stage3:mse"] * 3 + ["warmup:embedding:pkt"]
    for r in warm:
        terms = [k for k in r if k.startswith("loss/")]
        tap, loss = r["phase"].split(":")[1:]
        assert terms == [f"loss/{'mse' if loss == 'mse' else 'pkt'}/{tap}", "loss"] or terms == ["loss/" + f"{'mse' if loss == 'mse' else 'pkt'}/{tap}"]
    # one budget: every arm trains student.train.epochs
    assert [sum(r["stage"] == a for r in rows) for a in ("student_ce", "student_pkt", "student_indistill_pkt")] == [9] * 3
    assert [r["phase"] for r in arm[7:]] == ["kd:pkt"] * 2
    # exported students load back into the zoo model
    from safetensors.torch import load_file

    student = create_model("cnn32_small", 10, 1)
    student.load_state_dict(load_file(str(run / "export" / "student_indistill_pkt.safetensors")))
    prune = json.loads((run / "prune_student_indistill_pkt.json").read_text())
    assert [len(v) for v in prune["kept"].values()] == [8, 16, 32]
    # re-running the same command trains nothing again
    n = len(rows)
    code, _, _ = _run(args, capsys)
    assert code == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == n
    # a different config in the same run directory is refused, nothing is overwritten
    before = (run / "config.yaml").read_text()
    code, _, err = _run([*args, "student.train.optimizer.lr=0.01"], capsys)
    assert code == 2 and "different config" in err and "student" in err
    assert (run / "config.yaml").read_text() == before


def test_train_digits_then_evaluate(tmp_path, capsys):
    code, out, _ = _run(["train", "model.name=cnn32_small", "data.name=digits", "train.epochs=10",
                         f"out_dir={tmp_path}", "name=t", "progress=false", "evaluate.protocols=[standard]"], capsys)
    assert code == 0
    res = json.loads((tmp_path / "t" / "results.json").read_text())
    assert res["models"]["model"]["top1"] >= 90.0
    ckpt = tmp_path / "t" / "checkpoints" / "model.pt"
    code, out, _ = _run(["evaluate", str(ckpt), "evaluate.protocols=[standard]"], capsys)  # no model.name needed
    assert code == 0
    ev = json.loads((tmp_path / "t" / "eval" / "model" / "results.json").read_text())
    assert ev["models"]["model"]["top1"] == pytest.approx(res["models"]["model"]["top1"])


@pytest.mark.realdata
def test_train_fashion_mnist_subset(tmp_path, capsys):
    require_fashion_mnist()
    code, _, _ = _run(["train", "model.name=cnn32_small", "data.name=fashion_mnist", "data.train_subset=6000",
                       "data.test_subset=1000", "train.epochs=2", f"out_dir={tmp_path}", "name=f",
                       "progress=false", "evaluate.protocols=[standard]"], capsys)
    assert code == 0
    res = json.loads((tmp_path / "f" / "results.json").read_text())
    assert res["models"]["model"]["top1"] > 70.0
    assert res["models"]["model"]["num_database"] == 6000


@pytest.mark.slow
@pytest.mark.realdata
def test_train_fashion_mnist_full_reaches_88_percent_in_10_epochs(tmp_path, capsys):
    """The foundation's accuracy bar: cnn32_small on all of Fashion-MNIST, 10 epochs, the defaults."""
    require_fashion_mnist()
    code, _, _ = _run(["train", "model.name=cnn32_small", "data.name=fashion_mnist", "train.epochs=10",
                       f"out_dir={tmp_path}", "name=f", "progress=false", "evaluate.protocols=[standard]"], capsys)
    assert code == 0
    res = json.loads((tmp_path / "f" / "results.json").read_text())["models"]["model"]
    assert res["num_test"] == 10000 and res["num_database"] == 60000
    assert res["top1"] >= 88.0


def test_prune_and_listing_commands(tmp_path, capsys):
    code, out, _ = _run(["prune", "teacher.name=cnn32", "student.name=cnn32_small", f"out_dir={tmp_path}",
                         f"--out={tmp_path / 'prune.json'}"], capsys)
    assert code == 0 and "kept[stage3]" in out
    kept = json.loads((tmp_path / "prune.json").read_text())["kept"]
    assert {k: len(v) for k, v in kept.items()} == {"stage1": 8, "stage2": 16, "stage3": 32}
    code, out, _ = _run(["methods"], capsys)
    for m in ("kd", "fitnet", "at", "sp", "rkd", "pkt", "nst", "vid", "crd", "dkd"):
        assert any(line.startswith(m + " ") for line in out.splitlines()), m
    code, out, _ = _run(["models"], capsys)
    assert code == 0 and "mobilenetv2_cifar  (also: MobileNetV2, mobile_half)" in out.splitlines()
    assert "resnet20" in out.splitlines()  # no aliases: the bare name
    code, out, _ = _run(["layers", "resnet20"], capsys)
    assert "layer3.2.conv2" in out and "embedding: fc:in" in out


@pytest.mark.parametrize(
    "args, words",
    [
        (["run", "configs/demo_digits.yaml", "kd.metod=dkd"], ["metod", "method"]),
        (["prune", "teacher.name=cnn32_small", "student.name=cnn32"], ["narrower", "stage1", "(16, 15, 15)"]),
        (["run", "--defaults", "teacher.taps={stage1: block9}"], ["block9", "block1"]),
        (["train", "data.name=cifar10", "data.root=/nonexistent"], ["cifar", "download"]),
        (["train", "model.name=resnet21"], ["resnet21", "resnet20"]),
        (["run", "configs/demo_digits.yaml", "kd.method=dkdd"], ["dkdd", "dkd"]),
        (["run", "configs/demo_digits.yaml", "kd.params={dkd: {betaa: 2}}", "arms=[{name: d, method: dkd}]"], ["betaa"]),
        (["run", "configs/demo_digits.yaml", "warmup=none"], ["shadowed", "student_ce", "student_indistill_pkt"]),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, words):
    code, _, err = _run([*args, f"out_dir={tmp_path}", "progress=false", *FAST_RUN[:1]], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_corrupt_teacher_checkpoint_subprocess(tmp_path):
    bad = tmp_path / "teacher.pt"
    bad.write_bytes(b"not a checkpoint")
    p = subprocess.run(
        [sys.executable, "-m", "indistill", "run", "configs/demo_digits.yaml", f"teacher.checkpoint={bad}",
         f"out_dir={tmp_path}", "progress=false"],
        capture_output=True, text=True,
    )
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: checkpoint")
    assert "corrupt" in p.stderr


def test_every_method_with_and_without_warmup(tmp_path, capsys):
    """Each KD method trains a tiny pair on digits after the InDistill warmup and from scratch, without NaN."""
    code = main(["run", "configs/methods_digits.yaml", f"out_dir={tmp_path}", "progress=false", "device=cpu",
                 "data.train_subset=200", "data.test_subset=100", "teacher.train.epochs=1",
                 "warmup.phase_epochs=[1, 1, 1]", "student.train.epochs=4"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "methods_digits" / "results.json").read_text())["models"]
    methods = ["kd", "fitnet", "at", "sp", "rkd", "pkt", "nst", "vid", "crd", "dkd"]
    assert set(res) == {"teacher", *methods, *(f"indistill_{m}" for m in methods)}
    for name, r in res.items():
        assert 0 <= r["top1"] <= 100 and 0 < r["retrieval/cosine/standard/map"] <= 1, name
    rows = [json.loads(x) for x in (tmp_path / "methods_digits" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["loss"] == r["loss"], r  # not NaN
    assert [r["phase"] for r in rows if r["stage"] == "indistill_crd"] == [
        "warmup:stage1:mse", "warmup:stage2:mse", "warmup:stage3:mse", "kd:crd"]
    assert sum(r["stage"] == "crd" for r in rows) == 4  # one budget for every arm
