"""Model registry: ``create_model(name, num_classes, in_channels, **kw)``.

Every zoo model carries ``model.indistill_taps``: an ordered dict of tap name
-> tap spec (see :mod:`indistill.models.taps`). Names are ``stage1``..``stageN``
(shallow to deep), ``embedding`` (the classifier's input) and ``logits``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import UserError, suggest

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TAPS: dict[str, Callable[[nn.Module], dict[str, str]]] = {}


def register_model(name: str, taps: Callable[[nn.Module], dict[str, str]] | dict[str, str]):
    """Decorator: register a model factory ``f(num_classes, in_channels, **kw)`` with its taps."""

    def deco(fn: Callable[..., nn.Module]):
        if name in _MODELS:
            raise ValueError(f"model '{name}' registered twice")
        _MODELS[name] = fn
        _TAPS[name] = taps if callable(taps) else (lambda _m, t=dict(taps): dict(t))
        return fn

    return deco


def list_models() -> list[str]:
    _load_zoo()
    return sorted(_MODELS)


def create_model(name: str, num_classes: int, in_channels: int = 3, **kw: Any) -> nn.Module:
    """Build a zoo model; the result has ``indistill_taps`` and ``indistill_name`` attributes."""
    _load_zoo()
    if name not in _MODELS:
        raise UserError(f"unknown model '{name}'{suggest(name, _MODELS)}; see `indistill models`")
    try:
        model = _MODELS[name](num_classes=num_classes, in_channels=in_channels, **kw)
    except TypeError as e:
        raise UserError(f"bad options for model '{name}': {e}") from None
    model.indistill_taps = _TAPS[name](model)
    model.indistill_name = name
    return model


def model_taps(model: nn.Module) -> dict[str, str]:
    """The tap specs of a zoo model (ordered: stages shallow to deep, embedding, logits)."""
    taps = getattr(model, "indistill_taps", None)
    if taps is None:
        raise UserError(
            f"{type(model).__name__} declares no taps; name its layers in the config "
            f"(e.g. taps: {{stage1: layer1, embedding: 'fc:in', logits: '@output'}})"
        )
    return dict(taps)


def _load_zoo() -> None:
    # Importing the zoo modules runs their @register_model decorators.
    from . import zoo  # noqa: F401
