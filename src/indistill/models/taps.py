"""Named feature taps on any ``nn.Module``, by module path, with forward hooks.

A tap spec is a module path as in ``model.named_modules()`` (``"layer1"``,
``"features.3"``) for that module's *output*, or ``"path:in"`` for its first
positional *input* (the embedding is usually ``"fc:in"``, the classifier's
input). The special spec ``"@output"`` is the model's own return value
(the logits). No model needs a special ``forward``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UserError, suggest

OUTPUT = "@output"


class _Captured(Exception):
    """Raised by a hook to end a forward once every requested tap is captured (:meth:`Taps.capture`)."""


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule at ``path``; a wrong path raises ``UserError`` naming near matches."""
    modules = dict(model.named_modules())
    if path not in modules:
        names = [n for n in modules if n]
        raise UserError(
            f"no module '{path}' in {type(model).__name__}{suggest(path, names)}; "
            f"list module paths with `indistill layers MODEL`"
        )
    return modules[path]


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a tap spec into (module path, 'out' | 'in')."""
    if spec == OUTPUT:
        return OUTPUT, "out"
    if spec.endswith(":in"):
        return spec[: -len(":in")], "in"
    if spec.endswith(":out"):
        return spec[: -len(":out")], "out"
    return spec, "out"


class Taps:
    """Capture named intermediate activations of ``model`` during its forward.

    >>> taps = Taps(model, {"stage1": "layer1", "embedding": "fc:in", "logits": "@output"})
    >>> logits, feats = taps(x)      # feats["stage1"], feats["embedding"], feats["logits"]
    >>> taps.remove()                # or use as a context manager

    Hooks stay attached until :meth:`remove`; captured tensors keep their
    autograd graph, so losses on them train the model.
    """

    def __init__(self, model: nn.Module, specs: Mapping[str, str]):
        self.model = model
        self.specs = dict(specs)
        self._store: dict[str, torch.Tensor] = {}
        self._until: frozenset[str] | None = None  # set by capture(): stop the forward once these are stored
        self._handles: list[Any] = []
        for name, spec in self.specs.items():
            path, kind = parse_spec(spec)
            if path == OUTPUT:
                continue
            module = resolve_module(model, path)
            if kind == "in":
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_m, _inp, out):
            self._store[name] = out
            if self._until is not None and self._until.issubset(self._store):
                raise _Captured

        return hook

    def _pre_hook(self, name: str):
        def hook(_m, inp):
            self._store[name] = inp[0]
            if self._until is not None and self._until.issubset(self._store):
                raise _Captured

        return hook

    def __call__(self, *args, **kwargs) -> tuple[Any, dict[str, torch.Tensor]]:
        self._store = {}
        out = self.model(*args, **kwargs)
        feats = dict(self._store)
        self._store = {}
        for name, spec in self.specs.items():
            if spec == OUTPUT:
                feats[name] = out
            elif name not in feats:
                raise UserError(
                    f"tap '{name}' ({spec}) was not reached by {type(self.model).__name__}.forward; "
                    f"choose a module that the forward pass calls"
                )
        # Flatten the classifier input so embeddings are (N, D) whatever the model does.
        return out, {k: (v.flatten(1) if self.specs[k].endswith(":in") and v.dim() > 2 else v) for k, v in feats.items()}

    def capture(self, *args, names=None, **kwargs) -> dict[str, torch.Tensor]:
        """Only the taps ``names`` (default: all), ending the forward as soon as they are all captured.

        Layers after the last requested tap do not run, so use it where those layers have no effect
        that matters: a frozen model in eval mode (a BatchNorm in train mode there would skip its
        running-statistics update). The returned tensors are the ones :meth:`__call__` returns for
        those taps; a request for ``@output`` runs the whole forward.
        """
        names = list(self.specs) if names is None else list(names)
        unknown = [n for n in names if n not in self.specs]
        if unknown:
            raise UserError(f"no tap named {', '.join(unknown)}; taps: {', '.join(self.specs)}")
        if any(self.specs[n] == OUTPUT for n in names):
            _, feats = self(*args, **kwargs)
            return {n: feats[n] for n in names}
        self._store = {}
        self._until = frozenset(names)
        try:
            self.model(*args, **kwargs)
        except _Captured:
            pass
        finally:
            self._until = None
        feats = {n: self._store[n] for n in names if n in self._store}
        self._store = {}
        missing = [n for n in names if n not in feats]
        if missing:
            raise UserError(
                f"tap '{missing[0]}' ({self.specs[missing[0]]}) was not reached by {type(self.model).__name__}.forward; "
                f"choose a module that the forward pass calls"
            )
        return {k: (v.flatten(1) if self.specs[k].endswith(":in") and v.dim() > 2 else v) for k, v in feats.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "Taps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def tap_shapes(model: nn.Module, specs: Mapping[str, str], input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes (without batch dim) of each tap for one input of ``input_shape`` (C, H, W)."""
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with Taps(model, specs) as taps:
            _, feats = taps(torch.zeros(2, *input_shape, device=device))
    except RuntimeError as e:  # shape mismatches inside the model: the input does not fit it
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        from .registry import model_name

        name = model_name(model)
        raise UserError(
            f"model {name} cannot take inputs of shape {tuple(input_shape)} ({first}); choose a model for this "
            f"image size and channel count, or resize the data"
        ) from None
    finally:
        model.train(was_training)
    return {k: tuple(v.shape[1:]) for k, v in feats.items()}
