"""Cross-entropy on the labels alone: the baseline arm, as mdistiller's ``Vanilla``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..data.base import Batch
from ._common import add_ce, full, no_autocast
from .base import Method, MethodContext, register_method


@register_method
class CE(Method):
    """``ce * CE(student_logits, labels)``; reads no teacher tap, so no teacher forward runs."""

    name = "ce"
    paper = "(no distillation: supervised training on the labels)"
    summary = "cross-entropy on labels only (no teacher): the baseline arm"
    uses = ("logits",)
    needs_teacher = False

    def __init__(self, ctx: MethodContext, *, ce: float = 1.0):
        super().__init__(ctx)
        self.ce = float(ce)

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], batch: Batch, epoch: int) -> dict[str, torch.Tensor]:
        s = full(student["logits"])
        terms: dict[str, torch.Tensor] = {}
        with no_autocast(s):
            add_ce(terms, s, batch.labels, self.ce)
        return terms
