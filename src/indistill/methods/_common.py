"""Small helpers shared by the method files (not public API)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import MethodContext, Shape

_LOW = (torch.float16, torch.bfloat16)


def full(x: torch.Tensor) -> torch.Tensor:
    """Up-cast half-precision tensors: relational losses (Gram matrices, exp(x/0.07), logs) overflow in fp16."""
    return x.float() if x.dtype in _LOW else x


@contextlib.contextmanager
def no_autocast(x: torch.Tensor) -> Iterator[None]:
    """Run the loss maths outside autocast so AMP does not push it back to fp16."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


def pair(student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor], tap: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, detached teacher) tensors of one tap, in full precision."""
    return full(student[tap]), full(teacher[tap].detach())


def as_4d(x: torch.Tensor) -> torch.Tensor:
    """View an (N, C) tap as (N, C, 1, 1) so 1x1-conv heads also work on flat taps."""
    return x.reshape(x.shape[0], -1, 1, 1) if x.dim() == 2 else x


def channels(shape: Shape) -> int:
    return int(shape[0])


def spatial(shape: Shape) -> tuple[int, ...]:
    return tuple(shape[1:])


def stage_taps(ctx: MethodContext, method: str) -> list[str]:
    if not ctx.stage_taps:
        raise UserError(f"method '{method}' needs stage taps (stage1..stageN); declare them in the model's taps")
    return list(ctx.stage_taps)


def check_spatial(ctx: MethodContext, tap: str, method: str) -> None:
    """Spatial sizes of an aligned tap must match: we never resize silently."""
    s, t = ctx.student_shapes[tap], ctx.teacher_shapes[tap]
    if spatial(s) != spatial(t):
        raise UserError(
            f"method '{method}': tap '{tap}' has student shape {tuple(s)} but teacher shape {tuple(t)}; "
            f"spatial sizes must match (tap layers of equal resolution)"
        )


def check_positive(method: str, **values: float) -> None:
    for k, v in values.items():
        if not v > 0:
            raise UserError(f"method '{method}': parameter '{k}' must be > 0, got {v}")


def check_choice(method: str, name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"method '{method}': parameter '{name}' must be one of {', '.join(choices)}, got '{value}'")


def add_ce(terms: dict[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor, weight: float) -> None:
    """Add the weighted cross-entropy term when its weight is non-zero."""
    if weight:
        terms["ce"] = weight * F.cross_entropy(full(logits), labels)
