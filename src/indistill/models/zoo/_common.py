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


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Max-pool an NCHW tensor with ATen's channels-last kernels, forward and backward."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        xc = x.contiguous(memory_format=torch.channels_last)
        y, idx = torch.ops.aten.max_pool2d_with_indices(xc, kernel_size, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(xc, idx)
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)
        return y.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        xc, idx = ctx.saved_tensors
        g = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(memory_format=torch.channels_last), xc, *ctx.args, idx
        )
        return g.contiguous(), None, None, None, None, None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that runs ATen's channels-last kernels on contiguous CPU input.

    Why: on CPU the contiguous (NCHW) max-pool kernels are several times slower
    than the channels-last ones for the small maps of the CIFAR-size zoo
    (forward and backward alike), while the convolutions and
    BatchNorm around it are fastest in NCHW. The layout copies cost less than
    the difference. Output and gradient are the same tensors as the plain
    module's (max and its argmax are exact); elsewhere (and while traced for export) the plain module runs.
    """

    def forward(self, x):  # type: ignore[override]
        # Tracing (TorchScript, ONNX export) cannot record a Python autograd.Function: the plain op there.
        if (x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous() and not self.return_indices
                and not torch.jit.is_tracing()):
            stride = self.stride if self.stride is not None else self.kernel_size
            return _ChannelsLastMaxPool.apply(
                x, _pair(self.kernel_size), _pair(stride), _pair(self.padding), _pair(self.dilation), self.ceil_mode
            )
        return super().forward(x)
