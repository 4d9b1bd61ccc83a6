"""Atomic checkpoint writes, safe loads (``weights_only=True``), safetensors export."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
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


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask would race threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file in ``path``'s folder, fsync it, then ``os.replace``.

    Readers see the old file or the new one, never a partial one; on any failure
    the temp file is removed and the old file is left as it was. The new file
    gets the usual ``0o666 & ~umask`` mode (mkstemp alone would make it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: temp file in the same folder + fsync + ``os.replace``."""
    return _atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(
    path: str | Path, obj: Any, *, indent: int | None = 1, sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """``json.dumps(obj)`` plus a final newline, written atomically (see :func:`atomic_write_text`).

    The text is built before the file is touched, so an unserialisable object
    leaves the old file as it was.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n")


# torch dtype -> safetensors dtype name (the format's spec).
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):  # newer dtypes, absent from older torch
        _ST_DTYPES[getattr(torch, _name)] = _code


def safetensors_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors in the safetensors format, deterministically.

    ``safetensors.torch.save_file`` writes its metadata from a Rust HashMap, whose
    order changes from run to run, so two exports of the same weights differed.
    Here the header is JSON with sorted keys and the tensor data is laid out in
    name order: equal weights and metadata give identical bytes.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise UserError(f"cannot export tensor '{name}' of dtype {t.dtype} to safetensors; cast the model first")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    head += b" " * (-len(head) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def export_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state_dict as safetensors, atomically and byte-reproducibly
    (sorted metadata and tensors: the same weights always give the same file)."""
    return _atomic_write_bytes(path, safetensors_bytes(model.state_dict(), metadata))
