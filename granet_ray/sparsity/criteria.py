"""Prune and regrow criteria: pure functions from scores and bool masks to new bool masks.

Dicts map parameter names to tensors of one layer's shape. Ties always break towards the lower
flat index, so results are deterministic on any device and any number of workers.
"""

from __future__ import annotations

import math

import torch

from granet_ray.sparsity.seeding import layer_generator

Tensors = dict[str, torch.Tensor]

_GUARD = 1e-9  # absorbs binary rounding such as 0.29 * 100 = 28.999999999999996


def kth_largest(flat: torch.Tensor, k: int, *, method: str | None = None) -> torch.Tensor:
    """The k-th largest value (0-d tensor) of a 1-D tensor of n elements, 1 <= k <= n, exactly.

    ``method``: ``kthvalue`` (the default on the CPU) or ``topk`` of the smaller side (the
    default on CUDA, where kthvalue's kernel is slow on large tensors); both give the same
    value, so masks are identical on every device."""
    n = flat.numel()
    method = method or ("kthvalue" if flat.device.type == "cpu" else "topk")
    if method == "kthvalue":
        return torch.kthvalue(flat, n - k + 1).values
    if k <= n - k + 1:
        return torch.topk(flat, k, sorted=False).values.min()
    return torch.topk(flat, n - k + 1, largest=False, sorted=False).values.max()


def keep_top(scores: torch.Tensor, k: int, *, method: str | None = None) -> torch.Tensor:
    """Bool mask (same shape) of the k largest ``scores``; ties go to the lower flat index.
    ``method`` picks how the threshold is found (see ``kth_largest``)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = kth_largest(flat, k, method=method)
    keep = flat > threshold
    ties = torch.nonzero(flat == threshold).reshape(-1)
    keep[ties[: k - int(keep.count_nonzero())]] = True  # the lowest-index ties fill up to k
    return keep.view(scores.shape)


def _masked_magnitude(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|w| where active, -1 where inactive (below every real magnitude)."""
    return torch.where(mask, weight.abs().float(), -1.0)


def global_magnitude_prune(weights: Tensors, masks: Tensors, density: float) -> Tensors:
    """Keep the floor(density * N) active weights of largest |w| across all layers together.

    N counts every element of every layer in ``masks``. Inactive weights are never revived:
    if fewer than that many are active, the masks come back unchanged.
    """
    names = sorted(masks)
    total = sum(masks[n].numel() for n in names)
    keep = math.floor(density * total + _GUARD)
    if keep >= sum(int(masks[n].count_nonzero()) for n in names):
        return {n: masks[n].clone() for n in masks}
    device = masks[names[0]].device
    scores = torch.empty(total, dtype=torch.float32, device=device)
    start = 0
    for n in names:  # filled layer by layer: no second full-size copy
        size = masks[n].numel()
        scores[start : start + size] = _masked_magnitude(weights[n], masks[n]).reshape(-1)
        start += size
    kept = keep_top(scores, keep)
    del scores
    out, start = {}, 0
    for n in names:
        size = masks[n].numel()
        out[n] = kept[start : start + size].view(masks[n].shape)
        start += size
    return out


def layerwise_magnitude_prune(weights: Tensors, masks: Tensors, density: float) -> Tensors:
    """Keep the floor(density * n_l) active weights of largest |w| in each layer alone."""
    out = {}
    for n, mask in masks.items():
        keep = math.floor(density * mask.numel() + _GUARD)
        if keep >= int(mask.count_nonzero()):
            out[n] = mask.clone()
        else:
            out[n] = keep_top(_masked_magnitude(weights[n], mask), keep)
    return out


def regrow_count(fraction: float, active: int) -> int:
    """r_l = ceil(fraction * a_l), never more than a_l."""
    return min(active, math.ceil(fraction * active - _GUARD))


def prune_and_regrow(weights: Tensors, grads: Tensors, masks: Tensors, fraction: float) -> Tensors:
    """Zero-cost neuroregeneration (spec 3b), per layer: remove the r = ceil(fraction * a)
    active weights of smallest |w|, then activate the r inactive positions (the ones just
    removed included) of largest |grad|. ``grads`` may be any regrowth score (random for SET).
    Each layer's active count is unchanged, also when scores are all zero."""
    out = {}
    for n, mask in masks.items():
        active = int(mask.count_nonzero())
        r = regrow_count(fraction, active)
        if r == 0:
            out[n] = mask.clone()
            continue
        kept = keep_top(_masked_magnitude(weights[n], mask), active - r)
        # non-finite gradients (an AMP overflow step) count as 0 so the layer never shrinks
        grow = torch.nan_to_num(grads[n].abs().float(), nan=0.0, posinf=0.0)
        grow_scores = torch.where(kept, -1.0, grow)
        out[n] = kept | keep_top(grow_scores, r)
    return out


def random_scores(masks: Tensors, seed: int, update: int) -> Tensors:
    """Uniform [0, 1) scores per layer from a generator seeded by (seed, update, layer name):
    the regrowth score of SET."""
    return {
        n: torch.rand(m.shape, generator=layer_generator(seed, update, n)).to(m.device)
        for n, m in masks.items()
    }
