"""Model registry: ``create_model(name, num_classes, in_channels, **kw)``.

Every model the library builds has a :class:`ModelRecord` (its name and taps), kept beside the
module, never set on it: :func:`declare_model` records one, :func:`model_taps` / :func:`model_name`
read it. Taps are an ordered dict of tap name -> tap spec (see :mod:`indistill.models.taps`):
``stage1``..``stageN`` (shallow to deep), ``embedding`` (the classifier's input) and ``logits``.

A model may also answer to *aliases*, the names other KD code bases use for
it (``mobile_half``, ``ShuffleV1``, ``ResNet50``), so their configs and
checkpoint folders can be reused as they are.
"""

from __future__ import annotations

import importlib
import inspect
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UserError
from ..registry import Registry

FACTORY_SIGNATURE = "f(num_classes=, in_channels=, **kwargs) -> nn.Module"


@dataclass(frozen=True)
class ZooEntry:
    """A registered model: its factory ``f(num_classes, in_channels, **kw)`` and its taps (of the built model).

    ``taps`` returning None means the model has none registered: they are found by a dry forward
    (:mod:`indistill.models.auto`), as for ``timm:`` / ``torchvision:`` models.
    """

    factory: Callable[..., nn.Module]
    taps: Callable[[nn.Module], dict[str, str] | None]


@dataclass(frozen=True)
class ModelRecord:
    """What the library knows about a built model: the name it was built as and its taps."""

    name: str
    taps: dict[str, str]


def _load_zoo() -> None:
    # Importing the zoo modules runs their @register_model decorators.
    from . import zoo  # noqa: F401


def _external(name: str) -> ZooEntry | None:
    """``timm:<model>`` / ``torchvision:<model>``: built by name, taps found (not registered)."""
    from .external import build_external, is_external

    if not is_external(name):
        return None
    return ZooEntry(lambda num_classes, in_channels=3, **kw: build_external(name, num_classes, in_channels, **kw),
                    lambda _m: None)


MODELS: Registry[ZooEntry] = Registry("model", loader=_load_zoo, group="indistill.models",
                                      hint="see `indistill models`, or timm:<model> / torchvision:<model>",
                                      fallback=_external)
#: the input size taps are found at when a model is built without one (ImageNet's)
DEFAULT_INPUT_SHAPE = (3, 224, 224)
_RECORDS: "weakref.WeakKeyDictionary[nn.Module, ModelRecord]" = weakref.WeakKeyDictionary()


def register_model(
    name: str,
    taps: Callable[[nn.Module], dict[str, str]] | dict[str, str],
    aliases: tuple[str, ...] = (),
):
    """Decorator: register a model factory ``f(num_classes, in_channels, **kw)`` with its taps and aliases."""

    def deco(fn: Callable[..., nn.Module]):
        tap_fn = taps if callable(taps) else (lambda _m, t=dict(taps): dict(t))
        MODELS.add(name, ZooEntry(fn, tap_fn), aliases=aliases)
        return fn

    return deco


def declare_model(model: nn.Module, taps: Mapping[str, str], name: str | None = None) -> nn.Module:
    """Record ``model``'s taps (and the name it was built as) beside it; returns ``model`` unchanged."""
    _RECORDS[model] = ModelRecord(name or type(model).__name__, dict(taps))
    return model


def model_record(model: nn.Module) -> ModelRecord | None:
    """The record :func:`declare_model` made for ``model``, or None."""
    return _RECORDS.get(model)


def model_name(model: nn.Module) -> str:
    """The name ``model`` was built as (zoo name or ``module:factory``), else its class name."""
    rec = _RECORDS.get(model)
    return rec.name if rec is not None else type(model).__name__


def list_models() -> list[str]:
    """The canonical zoo names (aliases are in :func:`model_aliases`)."""
    return MODELS.names()


def model_aliases() -> dict[str, str]:
    """Alias -> canonical zoo name, e.g. ``{"mobile_half": "mobilenetv2_cifar", ...}``."""
    return MODELS.aliases()


def create_model(name: str, num_classes: int, in_channels: int = 3, *, input_shape: tuple[int, ...] | None = None,
                 taps: Mapping[str, str] | str | None = None, **kw: Any) -> nn.Module:
    """Build a zoo (or ``timm:`` / ``torchvision:``) model and record its taps and name (:func:`model_taps`,
    :func:`model_name`).

    ``taps`` (a config's) update the registered ones; a model without registered taps, or ``taps="auto"``,
    gets them found by one dry forward at ``input_shape`` (C, H, W; default ``in_channels`` x 224 x 224).
    """
    from .auto import resolve_taps

    entry = MODELS.get(name)
    name = MODELS.canonical(name)
    model = call_factory(entry.factory, name, num_classes=num_classes, in_channels=in_channels, **kw)
    shape = tuple(input_shape) if input_shape is not None else (in_channels, *DEFAULT_INPUT_SHAPE[1:])
    registered = entry.taps(model)
    if registered is None or taps is not None:
        return declare_model(model, resolve_taps(model, taps, shape, registered), name)
    return declare_model(model, registered, name)


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
    """The tap specs of a built model (ordered: stages shallow to deep, embedding, logits)."""
    rec = _RECORDS.get(model)
    if rec is None:
        raise UserError(
            f"{type(model).__name__} declares no taps; name its layers in the config "
            f"(e.g. taps: {{stage1: layer1, embedding: 'fc:in', logits: '@output'}})"
        )
    return dict(rec.taps)
