"""The global-batch order of an epoch and each worker's share of it (docs/algorithm.md section 5).

An epoch is one permutation of the training set, seeded by (seed, epoch) alone, cut into
global steps of ``global_batch`` samples; worker ``rank`` of ``world`` takes a contiguous
slice of every step (sizes differ by at most one), split into micro-batches of at most
``max_batch`` samples when it accumulates gradients. The steps of an epoch and the samples
of each step do not depend on the number of workers, so a run resumed on another number of
workers from step s of an epoch carries on from the first unseen sample. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation (size,) of sample indices of epoch ``epoch`` (0-based), the same in
    every process."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def block_order(counts: list[int], block: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch ``epoch`` of a dataset stored in shards of ``counts``
    consecutive samples, with at most ``block`` shards in flight: the shards in an order
    shuffled by (seed, epoch), cut into blocks of ``block`` shards, the samples of each block
    shuffled among themselves. The same in every process; within an epoch a sample only
    meets the samples of its own block (about ``block`` shards' worth)."""
    rng = np.random.default_rng([seed, epoch, len(counts), block])
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    shards = rng.permutation(len(counts))
    parts = []
    for b in range(0, len(shards), block):
        members = [np.arange(starts[s], starts[s + 1]) for s in shards[b : b + block]]
        parts.append(rng.permutation(np.concatenate(members)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def step_bounds(size: int, global_batch: int) -> list[int]:
    """Start offsets of every global step of an epoch of ``size`` samples, then ``size``:
    steps of ``global_batch`` samples; the last ``size % global_batch`` samples form their own
    step when they are at least half a batch, else join the last full step, so every
    sample is seen once per epoch and no step is tiny."""
    full, rest = divmod(size, global_batch)
    steps = full + 1 if full == 0 or 2 * rest >= global_batch else full
    return [min(s * global_batch, size) for s in range(steps)] + [size]


def steps_per_epoch(size: int, global_batch: int) -> int:
    """Global optimizer steps of one epoch (the same at any number of workers)."""
    return len(step_bounds(size, global_batch)) - 1


def smallest_step(size: int, global_batch: int) -> int:
    """Samples of the smallest global step of an epoch (every worker needs one of them)."""
    bounds = step_bounds(size, global_batch)
    return min(b - a for a, b in zip(bounds, bounds[1:], strict=False))


def worker_share(start: int, end: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous slice [lo, hi) of the step [start, end) that worker ``rank`` takes."""
    base, extra = divmod(end - start, world)
    lo = start + rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


@dataclass(frozen=True)
class StepShare:
    """One global step as one worker sees it: ``size`` samples in the whole step, this
    worker's ``indices`` (dataset indices), cut into micro-batches of ``micro`` sizes."""

    step: int
    size: int
    indices: np.ndarray
    micro: tuple[int, ...]


def epoch_shares(
    size: int,
    global_batch: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    max_batch: int | None = None,
    start_step: int = 0,
    order: np.ndarray | None = None,
    keys: np.ndarray | None = None,
) -> list[StepShare]:
    """This worker's share of every step of ``epoch`` from ``start_step`` on (0-based within
    the epoch). Micro-batches: ceil(share / max_batch) near-equal parts, larger first.
    ``order``: the epoch's permutation when the dataset has its own (a packed dataset's
    ``block_order``), else ``epoch_order``. ``keys``: a key per sample (a packed dataset's
    shard of each sample): each step's samples are sorted by it (stably) before they are
    dealt, so a worker's slice of every step holds few keys; a step's samples stay the
    same."""
    order = epoch_order(size, seed, epoch) if order is None else order
    bounds = step_bounds(size, global_batch)
    if keys is not None:
        order = order.copy()
        for a, b in zip(bounds, bounds[1:], strict=False):
            order[a:b] = order[a:b][np.argsort(keys[order[a:b]], kind="stable")]
    shares = []
    for s in range(start_step, len(bounds) - 1):
        lo, hi = worker_share(bounds[s], bounds[s + 1], rank, world)
        count = hi - lo
        parts = max(1, math.ceil(count / max_batch)) if max_batch else 1
        base, extra = divmod(count, parts)
        micro = tuple(base + (i < extra) for i in range(parts))
        shares.append(StepShare(s, bounds[s + 1] - bounds[s], order[lo:hi], micro))
    return shares


class MicroBatchSampler(Sampler[list[int]]):
    """A ``DataLoader`` batch sampler over ``shares``: every micro-batch of every step in
    order, as lists of dataset indices. ``shares`` may be replaced between epochs (the
    loader's worker processes then stay alive across epochs)."""

    def __init__(self, shares: list[StepShare] | None = None) -> None:
        self.shares = shares or []

    def __iter__(self) -> Iterator[list[int]]:
        for share in self.shares:
            start = 0
            for count in share.micro:
                yield share.indices[start : start + count].tolist()
                start += count

    def __len__(self) -> int:
        return sum(len(s.micro) for s in self.shares)
