"""Variational information distillation: Gaussian likelihood of teacher features."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import Batch
from ._common import add_ce, as_4d, channels, check_positive, check_spatial, no_autocast, pair, stage_taps
from .base import Method, MethodContext, register_method


class VIDHead(nn.Module):
    """Predicts the teacher's tap from the student's: mean by a 1x1-conv MLP, per-channel variance."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, init_pred_var: float = 5.0, eps: float = 1e-5):
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(c_in, c_mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_out, 1, bias=False),
        )
        # softplus^-1 so the initial variance is init_pred_var.
        self.log_scale = nn.Parameter(torch.full((c_out,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood (up to a constant) of ``f_t`` under the predicted Gaussian."""
        mean = self.regressor(as_4d(f_s))
        var = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)
        return (0.5 * ((mean - as_4d(f_t)).pow(2) / var + var.log())).mean()


def _key(tap: str) -> str:
    return tap.replace(".", "_")  # ModuleDict keys may not contain dots


@register_method
class VID(Method):
    """VID on every stage tap, one head per tap (mid width = teacher width, as in CRD).

    Defaults: ``weight=1`` (CRD ``-b 1``), ``init_pred_var=5``, ``eps=1e-5``, ``ce=1``.
    Spatial sizes must match.
    """

    name = "vid"
    paper = "Ahn, Hu, Damianou, Lawrence, Dai. Variational Information Distillation for Knowledge Transfer. CVPR 2019"
    summary = "maximise a variational lower bound on teacher/student mutual information per stage"
    uses = ("logits", "stages")

    def __init__(
        self, ctx: MethodContext, *, weight: float = 1.0, init_pred_var: float = 5.0, eps: float = 1e-5, ce: float = 1.0
    ):
        super().__init__(ctx)
        check_positive(self.name, init_pred_var=init_pred_var, eps=eps)
        self.taps = stage_taps(ctx, self.name)
        heads = {}
        for tap in self.taps:
            check_spatial(ctx, tap, self.name)
            c_s, c_t = channels(ctx.student_shapes[tap]), channels(ctx.teacher_shapes[tap])
            heads[_key(tap)] = VIDHead(c_s, c_t, c_t, init_pred_var, eps)
        self.heads = nn.ModuleDict(heads)
        self.weight, self.ce = float(weight), float(ce)

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        with no_autocast(student["logits"]):
            dtype = self.heads[_key(self.taps[0])].log_scale.dtype
            loss = sum(self.heads[_key(tap)](*(x.to(dtype) for x in pair(student, teacher, tap))) for tap in self.taps)
            terms["vid"] = self.weight * loss
            add_ce(terms, student["logits"], batch.labels, self.ce)
        return terms
