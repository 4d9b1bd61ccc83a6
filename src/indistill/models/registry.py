"""Model registry: ``create_model(name, num_classes, in_channels, **kw)``.

Every zoo model carries ``model.indistill_taps``: an ordered dict of tap name
-> tap spec (see :mod:`indistill.models.taps`). Names are ``stage1``..``stageN``
(shallow to deep), ``embedding`` (the classifier's input) and ``logits``.

A model may also answer to *aliases*, the names other KD code bases use for
it (``mobile_half``, ``ShuffleV1``, ``ResNet50``), so their configs and
checkpoint folders can be reused as they are.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import UserError, suggest

FACTORY_SIGNATURE = "f(num_classes=, in_channels=, **kwargs) -> nn.Module"

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
    model = call_factory(_MODELS[name], name, num_classes=num_classes, in_channels=in_channels, **kw)
    model.indistill_taps = _TAPS[name](model)
    model.indistill_name = name
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def resolve_factory(name: str) -> Callable[..., Any]:
    """The object named by ``'package.module:attribute'`` (a user's model factory).

    Any failure to import the module or find the attribute (missing module,
    syntax error in it, an exception at import time, an empty or relative
    module name) is a one-line ``UserError``.
    """
    mod_name, sep, attr = name.partition(":")
    if not sep or not mod_name.strip() or not attr.strip() or mod_name.startswith("."):
        raise UserError(f"model factory '{name}' is not 'package.module:function'; give an importable module and a function")
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, SyntaxError, or whatever the module raises when imported
        raise UserError(
            f"cannot import module '{mod_name}' of model factory '{name}' ({type(e).__name__}: {_first_line(e)}); "
            "check the module path and that it is importable (PYTHONPATH)"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(f"module '{mod_name}' has no attribute '{attr}' (model factory '{name}'); give module.path:function") from None
    return obj


def call_factory(factory: Any, name: str, **kwargs: Any) -> nn.Module:
    """Call a model factory ``f(num_classes=, in_channels=, **kwargs) -> nn.Module``, checking it is one.

    ``name`` is how the user named it (a zoo name or ``module:function``). Not
    callable, a signature that does not take the keywords, a ``TypeError``
    while building (bad ``kwargs``) or a result that is not an ``nn.Module``:
    each is a one-line ``UserError`` naming the factory and the signature.
    """
    if not callable(factory):
        raise UserError(f"model factory '{name}' is a {type(factory).__name__}, not a callable {FACTORY_SIGNATURE}")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise UserError(
            f"model factory '{name}' does not take ({', '.join(f'{k}=' for k in kwargs)}): {_first_line(e)}; "
            f"it must be {FACTORY_SIGNATURE} (check the model's kwargs)"
        ) from None
    except ValueError:
        pass  # no introspectable signature (some builtins): the call below decides
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise UserError(
            f"bad options for model factory '{name}' ({_first_line(e)}); it is called as {FACTORY_SIGNATURE}, "
            "check the model's kwargs"
        ) from None
    if not isinstance(model, nn.Module):
        raise UserError(
            f"model factory '{name}' returned a {type(model).__name__}, not an nn.Module; it must be {FACTORY_SIGNATURE}"
        )
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
