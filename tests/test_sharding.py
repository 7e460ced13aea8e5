"""The global-batch order of an epoch and every worker's share of it (docs/algorithm.md section 5):
the steps of an epoch and the samples of each step are the same at any number of workers,
every sample is seen once per epoch, and a run resumes from any step on any number of
workers. Pure numpy (one DataLoader check)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from granet_ray.data.sharding import (
    MicroBatchSampler,
    StepShare,
    epoch_order,
    epoch_shares,
    smallest_step,
    step_bounds,
    steps_per_epoch,
    worker_share,
)

# (training set size, global batch): smaller than a batch, exact multiples, remainders just
# below / at / above half a batch (even and odd batches), a single step of 1.5 batches less one.
CASES = [
    (1, 1),
    (5, 8),
    (7, 128),
    (127, 128),
    (128, 128),
    (129, 128),
    (191, 128),
    (192, 128),
    (193, 128),
    (64, 16),
    (100, 16),
    (103, 16),
    (104, 16),
    (105, 16),
    (111, 16),
    (12, 5),
    (13, 5),
    (22, 5),
    (23, 5),
    (1000, 7),
    (1000, 1),
    (4000, 128),
    (50_000, 128),
]
WORLDS = (1, 2, 3, 4, 8)
SEED = 11


def _worlds(size: int, batch: int) -> list[int]:
    """The worker counts of ``WORLDS`` that leave no worker without a sample of any step."""
    return [w for w in WORLDS if w <= smallest_step(size, batch)]


def _steps(size: int, batch: int) -> list[int]:
    bounds = step_bounds(size, batch)
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def _shares(size: int, batch: int, world: int, **kw: int) -> list[list[StepShare]]:
    """Every rank's shares of epoch 1, by rank."""
    return [
        epoch_shares(size, batch, seed=SEED, epoch=1, rank=r, world=world, **kw)
        for r in range(world)
    ]


@pytest.mark.parametrize(("size", "batch"), CASES)
def test_step_bounds_cover_the_epoch_in_steps_of_the_global_batch(size: int, batch: int) -> None:
    bounds = step_bounds(size, batch)
    assert bounds[0] == 0 and bounds[-1] == size
    assert all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
    steps = _steps(size, batch)
    assert steps_per_epoch(size, batch) == len(steps)
    assert smallest_step(size, batch) == min(steps)
    assert all(s == batch for s in steps[:-1])  # only the last step may differ
    assert all(2 * s <= 3 * batch for s in steps)  # at most 1.5 batches
    if len(steps) > 1:
        assert all(2 * s >= batch for s in steps)  # at least half a batch
    full, rest = divmod(size, batch)
    if full == 0:
        assert steps == [size]
    elif 2 * rest >= batch:  # the remainder forms its own step
        assert steps == [batch] * full + [rest] * (rest > 0)
    else:  # the remainder joins the last full step
        assert steps == [batch] * (full - 1) + [batch + rest]


@pytest.mark.parametrize(("size", "batch"), CASES)
def test_every_sample_is_in_exactly_one_step_per_epoch(size: int, batch: int) -> None:
    shares = epoch_shares(size, batch, seed=SEED, epoch=3, rank=0, world=1)
    assert [s.step for s in shares] == list(range(steps_per_epoch(size, batch)))
    assert [s.size for s in shares] == _steps(size, batch)
    assert all(len(s.indices) == s.size for s in shares)
    seen = np.concatenate([s.indices for s in shares])
    np.testing.assert_array_equal(seen, epoch_order(size, SEED, 3))  # in the epoch's order
    np.testing.assert_array_equal(np.sort(seen), np.arange(size))


@pytest.mark.parametrize(("size", "batch"), CASES)
def test_worker_shares_are_contiguous_disjoint_and_balanced(size: int, batch: int) -> None:
    bounds = step_bounds(size, batch)
    for world in _worlds(size, batch):
        for start, end in zip(bounds, bounds[1:], strict=False):
            slices = [worker_share(start, end, r, world) for r in range(world)]
            assert slices[0][0] == start and slices[-1][1] == end
            for (_, hi), (lo, _) in zip(slices, slices[1:], strict=False):
                assert hi == lo  # contiguous, disjoint, in rank order
            counts = [hi - lo for lo, hi in slices]
            assert sum(counts) == end - start
            assert max(counts) - min(counts) <= 1
            assert min(counts) >= 1


@pytest.mark.parametrize(("size", "batch"), CASES)
def test_the_same_samples_make_every_step_at_any_number_of_workers(size: int, batch: int) -> None:
    (reference,) = _shares(size, batch, 1)
    for world in _worlds(size, batch):
        by_rank = _shares(size, batch, world)
        for s, step in enumerate(reference):
            parts = [shares[s] for shares in by_rank]
            assert all(p.step == s and p.size == step.size for p in parts)
            # rank r's share is the r-th contiguous slice of the world-1 step
            np.testing.assert_array_equal(np.concatenate([p.indices for p in parts]), step.indices)
            counts = [len(p.indices) for p in parts]
            assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize(("size", "batch"), [(100, 16), (150, 7), (193, 128), (23, 5)])
def test_a_run_resumes_at_start_step_on_the_same_or_another_number_of_workers(
    size: int, batch: int
) -> None:
    steps = steps_per_epoch(size, batch)
    worlds = _worlds(size, batch)
    for before in worlds:
        full = _shares(size, batch, before, max_batch=3)
        for start in range(steps + 1):
            resumed = _shares(size, batch, before, max_batch=3, start_step=start)
            for rank in range(before):  # the same workers: exactly the tail of the epoch
                tail = full[rank][start:]
                assert [s.step for s in resumed[rank]] == list(range(start, steps))
                assert [(s.step, s.size, s.micro) for s in resumed[rank]] == [
                    (s.step, s.size, s.micro) for s in tail
                ]
                for a, b in zip(resumed[rank], tail, strict=True):
                    np.testing.assert_array_equal(a.indices, b.indices)
            for after in worlds:  # another number of workers from step `start` on
                later = _shares(size, batch, after, start_step=start)
                seen = [s.indices for shares in full for s in shares[:start]]
                seen += [s.indices for shares in later for s in shares]
                merged = np.concatenate([np.empty(0, dtype=np.int64), *seen])
                np.testing.assert_array_equal(np.sort(merged), np.arange(size))  # once each
                for s in range(start, steps):  # the first unseen samples, step by step
                    step_samples = np.concatenate([shares[s - start].indices for shares in later])
                    lo, hi = step_bounds(size, batch)[s : s + 2]
                    np.testing.assert_array_equal(step_samples, epoch_order(size, SEED, 1)[lo:hi])


@pytest.mark.parametrize("max_batch", [None, 1, 2, 3, 5, 7, 16, 64, 1000])
def test_micro_batches_split_a_share_near_equally_larger_first(max_batch: int | None) -> None:
    for size, batch in CASES:
        for world in _worlds(size, batch):
            for shares in _shares(size, batch, world, max_batch=max_batch):  # type: ignore[arg-type]
                for share in shares:
                    count = len(share.indices)
                    micro = share.micro
                    assert sum(micro) == count
                    assert all(m >= 1 for m in micro)
                    assert list(micro) == sorted(micro, reverse=True)  # larger first
                    assert max(micro) - min(micro) <= 1  # near equal
                    if max_batch is None:
                        assert micro == (count,)
                    else:
                        assert max(micro) <= max_batch
                        assert len(micro) == math.ceil(count / max_batch)  # as few as fit


def test_epoch_order_depends_only_on_size_seed_and_epoch() -> None:
    first = epoch_order(500, 3, 2)
    np.testing.assert_array_equal(np.sort(first), np.arange(500))
    np.random.seed(99)  # the global RNGs play no part
    torch.manual_seed(99)
    np.random.random(10)
    np.testing.assert_array_equal(epoch_order(500, 3, 2), first)
    assert not np.array_equal(epoch_order(500, 3, 3), first)  # another epoch
    assert not np.array_equal(epoch_order(500, 4, 2), first)  # another seed
    assert len(epoch_order(499, 3, 2)) == 499
    # every rank and world size reads the same order
    for world in (1, 2, 4):
        for rank in range(world):
            shares = epoch_shares(500, 50, seed=3, epoch=2, rank=rank, world=world)
            lo, _ = worker_share(0, 50, rank, world)
            np.testing.assert_array_equal(
                shares[0].indices, first[lo : lo + len(shares[0].indices)]
            )


def _expected_batches(shares: list[StepShare]) -> list[list[int]]:
    batches = []
    for share in shares:
        start = 0
        for count in share.micro:
            batches.append([int(i) for i in share.indices[start : start + count]])
            start += count
    return batches


def test_micro_batch_sampler_yields_every_micro_batch_in_order() -> None:
    assert list(MicroBatchSampler()) == [] and len(MicroBatchSampler()) == 0
    shares = epoch_shares(103, 16, seed=SEED, epoch=0, rank=1, world=3, max_batch=2)
    sampler = MicroBatchSampler(shares)
    batches = list(sampler)
    assert len(sampler) == len(batches) == sum(len(s.micro) for s in shares)
    assert batches == _expected_batches(shares)
    assert all(isinstance(i, int) for b in batches for i in b)
    assert [i for b in batches for i in b] == np.concatenate([s.indices for s in shares]).tolist()


def test_micro_batch_sampler_shares_can_be_replaced_between_epochs() -> None:
    data = TensorDataset(torch.arange(100))
    sampler = MicroBatchSampler()
    loader = DataLoader(data, batch_sampler=sampler)
    for epoch, start in ((0, 0), (1, 0), (2, 4)):
        shares = epoch_shares(
            100, 16, seed=SEED, epoch=epoch, rank=0, world=2, max_batch=5, start_step=start
        )
        sampler.shares = shares
        got = [batch.tolist() for (batch,) in loader]
        assert got == _expected_batches(shares)
        assert len(loader) == len(sampler) == len(got)
