"""Models: the zoo registry and named feature taps."""

from .registry import create_model, list_models, model_aliases, model_taps, register_model
from .taps import Taps, resolve_module, tap_shapes

__all__ = [
    "create_model",
    "list_models",
    "model_aliases",
    "model_taps",
    "register_model",
    "Taps",
    "resolve_module",
    "tap_shapes",
]
