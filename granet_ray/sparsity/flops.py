"""FLOPs of the prunable candidates (Conv, Linear, attention projections), dense and relative
to dense (docs/algorithm.md section 6).

A layer's forward FLOPs per sample are 2 x (weight elements) x (output positions): each weight
is used once per output position (the spatial size for a conv, the leading positions of a
linear layer's output such as tokens, 1 for a plain linear layer). An attention's q and output
projections run over the query positions, its k and v projections over the key positions. A
weight that several modules use counts each use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from granet_ray.sparsity.layers import candidate_weights, unwrap, weight_table


def forward_flops(module: nn.Module, output: torch.Tensor) -> float:
    """Dense forward FLOPs per sample of a Conv*d / Linear ``module`` given its output
    (batch first; conv output (B, C, *spatial), linear output (B, ..., out))."""
    weight_numel = module.weight.numel()
    if isinstance(module, nn.Linear):
        positions = math.prod(output.shape[1:-1])
    else:
        positions = math.prod(output.shape[2:])
    return 2.0 * weight_numel * positions


def attention_flops(
    module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor
) -> dict[int, float]:
    """Dense forward FLOPs per sample of an attention's projection weights, by parameter
    ``id``: q over the query positions, k and v over the key positions, the output projection
    (which the attention applies itself, never calling its ``out_proj`` module) over the
    query positions. ``query`` / ``key``: its inputs, batched or not."""
    axis = 1 if module.batch_first and query.dim() == 3 else 0
    q_len, k_len = query.shape[axis], key.shape[axis]
    flops: dict[int, float] = {}
    if module.in_proj_weight is not None:  # rows: q, then k, then v
        third = module.in_proj_weight.numel() / 3
        flops[id(module.in_proj_weight)] = 2.0 * third * (q_len + 2 * k_len)
    else:
        flops[id(module.q_proj_weight)] = 2.0 * module.q_proj_weight.numel() * q_len
        flops[id(module.k_proj_weight)] = 2.0 * module.k_proj_weight.numel() * k_len
        flops[id(module.v_proj_weight)] = 2.0 * module.v_proj_weight.numel() * k_len
    flops[id(module.out_proj.weight)] = 2.0 * module.out_proj.weight.numel() * q_len
    return flops


def relative_flops(flops: dict[str, float], densities: dict[str, float]) -> float:
    """sum_l f_l d_l / sum_l f_l; a layer missing from ``densities`` counts as dense."""
    total = sum(flops.values())
    if total == 0:
        return 1.0
    return sum(f * densities.get(n, 1.0) for n, f in flops.items()) / total


class FlopsRecorder:
    """Measures every candidate weight's dense forward FLOPs (``sparsity.layers``:
    Conv, Linear, attention projections, prunable or kept dense) on the model's first eager
    forward pass, by forward hooks on the modules that use them (which remove themselves once
    each has run), keyed by parameter name; a weight several modules use sums their uses.

    While torch.compile traces, the hooks do nothing: a hook that removes itself inside a
    traced forward would split the compiled graph for good. A compiled model is measured by
    one eager forward before its first call (``measure``)."""

    def __init__(self, model: nn.Module) -> None:
        self.flops: dict[str, float] = {}
        self._handles = []
        self._uses: dict[tuple[str, int], float] = {}  # (weight name, module id) -> FLOPs
        self._expected: set[tuple[str, int]] = set()
        names = {id(w.param): n for n, w in weight_table(model).items()}
        modules = list(unwrap(model).modules())
        inner = {
            id(m.out_proj) for m in modules if isinstance(m, nn.MultiheadAttention)
        }  # applied by their attention, never called as modules
        for module in modules:
            if id(module) in inner:
                continue
            used = {id(p): names[id(p)] for p in self._weights(module) if id(p) in names}
            if not used:
                continue
            self._expected.update((n, id(module)) for n in used.values())
            if isinstance(module, nn.MultiheadAttention):
                hook = module.register_forward_hook(self._attention_hook(used), with_kwargs=True)
            else:
                hook = module.register_forward_hook(self._hook(used))
            self._handles.append(hook)

    @staticmethod
    def _weights(module: nn.Module) -> list[torch.Tensor]:
        weights = [getattr(module, attr) for attr, _ in candidate_weights(module)]
        if isinstance(module, nn.MultiheadAttention):
            weights.append(module.out_proj.weight)
        return weights

    def _record(self, module: nn.Module, flops: dict[int, float], used: dict[int, str]) -> None:
        for pid, name in used.items():
            key = (name, id(module))
            if key not in self._uses and pid in flops:
                self._uses[key] = flops[pid]
                self.flops[name] = self.flops.get(name, 0.0) + flops[pid]
        if self._expected <= self._uses.keys():
            self.remove()

    def _hook(self, used: dict[int, str]):
        def record(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            if torch.compiler.is_compiling():
                return
            self._record(module, {pid: forward_flops(module, output) for pid in used}, used)

        return record

    def _attention_hook(self, used: dict[int, str]):
        def record(
            module: nn.MultiheadAttention, args: tuple, kwargs: dict, _output: object
        ) -> None:
            if torch.compiler.is_compiling():
                return
            query = args[0] if args else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            self._record(module, attention_flops(module, query, key), used)

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
