"""Everything that calls ``torch.distributed``: score averaging, the exact mask agreement
check and the DDP communication hook that all-reduces only the active gradients.

``DistributedSync`` is the ``MaskSync`` the GraNet engine uses under DDP (gloo on CPU, NCCL
on GPU). Collectives run in the same order on every worker: tensors are sorted by name and
packed into one flat buffer per call. ``register_sparse_allreduce`` puts ``SparseAllReduce``
on a DDP model.
"""

# No ``from __future__ import annotations``: DDP checks a hook's annotations as objects.
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from granet_ray.sparsity import GraNet

Tensors = dict[str, torch.Tensor]

_BYTE_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


class MaskDivergenceError(RuntimeError):
    """Workers hold different masks after a mask update."""


def pack_masks(
    masks: Tensors, device: torch.device | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Every mask's bits in one uint8 tensor: layers sorted by name, each layer's flat (logical,
    row-major) positions padded with zeros to a whole number of bytes, most significant bit
    first. Returns the bytes (on ``device``, default the masks') and each layer's byte count,
    in name order. ResNet-50's 25.5 M prunable weights pack into 3.2 MB."""
    names = sorted(masks)
    sizes = [(masks[n].numel() + 7) // 8 for n in names]
    bits = torch.zeros(8 * sum(sizes), dtype=torch.uint8, device=device or masks[names[0]].device)
    start = 0
    for name, size in zip(names, sizes, strict=True):
        flat = masks[name].reshape(-1)
        bits[start : start + flat.numel()] = flat
        start += 8 * size
    columns = bits.view(-1, 8)
    packed = columns[:, 0] << 7
    for bit in range(1, 8):
        packed |= columns[:, bit] << (7 - bit)
    return packed, sizes


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

    def all(self, flag: bool) -> bool:
        """True iff ``flag`` is True on every worker (one all-reduce MIN, one host sync)."""
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value.item())

    def check(self, masks: Tensors, step: int) -> None:
        """Compare every worker's masks bit for bit (docs/algorithm.md section 5): one
        all-reduce MAX of the packed masks and of their complement gives each byte's max and
        min over the workers at once; the workers agree iff max == min everywhere. Raises
        ``MaskDivergenceError`` on every worker, naming the first layer (by name) that differs
        and at how many of its positions. One host sync when the masks agree."""
        packed, sizes = pack_masks(masks, self.device)
        both = torch.cat([packed, ~packed])  # ~x == 255 - x: MAX of it is 255 - MIN of x
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        differs = both[: packed.numel()] ^ ~both[packed.numel() :]  # max XOR min, per byte
        if not bool(differs.any()):
            return
        counts = _BYTE_POPCOUNT.to(differs.device)[differs.long()]
        start = 0
        for name, size in zip(sorted(masks), sizes, strict=True):
            count = int(counts[start : start + size].sum())
            if count:
                raise MaskDivergenceError(
                    f"masks differ across workers after the update at step {step}: layer {name} "
                    f"differs at {count} of {masks[name].numel()} positions (seen on rank "
                    f"{dist.get_rank(self.group)} of {self.world_size})"
                )
            start += size


# ---- the sparse gradient all-reduce --------------------------------------------------------


def _dense_strides(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides lay its elements out densely, without overlap (in some order
    of its dimensions): then DDP's bucket holds them in that memory order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def packed_offsets(
    params: Sequence[torch.Tensor],
    offsets: Sequence[int],
    numel: int,
    masks: Mapping[int, torch.Tensor],
    counts: Mapping[int, int],
) -> torch.Tensor | None:
    """The flat positions, in increasing order, of a DDP bucket of ``numel`` entries that
    travel packed: every entry of a parameter without a mask and the active entries of one
    with a mask (``masks``: bool masks by ``id(parameter)``; ``counts``: their active counts,
    known to the host). ``offsets``: where each of ``params`` starts in the bucket. A
    parameter lies in the bucket in its memory order (channels-last too), as DDP lays it out.
    None when every entry travels. No host sync: the positions are a stable sort of the
    bucket's entries, the travelling ones first, cut at their known number."""
    send: torch.Tensor | None = None
    stay = 0
    for param, offset in zip(params, offsets, strict=True):
        mask = masks.get(id(param))
        if mask is None or counts[id(param)] == param.numel():
            continue
        if send is None:
            send = torch.ones(numel, dtype=torch.bool, device=mask.device)
        if _dense_strides(param):
            view = send.as_strided(param.shape, param.stride(), offset)
        else:
            view = send[offset : offset + param.numel()].view(param.shape)
        view.copy_(mask)
        stay += param.numel() - counts[id(param)]
    if send is None:
        return None
    order = torch.argsort(send.logical_not().to(torch.uint8), stable=True)
    return order[: numel - stay].clone()  # not a view: the stay positions' memory goes


@dataclass(frozen=True)
class _Layout:
    """Where a DDP bucket's gradients lie: its parameters, their offsets and its size."""

    params: tuple[torch.Tensor, ...]
    offsets: tuple[int, ...]
    numel: int


@dataclass(frozen=True)
class _Plan:
    """A bucket's parameters (by ``id``), its layout and its ``packed_offsets``."""

    params: tuple[int, ...]
    layout: _Layout
    index: torch.Tensor | None


class SparseAllReduce:
    """The state of a DDP communication hook that all-reduces only the active gradients.

    Between two mask updates every worker holds the same masks (checked after each update,
    docs/algorithm.md section 5), so the entries of a gradient bucket that belong to active
    weights, and every entry of parameters without a mask (biases, norms, layers kept
    dense), travel packed in the same order on every worker, with no indices; the other
    entries come back as 0 (their weights are masked anyway). At a step whose dense
    gradients the engine reads (``engine.reads_gradients``: a regrowth by gradient, due or
    postponed) and while every mask of a bucket is all ones, the whole bucket travels. The
    packing of every bucket seen so far is rebuilt when the engine's masks change (an
    ``engine.mask_listeners`` entry: at the mask update, not inside the next backward), a
    bucket's own when DDP rebuilds its buckets (after the first step); building it never
    waits for the device (``packed_offsets``), so backward holds no host sync.

    Exact: each travelling entry is x 1/W and then summed, as DDP's reducer does, so on 2
    workers it is bit-identical to plain DDP's. Two more elements per packed bucket, its min
    and max, tell whether any worker's bucket holds a non-finite entry; then the inactive
    entries come back NaN, so a GradScaler skips a step, and the engine postpones an update,
    exactly when they would under plain DDP.

    compress: ``torch.bfloat16`` or ``torch.float16`` all-reduces in that dtype, as DDP's
    ``bf16_compress_hook`` / ``fp16_compress_hook`` (cast, / W, sum, cast back).
    bytes_sent: bytes this worker has all-reduced so far; bytes_dense: those the same steps
    would have all-reduced without the packing (the bucket buffers, in the wire dtype).
    """

    def __init__(
        self,
        engine: "GraNet",
        group: dist.ProcessGroup | None = None,
        compress: torch.dtype | None = None,
    ) -> None:
        if compress not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"compress={compress} is invalid: use torch.bfloat16, float16 or None")
        self.engine = engine
        self.group: dist.ProcessGroup = dist.group.WORLD if group is None else group
        self.world_size = self.group.size()
        self.compress = compress
        self.bytes_sent = 0
        self.bytes_dense = 0
        self._masks: Tensors | None = None  # the engine.masks the plans were built from
        self._by_param: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}
        self._plans: dict[int, _Plan] = {}  # by bucket index
        engine.mask_listeners.append(self.refresh)

    @staticmethod
    def hook(
        state: "SparseAllReduce", bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        """The function ``DistributedDataParallel.register_comm_hook`` calls per bucket."""
        return state.all_reduce(bucket)

    def _build(self, layout: _Layout) -> _Plan:
        index = packed_offsets(
            layout.params, layout.offsets, layout.numel, self._by_param, self._counts
        )
        return _Plan(tuple(id(p) for p in layout.params), layout, index)

    def refresh(self) -> None:
        """Rebuild every known bucket's packing from the engine's current masks (the engine
        calls it after each change of its masks)."""
        engine = self.engine
        self._masks = engine.masks
        self._by_param = {id(engine.params[n]): m for n, m in engine.masks.items()}
        counts = engine.active_counts()
        self._counts = {id(engine.params[n]): c for n, c in counts.items()}
        self._plans = {i: self._build(plan.layout) for i, plan in self._plans.items()}

    def _plan(self, bucket: dist.GradBucket) -> _Plan:
        if self.engine.masks is not self._masks:
            self.refresh()
        params = bucket.parameters()
        ids = tuple(id(p) for p in params)
        plan = self._plans.get(bucket.index())
        if plan is None or plan.params != ids:
            base = bucket.buffer().storage_offset()
            offsets = tuple(g.storage_offset() - base for g in bucket.gradients())
            layout = _Layout(tuple(params), offsets, bucket.buffer().numel())
            plan = self._plans[bucket.index()] = self._build(layout)
        return plan

    def all_reduce(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """Start the all-reduce of ``bucket``: packed between mask updates, whole at a step
        whose dense gradients the engine reads. A future of the bucket buffer, reduced."""
        buffer = bucket.buffer()
        engine = self.engine
        index = None if engine.reads_gradients(engine.step_count + 1) else self._plan(bucket).index
        wire_dtype = self.compress or buffer.dtype
        self.bytes_dense += buffer.numel() * wire_dtype.itemsize
        if index is None:
            source = buffer
        else:
            k = index.numel()
            source = torch.empty(k + 2, dtype=buffer.dtype, device=buffer.device)
            torch.index_select(buffer, 0, index, out=source[:k])
            # the bucket's min and max travel too: they propagate NaN, and rounding to the
            # wire dtype is monotonic, so they stay finite iff every entry does
            torch.aminmax(buffer, out=(source[k], source[k + 1]))
        if self.compress is None:
            wire = source.mul_(1.0 / self.world_size)  # DDP's reducer: x 1/W while copying in
        else:
            wire = source.to(self.compress).div_(self.world_size)  # as bf16_compress_hook
        self.bytes_sent += wire.numel() * wire.element_size()
        work = self.group.allreduce([wire])  # a sum; dist.all_reduce adds Python logging

        def unpack(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            reduced = future.value()[0]
            if index is None:
                if self.compress is not None:
                    buffer.copy_(reduced)
                return buffer
            k = index.numel()
            # inactive: 0 where every worker's extremes are finite, else NaN (0 x inf = NaN)
            buffer.copy_(reduced[k:].mul(0).sum().abs())
            buffer.scatter_(0, index, reduced[:k].to(buffer.dtype))  # faster than index_copy_
            return buffer

        return work.get_future().then(unpack)


def register_sparse_allreduce(
    model: nn.Module, engine: "GraNet", compress: torch.dtype | None = None
) -> SparseAllReduce | None:
    """Register ``SparseAllReduce`` (over the model's process group) on ``model`` when it is
    DistributedDataParallel (also inside ``torch.compile``); its state, or None otherwise."""
    ddp = getattr(model, "_orig_mod", model)
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return None
    state = SparseAllReduce(engine, ddp.process_group, compress)
    ddp.register_comm_hook(state, SparseAllReduce.hook)
    return state
