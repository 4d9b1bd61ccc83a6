"""indistill: InDistill knowledge distillation for compressing image models.

The public API, re-exported (see the README for the pipeline)::

    from indistill import create_model, Taps, prune_to_student, default_schedule, pkt_loss, retrieval_metrics
"""

from .config import Config, load_config
from .curriculum import Schedule, default_schedule
from .data import DataSplits, get_dataset, list_datasets, register_dataset
from .errors import UserError
from .evaluate import classification_metrics, evaluate_model, extract_features, retrieval_metrics
from .methods import Method, MethodContext, create_method, list_methods, pkt_loss, register_method
from .models import Taps, create_model, list_models, model_taps, register_model, tap_shapes
from .models.auto import discover_taps
from .pairing import TapPairs, pair_taps
from .prune import PrunedTeacher, prune_to_student
from .warmup import InDistillWarmup, build_warmup
from .engine import Engine, Stage
from .pipeline import Pipeline

__version__ = "0.1.0"

__all__ = [
    "Config", "load_config", "Schedule", "default_schedule", "DataSplits", "get_dataset", "list_datasets",
    "register_dataset", "InDistillWarmup", "build_warmup", "Engine", "Stage", "Pipeline",
    "UserError", "classification_metrics", "evaluate_model", "extract_features", "retrieval_metrics", "Method",
    "MethodContext", "create_method", "list_methods", "pkt_loss", "register_method", "Taps", "create_model",
    "list_models", "model_taps", "register_model", "tap_shapes", "PrunedTeacher", "prune_to_student",
    "discover_taps", "TapPairs", "pair_taps",
]
