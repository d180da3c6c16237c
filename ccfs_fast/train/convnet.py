"""The ConvNet of dataset distillation (conv 3x3, instance norm, ReLU, 2x2 average pooling; a linear head)."""
from __future__ import annotations

import torch
from torch import nn

from beton_builder.base.errors import ModelError


class ConvNet(nn.Module):
    """depth x [conv 3x3 (width), instance norm (GroupNorm with one group per channel), ReLU,
    2x2 avg-pool], then a linear head on the flattened (side / 2^depth)^2 * width features."""

    def __init__(self, num_classes: int, side: int, width: int = 128, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        feat_side = side // (2 ** depth)
        if feat_side < 1:
            raise ModelError(f"images of side {side} are too small for a depth-{depth} ConvNet")
        self.classifier = nn.Linear(width * feat_side * feat_side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
