"""Prune and regrow criteria: pure functions from scores and bool masks to new bool masks.

Dicts map parameter names to tensors of one layer's shape. Equal scores that straddle a cut
break by a random key per position (``TieBreak``, docs/algorithm.md section 5): the keys
come from a stream seeded by (run seed, update index, layer name), so the choice among the
tied is uniform, yet the same on every worker and every device. Nothing here waits for the
device when the caller passes the active counts it already knows (``active``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from granet_ray.sparsity.seeding import layer_seed, random_keys, random_keys_at

Tensors = dict[str, torch.Tensor]
# The keys of a selection at given flat positions (None: at every position).
KeySource = Callable[[torch.Tensor | None], torch.Tensor]
# On the CPU a host sync costs nothing, so a selection gathers the positions tied at its
# threshold and computes keys for those alone (the same masks, a fraction of the hashing).
# False runs the device path, the one CUDA takes, on the CPU too (tests count its syncs).
GATHER_TIES_ON_CPU = True

_GUARD = 1e-9  # absorbs binary rounding such as 0.29 * 100 = 28.999999999999996
_KEY_BITS = 31  # random_keys are below 2**31; a float32 score's order takes the 32 above


@dataclass(frozen=True)
class TieBreak:
    """The tie-break keys of the mask update ``update`` of a run seeded with ``seed``.

    ``keys(name, purpose, numel, device)``: one key per flat position of layer ``name``,
    from ``layer_seed(seed, "<update>/ties/<purpose>", name)``; each selection of an update
    (``prune``, ``drop``, ``grow``) draws its own keys."""

    seed: int
    update: int

    def keys(
        self, name: str, purpose: str, numel: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        seed = layer_seed(self.seed, f"{self.update}/ties/{purpose}", name)
        return random_keys(seed, numel, device)

    def source(
        self, names: Sequence[str], sizes: Sequence[int], purpose: str, device: torch.device
    ) -> KeySource:
        """The keys of layers ``names`` (of ``sizes`` elements) laid end to end, as a
        ``KeySource``: every key (None), or the keys at given positions of that layout."""
        seeds = [layer_seed(self.seed, f"{self.update}/ties/{purpose}", n) for n in names]

        def keys_at(positions: torch.Tensor | None) -> torch.Tensor:
            if positions is None:
                parts = [random_keys(s, size, device) for s, size in zip(seeds, sizes, strict=True)]
                return parts[0] if len(parts) == 1 else torch.cat(parts)
            out = torch.empty_like(positions)
            start = 0
            for seed, size in zip(seeds, sizes, strict=True):
                inside = (positions >= start) & (positions < start + size)
                out[inside] = random_keys_at(seed, positions[inside] - start)
                start += size
            return out

        return keys_at


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


def ordered_bits(scores: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) in the order of ``scores`` compared as float32 (-0.0 equal
    to 0.0; NaN above +inf): the float's bits, sign handled, so one integer comparison
    orders the scores and a key placed below them breaks their ties."""
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -1 - bits, bits + 2**31)


def _top_of(order: torch.Tensor, k: int, method: str | None) -> torch.Tensor:
    """Bool mask of the k largest of a 1-D int64 ``order``, 0 < k < n; equal values go to
    the lower index. No host sync: the count still missing at the threshold stays a tensor
    and a cumulative sum picks that many of the tied."""
    threshold = kth_largest(order, k, method=method)
    keep = order > threshold
    tied = order == threshold
    keep |= tied & (tied.cumsum(0) <= k - keep.sum())
    return keep


def _top_by_keys(bits: torch.Tensor, k: int, keys: KeySource, method: str | None) -> torch.Tensor:
    """Bool mask of the k largest of ``bits`` (1-D int64 from ``ordered_bits``, 0 < k < n),
    equal values going to the larger key, then to the lower index. On CUDA: one int64 order
    of value and key, no host sync. On the CPU, where a sync costs nothing, the same choice
    made cheaper: the keys are computed only at the positions tied at the threshold."""
    if bits.device.type != "cpu" or not GATHER_TIES_ON_CPU:
        return _top_of((bits << _KEY_BITS) | keys(None), k, method)
    threshold = kth_largest(bits, k, method=method)
    keep = bits > threshold
    tied = (bits == threshold).nonzero().squeeze(1)
    missing = k - int(keep.sum())
    if 0 < missing < tied.numel():
        tied = tied[_top_of(keys(tied), missing, method)]
    if missing > 0:
        keep[tied] = True
    return keep


def keep_top(
    scores: torch.Tensor,
    k: int,
    keys: torch.Tensor | KeySource | None = None,
    *,
    method: str | None = None,
) -> torch.Tensor:
    """Bool mask (same shape) of the k largest ``scores`` (compared as float32). Equal scores
    go to the larger of ``keys`` (int64 in [0, 2**31), one per element, e.g. from
    ``TieBreak``; or a ``KeySource`` giving them), then to the lower flat index; without
    keys, to the lower flat index. ``method`` picks how the threshold is found (see
    ``kth_largest``). No host sync on CUDA."""
    n = scores.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    bits = ordered_bits(scores.reshape(-1))
    if keys is None:
        return _top_of(bits << _KEY_BITS, k, method).view(scores.shape)
    if isinstance(keys, torch.Tensor):
        table = keys.reshape(-1)

        def source(positions: torch.Tensor | None) -> torch.Tensor:
            return table if positions is None else table[positions]

        return _top_by_keys(bits, k, source, method).view(scores.shape)
    return _top_by_keys(bits, k, keys, method).view(scores.shape)


def active_counts(masks: Tensors) -> dict[str, int]:
    """Each mask's number of True entries (one host sync for all of them)."""
    names = list(masks)
    if not names:
        return {}
    counts = torch.stack([masks[n].count_nonzero() for n in names]).tolist()
    return dict(zip(names, counts, strict=True))


def _masked_magnitude(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """|w| where active, -1 where inactive (below every real magnitude)."""
    return torch.where(mask, weight.abs().float(), -1.0)


def global_magnitude_prune(
    weights: Tensors,
    masks: Tensors,
    density: float,
    ties: TieBreak,
    active: dict[str, int] | None = None,
) -> Tensors:
    """Keep the floor(density * N) active weights of largest |w| across all layers together;
    equal magnitudes at the cut break by ``ties``' ``prune`` keys.

    N counts every element of every layer in ``masks``; ``active``: the masks' active counts
    when known (else counted, one host sync). Inactive weights are never revived: if fewer
    than that many are active, the masks come back unchanged.
    """
    names = sorted(masks)
    total = sum(masks[n].numel() for n in names)
    keep = math.floor(density * total + _GUARD)
    active = active_counts(masks) if active is None else active
    if keep >= sum(active[n] for n in names):
        return {n: masks[n].clone() for n in masks}
    device = masks[names[0]].device
    sizes = [masks[n].numel() for n in names]
    bits = torch.empty(total, dtype=torch.int64, device=device)
    start = 0
    for n, size in zip(names, sizes, strict=True):  # layer by layer: no second full copy
        bits[start : start + size] = ordered_bits(
            _masked_magnitude(weights[n], masks[n]).reshape(-1)
        )
        start += size
    if keep > 0:
        kept = _top_by_keys(bits, keep, ties.source(names, sizes, "prune", device), None)
    else:
        kept = torch.zeros(total, dtype=torch.bool, device=device)
    del bits
    out, start = {}, 0
    for n in names:
        size = masks[n].numel()
        out[n] = kept[start : start + size].view(masks[n].shape)
        start += size
    return out


def layerwise_magnitude_prune(
    weights: Tensors,
    masks: Tensors,
    density: float,
    ties: TieBreak,
    active: dict[str, int] | None = None,
) -> Tensors:
    """Keep the floor(density * n_l) active weights of largest |w| in each layer alone
    (``ties`` and ``active`` as in ``global_magnitude_prune``)."""
    active = active_counts(masks) if active is None else active
    out = {}
    for n, mask in masks.items():
        keep = math.floor(density * mask.numel() + _GUARD)
        if keep >= active[n]:
            out[n] = mask.clone()
        else:
            keys = ties.source([n], [mask.numel()], "prune", mask.device)
            out[n] = keep_top(_masked_magnitude(weights[n], mask), keep, keys)
    return out


def regrow_count(fraction: float, active: int) -> int:
    """r_l = ceil(fraction * a_l), never more than a_l."""
    return min(active, math.ceil(fraction * active - _GUARD))


def prune_and_regrow(
    weights: Tensors,
    grads: Tensors,
    masks: Tensors,
    fraction: float,
    ties: TieBreak,
    active: dict[str, int] | None = None,
) -> Tensors:
    """Zero-cost neuroregeneration (docs/algorithm.md section 3b), per layer: remove the
    r = ceil(fraction * a) active weights of smallest |w|, then activate the r inactive
    positions (the ones just removed included) of largest |grad|. ``grads`` may be any
    regrowth score (random for SET). Ties at either cut break by ``ties``' ``drop`` and
    ``grow`` keys, among the candidates only, so each layer's active count is unchanged, also
    when scores are all zero. ``active``: the masks' active counts when known (else counted,
    one host sync)."""
    active = active_counts(masks) if active is None else active
    out = {}
    for n, mask in masks.items():
        r = regrow_count(fraction, active[n])
        if r == 0:
            out[n] = mask.clone()
            continue
        numel = mask.numel()
        drop_keys = ties.source([n], [numel], "drop", mask.device)
        kept = keep_top(_masked_magnitude(weights[n], mask), active[n] - r, drop_keys)
        # non-finite gradients (an AMP overflow step) count as 0 so the layer never shrinks
        grow = torch.nan_to_num(grads[n].abs().float(), nan=0.0, posinf=0.0)
        grow_scores = torch.where(kept, -1.0, grow)
        grow_keys = ties.source([n], [numel], "grow", mask.device)
        out[n] = kept | keep_top(grow_scores, r, grow_keys)
    return out


def random_scores(masks: Tensors, seed: int, update: int) -> Tensors:
    """Uniform [0, 1) scores (multiples of 2**-24) per layer from the stream seeded by (seed,
    update, layer name), computed on the masks' device without a host sync or transfer: the
    regrowth score of SET."""
    return {
        n: (random_keys(layer_seed(seed, update, n), m.numel(), m.device) >> 7)
        .float()
        .mul_(2.0**-24)
        .view(m.shape)
        for n, m in masks.items()
    }
