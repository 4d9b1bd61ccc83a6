"""`indistill export`: safetensors, TorchScript and ONNX (checked with onnxruntime) of a trained model, and the
README's plain-PyTorch loading lines, run exactly as shown."""

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from indistill.cli import main
from indistill.export import model_from_checkpoint
from indistill.models import create_model

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.name=cnn32_small", "data.name=digits", "train.epochs=1", "data.train_subset=100", "data.test_subset=50",
        "progress=false", "device=cpu", "evaluate.protocols=[standard]", "evaluate.metrics=[cosine]",
        "evaluate.latency_repeats=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`indistill train` on digits, one epoch: runs/t with its checkpoint (which records the model)."""
    root = tmp_path_factory.mktemp("exp")
    assert main(["train", *TINY, f"out_dir={root / 'runs'}", "name=t"]) == 0
    return root


def _reference(run: Path):
    model, meta = model_from_checkpoint(run / "checkpoints" / "model.pt")
    x = torch.randn(5, meta["in_channels"], meta["image_size"], meta["image_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model, x, model(x)


def test_safetensors_and_torchscript_equal_pytorch(trained, capsys):
    run = trained / "runs" / "t"
    assert "## Deployment" in (run / "results.md").read_text()  # `indistill train`'s table has the view too
    _, x, want = _reference(run)
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    assert "model.torchscript.pt  [model, torchscript] (logits within" in capsys.readouterr().out
    got = torch.jit.load(str(run / "export" / "model.torchscript.pt"))(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    out = trained / "m.safetensors"
    assert main(["export", str(run / "checkpoints" / "model.pt"), "--format", "safetensors", "--out", str(out)]) == 0
    fresh = create_model("cnn32_small", 10, 1).eval()
    fresh.load_state_dict(load_file(str(out)))
    torch.testing.assert_close(fresh(x), want, atol=0, rtol=0)


def test_onnx_equals_pytorch_within_1e4(trained, capsys):
    ort = pytest.importorskip("onnxruntime", reason="ONNX export is the optional extra indistill[onnx] (CI installs it)")
    run = trained / "runs" / "t"
    _, x, want = _reference(run)
    assert main(["export", str(run), "--format", "onnx"]) == 0
    session = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])  # batch 5: the batch axis is dynamic
    assert (got - want).abs().max() <= 1e-4


def test_export_errors_are_one_line(trained, tmp_path, capsys):
    run = trained / "runs" / "t"
    cases = [
        ([str(tmp_path / "nope")], "not found; give a run directory or a checkpoint"),
        ([str(tmp_path)], "has no finished checkpoints"),
        ([str(run), "--arm", "teacher"], "has no finished stage 'teacher'; stages: model"),
    ]
    for argv, msg in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err


def test_readme_loads_the_export_in_plain_pytorch(trained, monkeypatch, capsys):
    """The README's ```py block under "Deploy the student", run as shown, after the export commands it shows."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Deploy the student", 1)[1].split("\n### ", 1)[0]
    (code,) = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    assert not re.search(r"^\s*(import|from)\s+indistill", code, flags=re.M)  # plain PyTorch (and onnxruntime)
    pytest.importorskip("onnxruntime", reason="the README's lines read the ONNX export too")
    monkeypatch.chdir(trained)
    assert main(["export", "runs/t", "--format", "torchscript"]) == 0
    assert main(["export", "runs/t", "--format", "onnx"]) == 0
    capsys.readouterr()
    exec(compile(code, "README.md: Deploy the student", "exec"), {"__name__": "readme_export"})
    printed = capsys.readouterr().out.split("\n")
    assert printed[0].startswith("tensor([") and float(printed[1]) <= 1e-4
