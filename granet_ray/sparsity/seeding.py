"""Random generators keyed by (seed, purpose, layer name), never by a process rank."""

from __future__ import annotations

import hashlib

import torch


def layer_generator(seed: int, tag: int | str, name: str) -> torch.Generator:
    """A CPU generator seeded from (run seed, update index or tag, layer name).

    Every worker derives the same stream for the same layer and update, so random choices
    (initial masks, SET growth) agree across workers without communication.
    """
    digest = hashlib.sha256(f"{seed}/{tag}/{name}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return generator
