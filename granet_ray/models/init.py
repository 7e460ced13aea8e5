"""He et al. 2015 weight initialisation used by the CIFAR models."""

from __future__ import annotations

from torch import nn


def kaiming_init(model: nn.Module) -> None:
    """He et al. 2015 init (normal, fan-in, ReLU gain) for conv and linear weights.

    Biases are zeroed; batch-norm layers start at weight 1, bias 0.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
