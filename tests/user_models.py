"""A user's own model, unknown to the zoo: plain nn.Sequential, no special forward."""

import os

from torch import nn


def make_net(num_classes: int, in_channels: int = 1, width: int = 8) -> nn.Module:
    w = width
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * w, num_classes),
    )


class _DyingSequential(nn.Sequential):
    """``nn.Sequential`` that kills its process (``os._exit``, no cleanup: like SIGKILL) at the N-th
    training-mode forward of the process when ``INDISTILL_TEST_DIE_AT=N`` is set: a deterministic
    mid-stage kill for resume tests.

    With ``INDISTILL_TEST_NAN_AT=N`` (and ``INDISTILL_TEST_NAN_RANK=R``: only on torchrun rank R) the
    N-th training-mode forward returns NaN instead: a loss that breaks on one rank only.

    With ``INDISTILL_TEST_ABORT_AT=N`` and ``INDISTILL_TEST_ABORT_ONCE=PATH``, rank 1 aborts (SIGABRT,
    as a gloo failure does) at its N-th training-mode forward unless PATH exists, which it creates
    first: one crash, then a restarted rank runs through."""

    calls = 0

    def forward(self, x):
        die_at = os.environ.get("INDISTILL_TEST_DIE_AT")
        nan_at = os.environ.get("INDISTILL_TEST_NAN_AT")
        abort_at = os.environ.get("INDISTILL_TEST_ABORT_AT")
        if (die_at or nan_at or abort_at) and self.training:
            _DyingSequential.calls += 1
            if die_at and _DyingSequential.calls >= int(die_at):
                os._exit(3)
            if (nan_at and _DyingSequential.calls == int(nan_at)
                    and os.environ.get("RANK", "0") == os.environ.get("INDISTILL_TEST_NAN_RANK", os.environ.get("RANK", "0"))):
                return super().forward(x) * float("nan")
            marker = os.environ.get("INDISTILL_TEST_ABORT_ONCE", "")
            if (abort_at and _DyingSequential.calls == int(abort_at) and os.environ.get("RANK") == "1"
                    and marker and not os.path.exists(marker)):
                open(marker, "w").close()
                os.abort()
        return super().forward(x)


def make_nobn_net(num_classes: int, in_channels: int = 1, width: int = 8) -> nn.Module:
    """:func:`make_net` without BatchNorm: data-parallel training of it equals one process's
    (BatchNorm statistics are per rank unless synchronised)."""
    w = width
    return _DyingSequential(
        nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * w, num_classes),
    )
