"""A user's own model, unknown to the zoo: plain nn.Sequential, no special forward."""

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
