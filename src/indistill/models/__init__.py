"""Models: the zoo registry and named feature taps."""

from .registry import (
    MODELS, ModelRecord, create_model, declare_model, list_models, model_aliases, model_name, model_record,
    model_taps, register_model,
)
from .taps import Taps, resolve_module, tap_shapes

__all__ = [
    "MODELS",
    "ModelRecord",
    "declare_model",
    "model_name",
    "model_record",
    "create_model",
    "list_models",
    "model_aliases",
    "model_taps",
    "register_model",
    "Taps",
    "resolve_module",
    "tap_shapes",
]
