"""Model registry: ``create_model(name, num_classes, in_channels, **kw)``.

Every zoo model carries ``model.indistill_taps``: an ordered dict of tap name
-> tap spec (see :mod:`indistill.models.taps`). Names are ``stage1``..``stageN``
(shallow to deep), ``embedding`` (the classifier's input) and ``logits``.

A model may also answer to *aliases*, the names other KD code bases use for
it (``mobile_half``, ``ShuffleV1``, ``ResNet50``), so their configs and
checkpoint folders can be reused as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import UserError, suggest

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TAPS: dict[str, Callable[[nn.Module], dict[str, str]]] = {}
_ALIASES: dict[str, str] = {}


def register_model(
    name: str,
    taps: Callable[[nn.Module], dict[str, str]] | dict[str, str],
    aliases: tuple[str, ...] = (),
):
    """Decorator: register a model factory ``f(num_classes, in_channels, **kw)`` with its taps and aliases."""

    def deco(fn: Callable[..., nn.Module]):
        for n in (name, *aliases):
            if n in _MODELS or n in _ALIASES:
                raise ValueError(f"model '{n}' registered twice")
        _MODELS[name] = fn
        _TAPS[name] = taps if callable(taps) else (lambda _m, t=dict(taps): dict(t))
        _ALIASES.update({a: name for a in aliases})
        return fn

    return deco


def list_models() -> list[str]:
    """The canonical zoo names (aliases are in :func:`model_aliases`)."""
    _load_zoo()
    return sorted(_MODELS)


def model_aliases() -> dict[str, str]:
    """Alias -> canonical zoo name, e.g. ``{"mobile_half": "mobilenetv2_cifar", ...}``."""
    _load_zoo()
    return dict(sorted(_ALIASES.items()))


def create_model(name: str, num_classes: int, in_channels: int = 3, **kw: Any) -> nn.Module:
    """Build a zoo model; the result has ``indistill_taps`` and ``indistill_name`` attributes."""
    _load_zoo()
    name = _ALIASES.get(name, name)
    if name not in _MODELS:
        raise UserError(f"unknown model '{name}'{suggest(name, [*_MODELS, *_ALIASES])}; see `indistill models`")
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
