"""Hinton et al.'s soft-target knowledge distillation."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..data.base import Batch
from ._common import add_ce, check_positive, no_autocast, pair
from .base import Method, MethodContext, register_method


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


@register_method
class KD(Method):
    """Soft-target KD on the logits.

    Loss = ``ce * CE(s, y) + kd * T^2 KL(p_t^T || p_s^T)``. Defaults are the CRD
    benchmark's (``-r 0.1 -a 0.9``): ``T=4``, ``ce=0.1``, ``kd=0.9``; the ``T^2``
    factor keeps soft-target gradients on the scale of the hard ones.
    """

    name = "kd"
    paper = "Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. NIPS-W 2015"
    summary = "match temperature-softened teacher class probabilities (KL on logits)"
    uses = ("logits",)

    def __init__(self, ctx: MethodContext, *, T: float = 4.0, kd: float = 0.9, ce: float = 0.1):
        super().__init__(ctx)
        check_positive(self.name, T=T)
        self.T, self.kd, self.ce = float(T), float(kd), float(ce)

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        s, t = pair(student, teacher, "logits")
        terms: dict[str, torch.Tensor] = {}
        with no_autocast(s):
            terms["kd"] = self.kd * kd_loss(s, t, self.T)
            add_ce(terms, s, batch.labels, self.ce)
        return terms
