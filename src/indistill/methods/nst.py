"""Neuron selectivity transfer: MMD between the channels' spatial activation patterns."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..data.base import Batch
from ._common import add_ce, check_choice, check_spatial, no_autocast, pair, stage_taps
from .base import Method, MethodContext, register_method


def _poly(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # k(x, y) = (x . y)^2 between every channel of a and every channel of b, per sample.
    return torch.bmm(a, b.transpose(1, 2)).pow(2)


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Squared MMD with the polynomial kernel (d=2, c=0) over L2-normalised channel maps."""
    s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
    t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
    return _poly(t, t).mean() + _poly(s, s).mean() - 2 * _poly(s, t).mean()


@register_method
class NST(Method):
    """NST with the polynomial kernel.

    ``stages``: ``"last"`` (default; the paper matches the last stage) or
    ``"all"`` (sum over every stage tap, as the CRD benchmark's code does).
    Spatial sizes must match; channel counts may differ.
    Defaults: ``weight=50`` (CRD ``-b 50``), ``ce=1``.
    """

    name = "nst"
    paper = "Huang, Wang. Like What You Like: Knowledge Distill via Neuron Selectivity Transfer. arXiv 1707.01219, 2017"
    summary = "match distributions of channel activation patterns (polynomial-kernel MMD)"
    uses = ("logits", "stages")

    def __init__(self, ctx: MethodContext, *, stages: str = "last", weight: float = 50.0, ce: float = 1.0):
        super().__init__(ctx)
        check_choice(self.name, "stages", stages, ("last", "all"))
        taps = stage_taps(ctx, self.name)
        self.taps = taps[-1:] if stages == "last" else taps
        for tap in self.taps:
            check_spatial(ctx, tap, self.name)
        self.weight, self.ce = float(weight), float(ce)

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        with no_autocast(student["logits"]):
            terms["nst"] = self.weight * sum(nst_loss(*pair(student, teacher, tap)) for tap in self.taps)
            add_ce(terms, student["logits"], batch.labels, self.ce)
        return terms
