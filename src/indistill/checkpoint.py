"""Atomic checkpoint writes, safe loads (``weights_only=True``), safetensors export."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace``:
    a crash mid-write never leaves a truncated checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; a missing or corrupt file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' not found; check the path or train it first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated/foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint '{path}' is corrupt or not a weights-only torch checkpoint ({first[:120]}); "
            f"delete it to retrain, or point to a good copy"
        ) from None


def model_state(obj: Any) -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint: our ``{"model": ...}`` layout or a bare state_dict."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise UserError("checkpoint holds no model weights (expected a state_dict or a dict with 'model')")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint's model weights into ``model`` (strict); mismatches are one-line errors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise UserError(f"'{path}' is not a readable safetensors file ({e}); re-export it") from None
    else:
        state = model_state(safe_load(path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(
            f"checkpoint '{path}' does not fit {type(model).__name__}: {detail[:200]}; "
            f"check the model name and kwargs it was trained with"
        ) from None
    return model


def export_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state_dict as safetensors (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=metadata or {})
    os.replace(tmp, path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temp file in the same folder, fsync, then ``os.replace``: a kill mid-write
    leaves the old file (or none), never an empty or half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; a written result is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """:func:`atomic_write_text` of ``json.dumps(obj)``."""
    import json

    atomic_write_text(path, json.dumps(obj, indent=indent, default=str))
