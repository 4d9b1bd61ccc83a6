"""Relational KD: distance- and angle-wise relations of the batch's embeddings."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..data.base import Batch
from ._common import add_ce, no_autocast, pair
from .base import Method, MethodContext, register_method


def _pairwise_distance(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    d = d2.sqrt()
    # The clamp leaves sqrt(eps) on the diagonal; a sample's distance to itself is 0.
    return d * (1 - torch.eye(e.shape[0], device=e.device, dtype=e.dtype))


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between pairwise distances, each normalised by its mean non-zero distance."""
    d_s, d_t = _pairwise_distance(f_s.flatten(1)), _pairwise_distance(f_t.flatten(1))
    d_t = d_t / d_t[d_t > 0].mean()
    d_s = d_s / d_s[d_s > 0].mean()
    return F.smooth_l1_loss(d_s, d_t)


def _angles(e: torch.Tensor) -> torch.Tensor:
    # cos of the angle at vertex i between samples j and k, for all (i, j, k).
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the cosines of all triplet angles."""
    return F.smooth_l1_loss(_angles(f_s.flatten(1)), _angles(f_t.flatten(1)))


@register_method
class RKD(Method):
    """RKD-DA on the embedding: ``distance * L_dist + angle * L_angle``.

    Defaults are the CRD benchmark's (``RKDLoss(w_d=25, w_a=50)``, ``-b 1``), ``ce=1``.
    """

    name = "rkd"
    paper = "Park, Kim, Lu, Cho. Relational Knowledge Distillation. CVPR 2019"
    summary = "match pairwise-distance and triplet-angle relations of the embeddings"
    uses = ("logits", "embedding")

    def __init__(self, ctx: MethodContext, *, distance: float = 25.0, angle: float = 50.0, ce: float = 1.0):
        super().__init__(ctx)
        self.distance, self.angle, self.ce = float(distance), float(angle), float(ce)

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        s, t = pair(student, teacher, "embedding")
        terms: dict[str, torch.Tensor] = {}
        with no_autocast(s):
            terms["rkd_distance"] = self.distance * rkd_distance_loss(s, t)
            terms["rkd_angle"] = self.angle * rkd_angle_loss(s, t)
            add_ce(terms, student["logits"], batch.labels, self.ce)
        return terms
