"""Everything that calls ``torch.distributed``: score averaging and the mask agreement check.

``DistributedSync`` is the ``MaskSync`` the GraNet engine uses under DDP (gloo on CPU, NCCL
on GPU). Collectives run in the same order on every worker: tensors are sorted by name and
packed into one flat buffer per call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensors = dict[str, torch.Tensor]

_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash
_HASH_MODULUS = 2147483647  # 2**31 - 1


class MaskDivergenceError(RuntimeError):
    """Workers hold different masks after a mask update."""


def mask_fingerprint(masks: Tensors) -> torch.Tensor:
    """int64 tensor (layers sorted by name, 2): active count and a position hash per layer."""
    rows = []
    for name in sorted(masks):
        positions = torch.nonzero(masks[name].reshape(-1)).reshape(-1)
        hashed = (positions * _HASH_MULTIPLIER) % _HASH_MODULUS
        rows.append(torch.stack([positions.new_tensor(positions.numel()), hashed.sum()]))
    return torch.stack(rows).to(torch.int64)


def is_initialized() -> bool:
    """Whether a torch.distributed process group is up in this process."""
    return dist.is_available() and dist.is_initialized()


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_workers(values: list[float], group: dist.ProcessGroup | None = None) -> list[float]:
    """Element-wise sum of ``values`` over all workers (one float64 all-reduce); the values
    themselves without a process group. Used for evaluation sums (loss, correct, count)."""
    if not is_initialized():
        return [float(v) for v in values]
    flat = torch.tensor(values, dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return flat.tolist()


def gather_objects(obj: object, group: dist.ProcessGroup | None = None) -> list[object]:
    """Every worker's picklable ``obj``, indexed by rank (``[obj]`` without a process group).
    Used to save each worker's RNG states in a checkpoint."""
    if not is_initialized():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


class DistributedSync:
    """``MaskSync`` over a torch.distributed process group (the default group if None)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedSync needs an initialized torch.distributed group")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.device = collective_device(group)

    def average(self, tensors: Tensors) -> Tensors:
        """Mean of each tensor across workers, via one all-reduce of a flat float32 buffer."""
        names = sorted(tensors)
        flat = torch.cat([tensors[n].detach().reshape(-1).float().to(self.device) for n in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        flat /= self.world_size
        out, start = {}, 0
        for n in names:
            t = tensors[n]
            out[n] = flat[start : start + t.numel()].view(t.shape).to(t.device, t.dtype)
            start += t.numel()
        return out

    def check(self, masks: Tensors, step: int) -> None:
        """All-reduce (MAX) the fingerprints and their negations: every worker agrees iff
        max == min for every layer. Raises ``MaskDivergenceError`` naming the first layer."""
        fingerprint = mask_fingerprint(masks).to(self.device)
        both = torch.cat([fingerprint, -fingerprint])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        high, low = both[: len(fingerprint)], -both[len(fingerprint) :]
        differs = (high != low).any(dim=1).cpu()
        if bool(differs.any()):
            index = int(torch.nonzero(differs)[0])
            name = sorted(masks)[index]
            raise MaskDivergenceError(
                f"masks differ across workers after the update at step {step}: layer {name} "
                f"has {int(low[index, 0])}..{int(high[index, 0])} active weights on different "
                f"workers (rank {dist.get_rank(self.group)} of {self.world_size})"
            )
