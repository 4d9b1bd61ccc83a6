"""Argument checks and weight init shared by the zoo models.

The zoo's own models use out-of-place ReLUs on purpose: a forward hook that
captures a BatchNorm or conv output (pruning, custom taps) must not see it
overwritten by the next layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...errors import UserError


def check_io(num_classes: int, in_channels: int) -> None:
    """Reject non-positive class / channel counts with a one-line fix."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise UserError(f"in_channels must be a positive integer (1 for grayscale, 3 for RGB), got {in_channels!r}")


def check_widths(name: str, widths: Sequence[int], n: int) -> tuple[int, ...]:
    """Return ``widths`` as a tuple of ``n`` positive ints or raise ``UserError``."""
    widths = tuple(widths)
    if len(widths) != n or not all(isinstance(w, int) and w > 0 for w in widths):
        raise UserError(f"{name} must be {n} positive integers, got {widths!r}")
    return widths


def kaiming_init(model: nn.Module) -> None:
    """He init (fan_out) for convs, unit BatchNorm: the init of the CIFAR KD reference code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools channels-last when no gradient is needed (CPU only).

    Why: on CPU, ATen's contiguous (NCHW) max-pool kernel is 5-10x slower than its
    channels-last one for the small maps of the CIFAR-size zoo (measured 3.5 ms vs
    0.5 ms for a 128x8x30x30 batch on 2 cores), and a frozen teacher's forward in
    every KD or warmup step, and feature extraction, run without gradients. The
    result is the same tensor (max is exact) in the input's memory format. With
    gradients the plain kernel is kept: its backward is faster than the
    channels-last one plus the layout copies.
    """

    def forward(self, x):  # type: ignore[override]
        if (
            x.device.type == "cpu"
            and x.dim() == 4
            and x.is_contiguous()
            and not (torch.is_grad_enabled() and x.requires_grad)
        ):
            return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return super().forward(x)
