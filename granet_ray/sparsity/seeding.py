"""Random streams keyed by (seed, purpose, layer name), never by a process rank.

Two kinds: a CPU ``torch.Generator`` (initial masks) and ``random_keys``, a counter-based
stream computed where the scores live (CPU or CUDA) from integer arithmetic alone, so it is
bit-identical on every device and costs no host-device transfer or sync (tie-break keys, SET's
scores).
"""

from __future__ import annotations

import hashlib

import torch

_LOW32 = 0xFFFFFFFF


def layer_seed(seed: int, tag: int | str, name: str) -> int:
    """A 63-bit seed from (run seed, update index or tag, layer name): the same on every
    worker, different for every layer, update and tag."""
    digest = hashlib.sha256(f"{seed}/{tag}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def layer_generator(seed: int, tag: int | str, name: str) -> torch.Generator:
    """A CPU generator seeded with ``layer_seed(seed, tag, name)``.

    Every worker derives the same stream for the same layer and tag, so random choices
    (initial masks) agree across workers without communication.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(layer_seed(seed, tag, name))
    return generator


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash, in place, of int64 values in [0, 2**32): xor-shift,
    multiply, xor-shift, multiply, xor-shift, with odd multipliers below 2**31, so no product
    reaches 2**63 (no int64 overflow on any device)."""
    x.bitwise_xor_(x >> 16).mul_(0x21F0AAAD).bitwise_and_(_LOW32)
    x.bitwise_xor_(x >> 15).mul_(0x735A2D97).bitwise_and_(_LOW32)
    return x.bitwise_xor_(x >> 15)


def random_keys(seed: int, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``numel`` pseudo-random int64 keys in [0, 2**31), one per flat position, from the
    63-bit ``seed`` (e.g. a ``layer_seed``): a hash of (seed, position) in integer tensor
    arithmetic on ``device``, so the keys are the same on the CPU and on CUDA, on every
    worker, and are computed without a host sync."""
    return random_keys_at(seed, torch.arange(numel, dtype=torch.int64, device=device))


def random_keys_at(seed: int, positions: torch.Tensor) -> torch.Tensor:
    """The keys ``random_keys(seed, ...)`` gives at the int64 flat ``positions`` only (a new
    tensor): what a selection needs when it knows which positions are tied."""
    x = positions.to(torch.int64, copy=True)
    _mix32(x.add_(seed & _LOW32).bitwise_and_(_LOW32))
    _mix32(x.bitwise_xor_((seed >> 32) & _LOW32))
    return x.bitwise_right_shift_(1)
