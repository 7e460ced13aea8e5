"""FLOPs of Conv / Linear layers, dense and relative to dense (docs/algorithm.md section 6).

A layer's forward FLOPs per sample are 2 x (weight elements) x (output positions): each weight
is used once per output position (the spatial size for a conv, 1 for a plain linear layer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from granet_ray.sparsity.layers import weight_layers


def forward_flops(module: nn.Module, output: torch.Tensor) -> float:
    """Dense forward FLOPs per sample of a Conv*d / Linear ``module`` given its output
    (batch first; conv output (B, C, *spatial), linear output (B, ..., out))."""
    weight_numel = module.weight.numel()
    if isinstance(module, nn.Linear):
        positions = math.prod(output.shape[1:-1])
    else:
        positions = math.prod(output.shape[2:])
    return 2.0 * weight_numel * positions


def relative_flops(flops: dict[str, float], densities: dict[str, float]) -> float:
    """sum_l f_l d_l / sum_l f_l; a layer missing from ``densities`` counts as dense."""
    total = sum(flops.values())
    if total == 0:
        return 1.0
    return sum(f * densities.get(n, 1.0) for n, f in flops.items()) / total


class FlopsRecorder:
    """Measures every Conv / Linear layer's dense forward FLOPs on the model's first eager
    forward pass (forward hooks that remove themselves), keyed by weight name.

    While torch.compile traces, the hooks do nothing: a hook that removes itself inside a
    traced forward would split the compiled graph for good. A compiled model is measured by
    one eager forward before its first call (``measure``)."""

    def __init__(self, model: nn.Module) -> None:
        self.flops: dict[str, float] = {}
        self._handles = []
        for name, module in weight_layers(model).items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def record(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            if torch.compiler.is_compiling():
                return
            if name not in self.flops:
                self.flops[name] = forward_flops(module, output)
            if len(self.flops) == len(self._handles):
                self.remove()

        return record

    @torch.no_grad()
    def measure(self, model: nn.Module, sample: torch.Tensor) -> None:
        """Record the FLOPs now: one eager forward of the input batch ``sample`` through the
        plain ``model`` in eval mode (no batch-norm statistics change), without gradients;
        the model's training mode is restored."""
        training = model.training
        model.eval()
        try:
            model(sample)
        finally:
            model.train(training)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
