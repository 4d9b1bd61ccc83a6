"""Decoupled KD: target-class and non-target-class parts of the KD loss, weighted apart."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..data.base import Batch
from ..errors import UserError
from ._common import add_ce, check_positive, no_autocast, pair
from .base import Method, MethodContext, register_method


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, T: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted ``(TCKD, NCKD)``, each ``T^2``-scaled and batch-averaged.

    TCKD is the KL between the binary (target, rest) distributions; NCKD the KL
    between the distributions over the non-target classes alone. Computed in
    log space, so no ``log(0)``.
    """
    s, t = student_logits / T, teacher_logits / T
    n, c = s.shape
    gt = F.one_hot(labels, c).bool()

    def binary_log(z: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(z, dim=1)
        log_gt = z[gt] - lse
        log_rest = torch.logsumexp(z[~gt].view(n, c - 1), dim=1) - lse
        return torch.stack([log_gt, log_rest], dim=1)

    b_s, b_t = binary_log(s), binary_log(t)
    tckd = F.kl_div(b_s, b_t, reduction="batchmean", log_target=True) * T * T
    nt_s = F.log_softmax(s[~gt].view(n, c - 1), dim=1)
    nt_t = F.log_softmax(t[~gt].view(n, c - 1), dim=1)
    nckd = F.kl_div(nt_s, nt_t, reduction="batchmean", log_target=True) * T * T
    return tckd, nckd


@register_method
class DKD(Method):
    """DKD: ``ce * CE + r(epoch) * (alpha * TCKD + beta * NCKD)``.

    ``r`` ramps the KD part linearly to 1 over the first ``ramp_epochs`` epochs
    (mdistiller's ``warmup``, renamed here because "warmup" is the InDistill
    stage): ``r = min((epoch + 1) / ramp_epochs, 1)`` with 0-based ``epoch``,
    i.e. mdistiller's ``min(epoch / warmup, 1)`` with its 1-based epochs.
    ``ramp_epochs=0`` disables the ramp. Defaults are mdistiller's CIFAR ones:
    ``alpha=1, beta=8, T=4, ramp_epochs=20, ce=1``.
    """

    name = "dkd"
    paper = "Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation. CVPR 2022"
    summary = "KD split into target-class (TCKD) and non-target-class (NCKD) terms, weighted apart"
    uses = ("logits",)

    def __init__(
        self,
        ctx: MethodContext,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        T: float = 4.0,
        ramp_epochs: int = 20,
        ce: float = 1.0,
    ):
        super().__init__(ctx)
        check_positive(self.name, T=T)
        if ramp_epochs < 0:
            raise UserError(f"method 'dkd': ramp_epochs must be >= 0, got {ramp_epochs}")
        if ctx.num_classes < 2:
            raise UserError("method 'dkd' needs at least 2 classes")
        self.alpha, self.beta, self.T, self.ramp_epochs, self.ce = float(alpha), float(beta), float(T), int(ramp_epochs), float(ce)

    def ramp(self, epoch: int) -> float:
        """The KD-part factor at 0-based ``epoch``."""
        return 1.0 if self.ramp_epochs == 0 else min((epoch + 1) / self.ramp_epochs, 1.0)

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        s, t = pair(student, teacher, "logits")
        terms: dict[str, torch.Tensor] = {}
        with no_autocast(s):
            tckd, nckd = dkd_terms(s, t, batch.labels, self.T)
            r = self.ramp(epoch)
            terms["tckd"] = r * self.alpha * tckd
            terms["nckd"] = r * self.beta * nckd
            add_ce(terms, s, batch.labels, self.ce)
        return terms
