"""Atomic checkpoint writes, safe loads (``weights_only=True``), safetensors export."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import tempfile
import warnings
from collections import OrderedDict
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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is as readable as every other file
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
        with warnings.catch_warnings():
            # torch warns about foreign pickle protocols before refusing them: the error line says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for truncated/foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if len(first) > 160:
            first = first[:160].rsplit(" ", 1)[0] + " ..."
        raise UserError(
            f"checkpoint '{path}' is corrupt or not a weights-only torch checkpoint ({first}); "
            f"delete it to retrain, or point to a good copy"
        ) from None


# Where training scripts keep the weights: ours and mdistiller / CRD ('model'), timm, Lightning and
# torchvision references ('state_dict'), kuangliu's pytorch-cifar ('net'), the PyTorch tutorials.
_WRAPPER_KEYS = ("model", "state_dict", "net", "model_state_dict")
# Added to every key by nn.DataParallel / DistributedDataParallel and by torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

log = logging.getLogger(__name__)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def model_state(obj: Any) -> dict[str, torch.Tensor]:
    """The model weights inside a checkpoint, in the layouts that training code bases publish.

    A bare state_dict, or a dict holding one under ``model``, ``state_dict``,
    ``net`` or ``model_state_dict`` (nested wrappers too); other entries
    (``epoch``, ``optimizer``, ``best_acc``, ...) are ignored.
    """
    for _ in range(4):  # wrappers nest at most a couple of levels
        if _is_state_dict(obj):
            return obj
        inner = None
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    found = sorted(map(str, obj))[:6] if isinstance(obj, dict) else type(obj).__name__
    raise UserError(
        f"checkpoint holds no model weights (found {found}); expected a state_dict or a dict with one of "
        f"{', '.join(repr(k) for k in _WRAPPER_KEYS)}"
    )


def strip_wrapper_prefixes(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix carried by every key.

    Only when all keys carry it and the model's own keys do not, so a model
    with a real submodule called ``module`` is left alone.
    """
    own = model.state_dict().keys()
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
                state = _keep_metadata(state, {k[len(prefix) :]: v for k, v in state.items()}, prefix)
                changed = True
    return state


def _keep_metadata(old: dict[str, Any], new: dict[str, Any], strip: str = "") -> dict[str, Any]:
    """Carry a state_dict's ``_metadata`` (module versions, which BatchNorm & co. read on load) to ``new``."""
    meta = getattr(old, "_metadata", None)
    if meta is None:
        return new
    out = OrderedDict(new)
    renamed: OrderedDict[str, Any] = OrderedDict()
    for key, value in meta.items():
        if strip and key == strip[:-1]:  # the wrapped model itself becomes the root
            key = ""
        elif strip and key.startswith(strip):
            key = key[len(strip) :]
        renamed[key] = value
    out._metadata = renamed  # type: ignore[attr-defined]
    return out


def classifier_path(model: nn.Module) -> str | None:
    """Module path of the layer that produces the logits.

    A zoo model's ``embedding`` tap is ``"<classifier>:in"``; other models
    fall back to their last ``nn.Linear``. ``None`` when there is none.
    """
    modules = dict(model.named_modules())
    from .models.registry import model_record

    rec = model_record(model)
    spec = (rec.taps if rec is not None else {}).get("embedding", "")
    if spec.endswith(":in") and isinstance(modules.get(spec[: -len(":in")]), nn.Linear):
        return spec[: -len(":in")]
    linears = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


# numpy scalars and dtypes are plain data; training scripts often save best_acc as one. Allow-listing them
# keeps torch.load(weights_only=True) (no code runs) while reading those files.
def _numpy_safe_globals() -> list[Any]:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtypes = {type(np.dtype(c)) for c in "?bhilqpBHILQPefdgFDG"}
    allowed: list[Any] = [scalar, np.dtype, *sorted(dtypes, key=lambda t: t.__name__)]
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6):
        # Files pickled under numpy 1.x name the scalar by its old module path ((obj, name) needs torch 2.6).
        allowed.append((scalar, "numpy.core.multiarray.scalar"))
    return allowed


def allow_numpy_scalars() -> contextlib.AbstractContextManager[Any]:
    """Context in which ``torch.load(weights_only=True)`` also accepts numpy scalars and dtypes."""
    allowed = _numpy_safe_globals()
    if not allowed or not hasattr(torch.serialization, "safe_globals"):
        return contextlib.nullcontext()
    return torch.serialization.safe_globals(allowed)


def _read_checkpoint(path: Path) -> Any:
    """``safe_load`` with numpy scalars allowed (still ``weights_only=True``)."""
    with allow_numpy_scalars():
        return safe_load(path)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"checkpoint '{path}' not found; check the path or train it first")
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise UserError(f"'{path}' is not a readable safetensors file ({e}); re-export it") from None
    return model_state(_read_checkpoint(path))


def load_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, reset_head: bool = False
) -> nn.Module:
    """Load ``state`` into ``model`` (strict); ``reset_head`` keeps the model's own classifier.

    ``source`` names where the weights came from, for the messages. A
    classifier with another class count is a one-line ``UserError`` naming
    both counts and the fix; any other mismatch names the first offending key.
    """
    state = strip_wrapper_prefixes(state, model)
    own = model.state_dict()
    head = classifier_path(model)
    in_head = (lambda k: k.startswith(f"{head}.")) if head else (lambda k: False)
    if reset_head:
        if head is None:
            raise UserError(
                f"reset_head: {type(model).__name__} has no nn.Linear classifier to keep; load with reset_head=False"
            )
        skipped = sorted(k for k in state if in_head(k))
        state = _keep_metadata(state, {k: v for k, v in state.items() if not in_head(k)})
    else:
        w = f"{head}.weight"
        others_fit = all(own[k].shape == v.shape for k, v in state.items() if k in own and not in_head(k))
        if head and w in state and w in own and state[w].shape[0] != own[w].shape[0] and others_fit:
            theirs, ours = state[w].shape[0], own[w].shape[0]
            raise UserError(
                f"checkpoint '{source}' has a {theirs}-class classifier ({head}) but the model has {ours} classes; "
                f"set num_classes to {theirs}, or load with reset_head=True (config: teacher.reset_head: true) "
                f"to keep all but the classifier, which then starts fresh"
            )
    try:
        result = model.load_state_dict(state, strict=not reset_head)
    except RuntimeError as e:
        raise UserError(_mismatch_message(source, model, e)) from None
    if reset_head:
        missing = [k for k in result.missing_keys if not in_head(k)]
        if missing or result.unexpected_keys:
            bad = (missing or result.unexpected_keys)[0]
            kind = "missing" if missing else "unexpected"
            raise UserError(
                f"checkpoint '{source}' does not fit {type(model).__name__} even without its classifier "
                f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected keys, first {kind}: '{bad}'); "
                f"check the model name and kwargs it was trained with"
            )
        log.warning("reset_head: loaded '%s' except the classifier %s; skipped %s", source, head, skipped or "nothing")
    return model


def _mismatch_message(source: str, model: nn.Module, e: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = lines[1] if len(lines) > 1 else lines[0]
    return (
        f"checkpoint '{source}' does not fit {type(model).__name__}: {detail[:200]}; "
        f"check the model name and kwargs it was trained with"
    )


def load_weights(model: nn.Module, path: str | Path, reset_head: bool = False) -> nn.Module:
    """Load a checkpoint's model weights into ``model`` (strict); mismatches are one-line errors.

    Reads our checkpoints, ``.safetensors`` exports and the files other
    projects publish: mdistiller / CRD ``{"model": ..., "epoch": ...}``,
    ``{"state_dict": ...}``, ``{"net": ...}``, DataParallel ``module.``
    prefixes, torchvision's plain state dicts. Always ``weights_only=True``.
    ``reset_head=True`` loads everything but the classifier, which keeps its
    fresh init (for a teacher trained on another class count); the skipped
    keys are logged.
    """
    path = Path(path)
    return load_state(model, _read_state(path), str(path), reset_head=reset_head)


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


def export_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the model's state_dict as safetensors, atomically and byte-reproducibly.

    safetensors writes its ``__metadata__`` map in a per-run hash order, so several keys made two exports of
    the same weights differ; the metadata is therefore ONE entry, ``indistill``, holding sorted-key JSON
    (tensors are laid out deterministically by the library)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"indistill": json.dumps({str(k): str(v) for k, v in metadata.items()}, sort_keys=True)} if metadata else None
    return _atomic_write_bytes(path, save(state, metadata=meta))

