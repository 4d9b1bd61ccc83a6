"""The student as a deployable artifact: ``indistill export RUN_DIR|CKPT --format safetensors|onnx|torchscript``.

A finished checkpoint records its architecture (``meta``: name, kwargs, taps, class and channel
counts, image size), so the model is rebuilt, its weights loaded (``weights_only=True``) and written as

- ``safetensors``: the state dict (load it into the same architecture: ``load_state_dict``);
- ``onnx``: the graph with a dynamic batch axis (input ``images``, output ``logits``), checked with
  onnxruntime: its logits on a seeded batch equal PyTorch's within ``ATOL`` (``pip install 'indistill[onnx]'``);
- ``torchscript``: ``torch.jit.trace`` of the eval-mode model, reloaded and checked the same way;
  ``torch.jit.load(path)`` runs it in plain PyTorch, with no ``indistill`` import.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .checkpoint import export_safetensors, load_weights, safe_load
from .errors import UserError

__all__ = ["ATOL", "FORMATS", "Exported", "export_model", "export_target", "model_from_checkpoint"]

FORMATS = ("safetensors", "onnx", "torchscript")
SUFFIX = {"safetensors": ".safetensors", "onnx": ".onnx", "torchscript": ".torchscript.pt"}
ATOL = 1e-4  # the largest |logit difference| an export may show against PyTorch on the check batch
CHECK_BATCH = 8


@dataclass
class Exported:
    """One written artifact and how it was checked."""

    name: str
    path: Path
    format: str
    max_abs_diff: float | None  # vs PyTorch on the check batch (None: safetensors holds weights, not a graph)


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a finished checkpoint records (``meta``) and load its weights; eval mode."""
    from .config import ModelSpec
    from .pipeline import build_model

    path = Path(path)
    obj = safe_load(path)
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not meta or "arch" not in meta:
        raise UserError(f"{path} does not record its model (no meta); export a finished checkpoint that indistill "
                        f"wrote (checkpoints/<stage>.pt)")
    spec = ModelSpec(name=meta["arch"], kwargs=dict(meta.get("kwargs") or {}), taps=meta.get("taps") or None)
    data = SimpleNamespace(num_classes=int(meta["num_classes"]), in_channels=int(meta["in_channels"]),
                           image_size=int(meta["image_size"]), name=meta.get("dataset"))
    model = build_model(spec, data)  # type: ignore[arg-type]  (only the class/channel counts and size are read)
    load_weights(model, path)
    return model.eval(), dict(meta)


def _check_batch(meta: dict[str, Any]) -> torch.Tensor:
    # Normalised images are on the N(0, 1) scale; a seeded batch makes the check reproducible.
    g = torch.Generator().manual_seed(0)
    return torch.randn(CHECK_BATCH, int(meta["in_channels"]), int(meta["image_size"]), int(meta["image_size"]),
                       generator=g)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def _onnx(model: nn.Module, x: torch.Tensor, out: Path) -> float:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise UserError("--format onnx needs onnx and onnxruntime: pip install 'indistill[onnx]'") from None
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
            torch.onnx.export(model, (x,), str(tmp), input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
                              opset_version=17)
        onnx.checker.check_model(str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            want = model(x)
        diff = _max_diff(got, want)
        if not diff <= ATOL:
            raise UserError(f"the ONNX export's logits differ from PyTorch's by {diff:.2e} (> {ATOL:g}) on the check "
                            f"batch; an op is exported differently: export torchscript or safetensors instead")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def _torchscript(model: nn.Module, x: torch.Tensor, out: Path) -> float:
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (x,), check_trace=False)
            traced.save(str(tmp))
            got = torch.jit.load(str(tmp))(x)
            want = model(x)
        diff = _max_diff(got, want)
        if not diff <= ATOL:
            raise UserError(f"the TorchScript export's logits differ from PyTorch's by {diff:.2e} (> {ATOL:g}); "
                            f"the forward has data-dependent control flow: export onnx or safetensors instead")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def export_model(model: nn.Module, meta: dict[str, Any], fmt: str, out: str | Path, name: str = "model") -> Exported:
    """Write ``model`` (eval mode, CPU) as ``fmt`` to ``out`` and check it against PyTorch (see the module docstring)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    if fmt == "safetensors":
        export_safetensors(model, out, metadata={"model": str(meta.get("arch")), "dataset": str(meta.get("dataset")),
                                                 "num_classes": str(meta.get("num_classes")),
                                                 "in_channels": str(meta.get("in_channels")),
                                                 "image_size": str(meta.get("image_size"))})
        return Exported(name, out, fmt, None)
    x = _check_batch(meta)
    diff = _onnx(model, x, out) if fmt == "onnx" else _torchscript(model, x, out)
    return Exported(name, out, fmt, diff)


def export_target(target: str | Path, fmt: str, out: str | Path | None = None,
                  only: str | None = None) -> list[Exported]:
    """Export a checkpoint, or every finished student of a run directory (``only``: one stage by name).

    A run directory's exports go to ``<run>/export/<stage><suffix>``; a checkpoint's beside it (or in its
    run's ``export/``); ``out`` names the file when there is one model to write.
    """
    target = Path(target)
    if target.is_dir():
        ckpts = sorted(p for p in (target / "checkpoints").glob("*.pt") if not p.name.endswith(".last.pt"))
        if not ckpts:
            raise UserError(f"{target} has no finished checkpoints (checkpoints/*.pt); train it first or give a checkpoint")
        metas = {p: (safe_load(p).get("meta") or {}) for p in ckpts}
        if only is not None:
            ckpts = [p for p in ckpts if p.stem == only]
            if not ckpts:
                raise UserError(f"{target} has no finished stage '{only}'; stages: {', '.join(p.stem for p in metas)}")
        else:  # the students (or the model of `indistill train`), not the teacher and auxiliary they came from
            ckpts = [p for p in ckpts if metas[p].get("role") in ("student", "model")]
            if not ckpts:
                raise UserError(f"{target} has no finished student; name a stage with --arm ({', '.join(p.stem for p in metas)})")
        run = target
    elif target.is_file():
        ckpts, run = [target], (target.parent.parent if target.parent.name == "checkpoints" else None)
    else:
        raise UserError(f"'{target}' not found; give a run directory or a checkpoint file (.pt)")
    if out is not None and len(ckpts) > 1:
        raise UserError(f"--out names one file but {len(ckpts)} stages would be exported; choose one with --arm")
    done = []
    for ckpt in ckpts:
        model, meta = model_from_checkpoint(ckpt)
        dest = Path(out) if out is not None else (
            (run / "export" if run is not None else ckpt.parent) / f"{ckpt.stem}{SUFFIX[fmt]}")
        done.append(export_model(model, meta, fmt, dest, name=ckpt.stem))
    return done
