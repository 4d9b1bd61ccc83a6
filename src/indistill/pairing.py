"""Which teacher tap pairs with which student tap (stage taps, shallow to deep)."""

from __future__ import annotations

from torch import nn

from .errors import UserError, suggest
from .models import model_taps

PASSTHROUGH = ("embedding", "logits")


def stage_taps(model: nn.Module) -> list[str]:
    """The intermediate tap names of a model, shallow to deep."""
    return [k for k in model_taps(model) if k not in PASSTHROUGH]


def pair_stage_taps(teacher: nn.Module, student: nn.Module, explicit: dict[str, str] | None) -> dict[str, str]:
    """Teacher tap -> student tap: ``explicit`` (``warmup.pairs``) or the stage taps both models share by name."""
    t_taps, s_taps = model_taps(teacher), model_taps(student)
    if explicit:
        for t, s in explicit.items():
            if t not in t_taps:
                raise UserError(f"warmup.pairs: teacher has no tap '{t}'{suggest(t, t_taps)}; its taps: {', '.join(t_taps)}")
            if s not in s_taps:
                raise UserError(f"warmup.pairs: student has no tap '{s}'{suggest(s, s_taps)}; its taps: {', '.join(s_taps)}")
        return dict(explicit)
    shared = [t for t in stage_taps(teacher) if t in stage_taps(student)]
    if not shared:
        raise UserError(
            "teacher and student share no stage tap names; give warmup.pairs "
            f"(teacher taps: {', '.join(stage_taps(teacher)) or 'none'}; "
            f"student taps: {', '.join(stage_taps(student)) or 'none'})"
        )
    return {t: t for t in shared}
