"""Fast CPU inference for sparse models: ``convert(model, masks)`` swaps every sparse enough
``Conv2d`` / ``Linear`` for one that runs a sparse kernel where that is faster.

    ckpt = load_sparse(uri, model=model)
    fast = convert(model, ckpt.masks)

Importing this package loads no Ray; the kernels are compiled at first use (``kernels``).
"""

from __future__ import annotations

from granet_ray.inference.convert import (
    LayerChoice,
    convert,
    fold_batchnorm,
    fuse_epilogues,
    layer_kind,
    layer_report,
)
from granet_ray.inference.kernels import KernelBuildError
from granet_ray.inference.modules import Choice, SparseConv2d, SparseLinear

__all__ = [
    "Choice",
    "KernelBuildError",
    "LayerChoice",
    "SparseConv2d",
    "SparseLinear",
    "convert",
    "fold_batchnorm",
    "fuse_epilogues",
    "layer_kind",
    "layer_report",
]
