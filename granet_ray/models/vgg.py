"""VGG-19 with batch norm for CIFAR, the variant of the lottery-ticket and GraNet papers.

Sixteen 3x3 conv-BN-ReLU layers (no pool after the last stage: 2x2 maps of 512 channels), a
2x2 average pool, and one linear classifier 512 -> num_classes. About 20.0M parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from granet_ray.models.init import kaiming_init

VGG19_PLAN: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512,
)  # fmt: skip


class VGG19BN(nn.Module):
    """VGG-19-BN for 3x32x32 input."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for spec in VGG19_PLAN:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(spec, int)
                layers += [
                    nn.Conv2d(in_channels, spec, 3, padding=1),
                    nn.BatchNorm2d(spec),
                    nn.ReLU(inplace=True),
                ]
                in_channels = spec
        self.features = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(in_channels, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) images -> (N, num_classes) logits."""
        return self.fc(self.pool(self.features(x)).flatten(1))
