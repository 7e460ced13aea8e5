"""Per-layer density allocation (ERK, uniform) and exact-count seeded initial masks."""

from __future__ import annotations

import math

import torch

from granet_ray.sparsity.seeding import layer_generator


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities (docs/algorithm.md section 1) of weighted mean ``density``.

    Raw score of a layer: sum(shape) / prod(shape). density_l = eps * raw_l with eps solved so
    that sum_l density_l * n_l = density * N; a layer whose density would exceed 1 is made dense
    and eps is solved again over the rest (the largest raw score first), until none exceeds 1.
    """
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / numel[name] for name, shape in shapes.items()}
    total = density * sum(numel.values())
    dense: set[str] = set()
    eps = 0.0
    while len(dense) < len(shapes):
        pool = [name for name in shapes if name not in dense]
        budget = total - sum(numel[name] for name in dense)
        eps = budget / sum(raw[name] * numel[name] for name in pool)
        over = [name for name in pool if eps * raw[name] > 1.0]
        if not over:
            break
        top = max(raw[name] for name in over)
        dense.update(name for name in over if raw[name] == top)
    return {name: 1.0 if name in dense else min(1.0, eps * raw[name]) for name in shapes}


def uniform_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """The same density for every layer."""
    return dict.fromkeys(shapes, density)


def active_count(density: float, numel: int) -> int:
    """round(density * numel): the exact number of active weights of a layer."""
    return min(numel, math.floor(density * numel + 0.5))


def initial_masks(
    shapes: dict[str, tuple[int, ...]],
    densities: dict[str, float],
    seed: int,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Bool masks with exactly round(d_l * n_l) active positions per layer, chosen uniformly
    at random by a generator seeded from (seed, "init", layer name)."""
    masks = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        count = active_count(densities[name], numel)
        order = torch.randperm(numel, generator=layer_generator(seed, "init", name))
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[order[:count]] = True
        masks[name] = flat.view(shape).to(device)
    return masks
