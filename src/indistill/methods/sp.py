"""Similarity-preserving KD: match the batch's pairwise activation similarities."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..data.base import Batch
from ._common import add_ce, no_autocast, pair, stage_taps
from .base import Method, MethodContext, register_method


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """``||norm_rows(G_t) - norm_rows(G_s)||_F^2 / b^2`` with ``G = F F^T`` over flattened features."""
    b = f_s.shape[0]
    g_s = F.normalize(f_s.reshape(b, -1) @ f_s.reshape(b, -1).t(), dim=1)
    g_t = F.normalize(f_t.reshape(b, -1) @ f_t.reshape(b, -1).t(), dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)


@register_method
class SP(Method):
    """Similarity-preserving loss on the last stage tap (CRD's ``feat[-2]``).

    Shapes may differ entirely: only the b x b similarity matrices are
    compared. Defaults: ``weight=3000`` (CRD ``-b 3000``), ``ce=1``.
    """

    name = "sp"
    paper = "Tung, Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019"
    summary = "match row-normalised batch similarity (Gram) matrices of the last stage"
    uses = ("logits", "stages")

    def __init__(self, ctx: MethodContext, *, weight: float = 3000.0, ce: float = 1.0):
        super().__init__(ctx)
        self.tap = stage_taps(ctx, self.name)[-1]
        self.weight, self.ce = float(weight), float(ce)

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        s, t = pair(student, teacher, self.tap)
        terms: dict[str, torch.Tensor] = {}
        with no_autocast(s):
            terms["sp"] = self.weight * sp_loss(s, t)
            add_ce(terms, student["logits"], batch.labels, self.ce)
        return terms
