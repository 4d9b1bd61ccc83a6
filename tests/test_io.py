"""File output: byte-reproducible safetensors exports and atomic text/JSON writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from indistill import checkpoint
from indistill.checkpoint import atomic_write_json, atomic_write_text, export_safetensors, load_weights
from indistill.errors import UserError

SRC = str(Path(checkpoint.__file__).resolve().parents[1])

# Many metadata keys: with an unordered map, two writes agree on their order with probability 1/9!.
METADATA = {k: f"value-{k}" for k in ("model", "arm", "warmup", "method", "seed", "data", "epochs", "zeta", "alpha")}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    m.register_buffer("bf16", torch.randn(3).to(torch.bfloat16))
    m.register_buffer("mask", torch.tensor([True, False]))
    return m


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- safetensors export


def test_export_is_byte_identical_within_a_process(tmp_path):
    m = _model()
    a = export_safetensors(m, tmp_path / "a.safetensors", metadata=METADATA).read_bytes()
    b = export_safetensors(m, tmp_path / "b.safetensors", metadata=dict(reversed(list(METADATA.items())))).read_bytes()
    assert a == b


def test_export_is_byte_identical_across_processes(tmp_path):
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); from tests.test_io import _model, METADATA; "
        "from indistill.checkpoint import export_safetensors; export_safetensors(_model(), sys.argv[2], METADATA)"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, root])}
    for name in ("p1.safetensors", "p2.safetensors"):
        subprocess.run([sys.executable, "-c", script, root, str(tmp_path / name)], check=True, env=env, timeout=300)
    assert (tmp_path / "p1.safetensors").read_bytes() == (tmp_path / "p2.safetensors").read_bytes()


def test_export_reads_back_with_safetensors_and_load_weights(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    m = _model(1)
    path = export_safetensors(m, tmp_path / "sub" / "m.safetensors", metadata=METADATA)
    state, ref = load_file(str(path)), m.state_dict()
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["indistill"]) == METADATA
    fresh = _model(2)
    assert not torch.equal(fresh[0].weight, m[0].weight)
    load_weights(fresh, path)
    assert torch.equal(fresh[0].weight, m[0].weight)
    assert _files(path.parent) == ["m.safetensors"]  # no temp file left behind


def test_export_differs_when_weights_differ(tmp_path):
    a = export_safetensors(_model(0), tmp_path / "a.safetensors").read_bytes()
    b = export_safetensors(_model(1), tmp_path / "b.safetensors").read_bytes()
    assert a != b


def test_atomic_write_text_and_json_write_and_replace(tmp_path):
    p = atomic_write_text(tmp_path / "new" / "a.yaml", "x: 1\n")
    assert p.read_text() == "x: 1\n"
    atomic_write_text(p, "x: 2\n")
    assert p.read_text() == "x: 2\n"
    j = atomic_write_json(tmp_path / "r.json", {"b": 1, "a": [1.5, "é"]})
    assert json.loads(j.read_text()) == {"b": 1, "a": [1.5, "é"]} and j.read_text().endswith("\n")
    assert list(json.loads(j.read_text())) == ["b", "a"]  # insertion order kept unless sort_keys
    atomic_write_json(j, {"p": Path("/x")}, default=str)
    assert json.loads(j.read_text()) == {"p": "/x"}
    assert _files(tmp_path) == ["new", "r.json"]


def test_atomic_write_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        p = atomic_write_text(tmp_path / "m.txt", "x")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o640  # mkstemp alone would give 0600


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
@pytest.mark.parametrize("writer", ["text", "json"])
def test_failure_mid_write_leaves_the_old_file_intact(tmp_path, monkeypatch, fail_at, writer):
    target = tmp_path / "results.json"
    target.write_text('{"old": true}\n')

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, fail_at, boom)
    with pytest.raises(OSError, match="No space"):
        if writer == "text":
            atomic_write_text(target, '{"new": true}\n' * 1000)
        else:
            atomic_write_json(target, {"new": list(range(1000))})
    assert target.read_text() == '{"old": true}\n'
    assert _files(tmp_path) == ["results.json"]  # the temp file is cleaned up


def test_unserialisable_json_leaves_the_old_file_intact(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "old" and _files(tmp_path) == ["r.json"]


def test_crash_before_rename_leaves_the_old_file_intact(tmp_path):
    """A process killed after writing the new bytes but before the rename: the old file survives."""
    target = tmp_path / "config.yaml"
    target.write_text("old: 1\n")
    script = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); from indistill import checkpoint; "
        "checkpoint.os.replace = lambda *a: os._exit(9); "
        "checkpoint.atomic_write_text(sys.argv[2], 'new: 2\\n' * 100000)"
    )
    r = subprocess.run([sys.executable, "-c", script, SRC, str(target)], timeout=300)
    assert r.returncode == 9
    assert target.read_text() == "old: 1\n"
