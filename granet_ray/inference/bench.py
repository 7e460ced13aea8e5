"""Latency of a converted model against dense torch: whole model and layer by layer.

Used by ``granet-ray ckpt bench`` and ``benchmarks/bench_inference.py``. Per layer, the
dense and sparse latencies are the ones each layer measured on its real input when it chose
its path (the fastest of ``layer_repeats`` calls each); the whole model is timed ``repeats``
times, dense and converted alternating, so both see the same machine load.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from granet_ray.inference.convert import apply_masks, convert, layer_report
from granet_ray.inference.modules import SparseConv2d, SparseLinear, best_time
from granet_ray.sparsity.layers import unwrap


@dataclass
class LayerBench:
    """One Conv / Linear layer at one batch size.

    Attributes:
        name: Module name.
        kind: ``"3x3"``, ``"1x1"``, ``"fc"``... (see ``layer_kind``).
        density: Fraction of nonzero weights.
        kernel: Path chosen: ``"sparse"`` or ``"dense"`` (``"dense"`` also when not converted).
        dense_s: Dense latency, seconds (None for a layer not converted).
        sparse_s: Sparse kernel latency, seconds (None for a layer not converted).
        csr_s: ``torch.sparse`` CSR matmul latency (im2col for KxK), seconds, when measured.
        reason: Why the layer was not converted, or None.
    """

    name: str
    kind: str
    density: float
    kernel: str
    dense_s: float | None = None
    sparse_s: float | None = None
    csr_s: float | None = None
    reason: str | None = None

    @property
    def chosen_s(self) -> float | None:
        """Latency of the chosen path, seconds."""
        return self.sparse_s if self.kernel == "sparse" else self.dense_s


@dataclass
class ModelBench:
    """A whole model at one batch size and thread count.

    Attributes:
        batch: Batch size.
        threads: Threads (``torch.get_num_threads()`` during the runs).
        dense_s: Per repeat latency of the dense masked model (BatchNorm not folded), seconds.
        sparse_s: Per repeat latency of the converted model, seconds.
        layers: Layer by layer figures.
    """

    batch: int
    threads: int
    dense_s: list[float]
    sparse_s: list[float]
    layers: list[LayerBench] = field(default_factory=list)

    @property
    def speedups(self) -> list[float]:
        """Dense over converted latency of each repeat pair."""
        return [d / s for d, s in zip(self.dense_s, self.sparse_s, strict=True)]

    @property
    def speedup(self) -> float:
        """Median of ``speedups``."""
        return statistics.median(self.speedups)

    @property
    def best_speedup(self) -> float:
        """Fastest dense over fastest converted run: the figure least moved by other load."""
        return min(self.dense_s) / min(self.sparse_s)


def _csr_time(module: nn.Module, shape: tuple[int, ...], repeats: int) -> float | None:
    """Latency of the layer through ``torch.sparse`` CSR matmul (im2col for KxK convs)."""
    weight = module.weight.reshape(module.weight.shape[0], -1).to_sparse_csr()
    x = torch.randn(shape)
    if isinstance(module, SparseLinear):
        return best_time(lambda: (weight @ x.reshape(-1, shape[-1]).t()).t(), repeats)
    if module.groups != 1:
        return None
    n, c, h, w = shape
    if (
        module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
    ):

        def run() -> torch.Tensor:
            y = weight @ x.transpose(0, 1).reshape(c, n * h * w)
            return y.view(-1, n, h, w).transpose(0, 1)

        return best_time(run, repeats)
    probe = module.dense(x[:1])
    out_h, out_w = probe.shape[-2:]
    padding = module.padding if not isinstance(module.padding, str) else module._pads()[::2]

    def run_unfold() -> torch.Tensor:
        cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        return torch.stack([weight @ cols[i] for i in range(n)]).view(n, -1, out_h, out_w)

    return best_time(run_unfold, repeats)


def _layers(model: nn.Module, batch: int, csr_repeats: int) -> list[LayerBench]:
    modules = dict(model.named_modules())
    rows = []
    for entry in layer_report(model):
        if entry.dense_reason is not None:
            rows.append(
                LayerBench(
                    entry.name, entry.kind, entry.density, "dense", reason=entry.dense_reason
                )
            )
            continue
        for shape, choice in entry.choices.items():
            if not shape or shape[0] != batch:
                continue
            csr = _csr_time(modules[entry.name], shape, csr_repeats) if csr_repeats else None
            rows.append(
                LayerBench(
                    entry.name,
                    entry.kind,
                    entry.density,
                    choice.kernel,
                    choice.dense_s,
                    choice.sparse_s,
                    csr,
                )
            )
    return rows


def benchmark(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    sample_shape: Sequence[int],
    *,
    batches: Sequence[int] = (1, 32),
    threads: int | None = None,
    repeats: int = 5,
    layer_repeats: int = 5,
    csr_repeats: int = 0,
    converted: nn.Module | None = None,
) -> list[ModelBench]:
    """Time a model dense and converted, whole and per layer, at each batch size.

    Args:
        model: The model (its weights; masks applied to a copy).
        masks: Weight name to bool mask, or None for the zeros of the weights.
        sample_shape: One input's shape without the batch, e.g. ``(3, 224, 224)``.
        batches: Batch sizes.
        threads: Threads to run on (restored afterwards); None keeps the current setting.
        repeats: Whole-model timings per path and batch.
        layer_repeats: Timed calls per path when each layer chooses.
        csr_repeats: Timed calls of ``torch.sparse`` CSR per layer; 0 skips that measurement.
        converted: The model already converted (``convert(model, masks)``), to reuse.

    Returns:
        One entry per batch size.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dense = copy.deepcopy(unwrap(model)).cpu().float().eval()
        if masks is not None:
            apply_masks(dense, masks)
        fast = converted if converted is not None else convert(model, masks)
        for module in fast.modules():
            if isinstance(module, (SparseConv2d, SparseLinear)):
                module.timing_repeats = layer_repeats
        results = []
        with torch.inference_mode():
            for batch in batches:
                x = torch.randn(batch, *sample_shape)
                fast(x)  # each layer chooses its path for this shape
                dense(x)
                dense_s, sparse_s = [], []
                for _ in range(repeats):
                    for fn, out in ((dense, dense_s), (fast, sparse_s)):
                        start = time.perf_counter()
                        fn(x)
                        out.append(time.perf_counter() - start)
                layers = _layers(fast, batch, csr_repeats)
                results.append(
                    ModelBench(batch, torch.get_num_threads(), dense_s, sparse_s, layers)
                )
        return results
    finally:
        torch.set_num_threads(previous)


def by_kind(layers: Sequence[LayerBench]) -> dict[str, dict[str, float | int]]:
    """Sum of latencies per layer kind over the converted layers.

    Args:
        layers: Layer figures of one model run.

    Returns:
        Kind to ``{"layers", "sparse_layers", "dense_s", "chosen_s", "sparse_s", "csr_s"}``
        (``csr_s`` only when every layer of the kind has a CSR timing).
    """
    kinds: dict[str, dict[str, float | int]] = {}
    for layer in layers:
        if layer.dense_s is None or layer.sparse_s is None:
            continue
        row = kinds.setdefault(
            layer.kind,
            {"layers": 0, "sparse_layers": 0, "dense_s": 0.0, "chosen_s": 0.0, "sparse_s": 0.0},
        )
        row["layers"] += 1
        row["sparse_layers"] += layer.kernel == "sparse"
        row["dense_s"] += layer.dense_s
        row["sparse_s"] += layer.sparse_s
        row["chosen_s"] += layer.chosen_s or 0.0
        if layer.csr_s is not None and row.get("csr_s", 0.0) is not None:
            row["csr_s"] = row.get("csr_s", 0.0) + layer.csr_s
        else:
            row["csr_s"] = None
    return {k: {n: v for n, v in row.items() if v is not None} for k, row in kinds.items()}
