"""Probabilistic knowledge transfer: match the batch's affinity distributions.

Two variants:

``"reference"`` (InDistill's own code, ``methods/pkt.py`` of gsarridis/InDistill):
two affinity kernels of the batch, the cosine one ``(cos + 1) / 2`` and
``1 / (1 + d)`` of the Euclidean distance ``d``; each row-normalised into a
distribution; for each kernel the symmetric KL (Jeffreys) divergence
``(p_t - p_s) * (log p_t - log p_s)`` averaged over all b x b entries (the
diagonal included, as in the reference); the two means are summed.

``"original"`` (Passalis & Tefas 2018, as in the CRD benchmark): the cosine
kernel only, ``mean(p_t * log(p_t / p_s))`` over all b x b entries.

``eps`` guards every division, square root and logarithm.

The variant is spelled the same wherever PKT runs: ``variant`` in the method's params
(``kd.params.pkt.variant``), ``auxiliary.pkt_variant`` for the auxiliary's PKT stage and
``warmup.pkt_variant`` for the warmup's ``pkt`` phases, all from ``config.PKT_VARIANTS``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import PKT_VARIANTS
from ..data.base import Batch
from ._common import add_ce, check_choice, full, no_autocast, pair
from .base import Method, MethodContext, register_method


def _cosine_kernel(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    return (x @ x.t() + 1.0) / 2.0


def _distance_kernel(x: torch.Tensor, eps: float) -> torch.Tensor:
    sq = x.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp(min=0)
    return 1.0 / (1.0 + (d2 + eps).sqrt())


def _rows(k: torch.Tensor, eps: float) -> torch.Tensor:
    return k / (k.sum(dim=1, keepdim=True) + eps)


def _jeffreys(p_s: torch.Tensor, p_t: torch.Tensor, eps: float) -> torch.Tensor:
    return ((p_t - p_s) * (torch.log(p_t + eps) - torch.log(p_s + eps))).mean()


def pkt_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, variant: str = "reference", eps: float = 1e-7) -> torch.Tensor:
    """PKT loss between (N, D_s) and (N, D_t) embeddings (dims may differ); see the module doc."""
    check_choice("pkt", "variant", variant, PKT_VARIANTS)
    s = full(student_emb).flatten(1)
    t = full(teacher_emb).detach().flatten(1)
    with torch.autocast(device_type=s.device.type, enabled=False):
        if variant == "original":
            p_s, p_t = _rows(_cosine_kernel(s, eps), eps), _rows(_cosine_kernel(t, eps), eps)
            return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
        loss = _jeffreys(_rows(_cosine_kernel(s, eps), eps), _rows(_cosine_kernel(t, eps), eps), eps)
        return loss + _jeffreys(_rows(_distance_kernel(s, eps), eps), _rows(_distance_kernel(t, eps), eps), eps)


@register_method
class PKT(Method):
    """PKT on the embedding tap.

    ``variant``: ``"reference"`` (default; the InDistill reference's
    two-kernel Jeffreys form) or ``"original"`` (Passalis & Tefas, cosine
    kernel, KL(teacher || student)).

    ``weight`` and ``ce`` default (``None``) per variant, following the code
    each variant comes from: ``reference`` -> ``weight=1, ce=0`` (the InDistill
    reference trains its KD stage on PKT alone, no label loss); ``original`` ->
    ``weight=30000, ce=1`` (CRD benchmark ``-b 30000``). ``eps=1e-7``.
    """

    name = "pkt"
    paper = "Passalis, Tefas. Learning Deep Representations with Probabilistic Knowledge Transfer. ECCV 2018"
    summary = "match row-normalised batch affinity distributions of the embeddings (KL / Jeffreys)"
    uses = ("logits", "embedding")

    def __init__(
        self,
        ctx: MethodContext,
        *,
        variant: str = "reference",
        weight: float | None = None,
        ce: float | None = None,
        eps: float = 1e-7,
    ):
        super().__init__(ctx)
        check_choice(self.name, "variant", variant, PKT_VARIANTS)
        ref = variant == "reference"
        self.variant = variant
        self.weight = float(weight if weight is not None else (1.0 if ref else 30000.0))
        self.ce = float(ce if ce is not None else (0.0 if ref else 1.0))
        self.eps = float(eps)

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        s, t = pair(student, teacher, "embedding")
        terms: dict[str, torch.Tensor] = {"pkt": self.weight * pkt_loss(s, t, self.variant, self.eps)}
        with no_autocast(s):
            add_ce(terms, student["logits"], batch.labels, self.ce)
        return terms
