"""Stage-2 KD methods: one file per method, registered by name.

``create_method(name, ctx, params)`` builds one; ``list_methods()`` lists them.
The functional losses are re-exported for reuse (``pkt_loss`` drives the
InDistill warmup's embedding phase and the teacher -> auxiliary stage).
"""

from .base import Method, MethodContext, create_method, get_method_class, list_methods, method_params, register_method
from .ce import CE
from .kd import KD, kd_loss
from .fitnet import FitNet
from .at import AT, at_loss, attention_map
from .sp import SP, sp_loss
from .rkd import RKD, rkd_angle_loss, rkd_distance_loss
from .pkt import PKT, PKT_VARIANTS, pkt_loss
from .nst import NST, nst_loss
from .vid import VID, VIDHead
from .crd import CRD, nce_loss
from .dkd import DKD, dkd_terms

__all__ = [
    "Method",
    "MethodContext",
    "create_method",
    "get_method_class",
    "CE",
    "list_methods",
    "method_params",
    "register_method",
    "KD",
    "FitNet",
    "AT",
    "SP",
    "RKD",
    "PKT",
    "NST",
    "VID",
    "VIDHead",
    "CRD",
    "DKD",
    "kd_loss",
    "at_loss",
    "attention_map",
    "sp_loss",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "pkt_loss",
    "PKT_VARIANTS",
    "nst_loss",
    "nce_loss",
    "dkd_terms",
]
