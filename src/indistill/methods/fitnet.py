"""FitNets: hint-based training of an intermediate student layer."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import Batch
from ..errors import UserError, suggest
from ._common import add_ce, as_4d, channels, check_spatial, no_autocast, pair, stage_taps
from .base import Method, MethodContext, register_method


@register_method
class FitNet(Method):
    """Hint loss: MSE between a regressed student stage and the teacher's same stage.

    The regressor is the CRD benchmark's for equal spatial sizes: 1x1 conv
    (student -> teacher channels) + BatchNorm + ReLU (flat taps are treated as
    1x1 maps). Spatial sizes must match (no silent resizing).

    Parameters: ``hint_tap`` (default: the middle of ``ctx.stage_taps``, i.e.
    index ``len // 2``, CRD's ``hint_layer=2`` for 3-stage nets),
    ``weight=100`` (CRD ``-b 100``), ``ce=1``.
    """

    name = "fitnet"
    paper = "Romero et al. FitNets: Hints for Thin Deep Nets. ICLR 2015"
    summary = "MSE between a regressed middle student stage and the teacher's (hint)"
    uses = ("logits", "stages")

    def __init__(self, ctx: MethodContext, *, hint_tap: str | None = None, weight: float = 100.0, ce: float = 1.0):
        super().__init__(ctx)
        taps = stage_taps(ctx, self.name)
        if hint_tap is None:
            hint_tap = taps[len(taps) // 2]
        if hint_tap not in taps:
            raise UserError(
                f"method 'fitnet': hint_tap '{hint_tap}' is not a stage tap{suggest(hint_tap, taps)}; choose one of {', '.join(taps)}"
            )
        check_spatial(ctx, hint_tap, self.name)
        self.hint_tap, self.weight, self.ce = hint_tap, float(weight), float(ce)
        c_s, c_t = channels(ctx.student_shapes[hint_tap]), channels(ctx.teacher_shapes[hint_tap])
        self.regressor = nn.Sequential(nn.Conv2d(c_s, c_t, kernel_size=1), nn.BatchNorm2d(c_t), nn.ReLU(inplace=True))

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        s, t = pair(student, teacher, self.hint_tap)
        terms: dict[str, torch.Tensor] = {}
        with no_autocast(s):
            s = self.regressor(as_4d(s).to(self.regressor[0].weight.dtype))
            terms["fitnet"] = self.weight * F.mse_loss(s, as_4d(t).to(s.dtype))
            add_ce(terms, student["logits"], batch.labels, self.ce)
        return terms
