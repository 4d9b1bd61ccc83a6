"""Attention transfer (activation-based spatial attention maps)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..data.base import Batch
from ._common import add_ce, check_positive, check_spatial, no_autocast, pair, stage_taps
from .base import Method, MethodContext, register_method


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """L2-normalised ``mean_c |f|^p``, flattened to (N, H*W)."""
    return F.normalize(f.abs().pow(p).mean(1).reshape(f.shape[0], -1), dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of the two attention maps."""
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_method
class AT(Method):
    """Attention transfer summed over every stage tap.

    Channel counts may differ (the map averages over channels); spatial sizes
    must match. Defaults: ``p=2``, ``weight=1000`` (CRD ``-b 1000``), ``ce=1``.
    """

    name = "at"
    paper = "Zagoruyko, Komodakis. Paying More Attention to Attention. ICLR 2017"
    summary = "match normalised spatial attention maps (mean_c f^p) of every stage"
    uses = ("logits", "stages")

    def __init__(self, ctx: MethodContext, *, p: float = 2.0, weight: float = 1000.0, ce: float = 1.0):
        super().__init__(ctx)
        self.taps = stage_taps(ctx, self.name)
        for tap in self.taps:
            check_spatial(ctx, tap, self.name)
        check_positive(self.name, p=p)
        self.p, self.weight, self.ce = float(p), float(weight), float(ce)

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        with no_autocast(student["logits"]):
            loss = sum(at_loss(*pair(student, teacher, tap), p=self.p) for tap in self.taps)
            terms["at"] = self.weight * loss
            add_ce(terms, student["logits"], batch.labels, self.ce)
        return terms
