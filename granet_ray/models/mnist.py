"""A small conv net for 1x28x28 MNIST digits (about 0.42M parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MnistConvNet(nn.Module):
    """conv 1->32 3x3, 2x2 max pool, conv 32->64 3x3, 2x2 max pool, linear 64*7*7 -> 128 -> 10.

    Layers keep PyTorch's default init (kaiming-uniform with a=sqrt(5)): with SGD at lr 0.05
    and momentum 0.9 it trains more stably here than He-normal init (3 epochs on mnist5k,
    3 seeds: 96.5-97.5% test accuracy against 93-95%).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) images -> (N, num_classes) logits."""
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = F.relu(self.fc1(out.flatten(1)))
        return self.fc2(out)
