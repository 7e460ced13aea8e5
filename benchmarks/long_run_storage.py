"""The storage a 100-epoch ImageNet run with the documented settings holds, with and without
checkpoint retention (docs/long-runs.md).

Measures real checkpoints: ResNet-50 with the ``imagenet_resnet50`` preset's masks at its
final density 0.2 and at its initial density 0.5, with the SGD momentum a run saves,
written by ``save_sparse`` as a run writes them (masked weights and their momentum as CSR)
and summed from the manifest as ``granet-ray ckpt inspect`` shows them. Then lists the
checkpoints of the documented run (global batch 128: 10,009 steps an epoch, 100 epochs,
``--checkpoint-every-steps 500`` and one at every epoch end), each at the density of the
preset's cubic schedule at its step (sizes interpolated linearly in the density between the
two measured), and what ``--keep-checkpoints 3 --keep-best val_accuracy`` keeps of them.

    .venv/bin/python benchmarks/long_run_storage.py [FOLDER]   # FOLDER: keep the checkpoint
    .venv/bin/granet-ray ckpt inspect FOLDER/checkpoint_d0.2
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile

import torch

from granet_ray.config import GraNetConfig, preset
from granet_ray.models import build_model
from granet_ray.recipe import build_optimizer
from granet_ray.sparsity import GraNet
from granet_ray.sparsity.schedules import target_density
from granet_ray.store import optimizer_state_by_name, save_sparse
from granet_ray.store.summary import summarize

STEPS_PER_EPOCH = 10_009  # ImageNet's 1,281,167 training images / global batch 128
EPOCHS = 100
EVERY_STEPS = 500
KEEP, BEST = 3, 1  # --keep-checkpoints 3 --keep-best val_accuracy


def checkpoint_steps(steps_per_epoch: int, epochs: int, every_steps: int) -> list[int]:
    """The global steps a run checkpoints at: every epoch end, and every ``every_steps``
    steps that do not end an epoch (``recipe.run_epochs``)."""
    total = steps_per_epoch * epochs
    ends = range(steps_per_epoch, total + 1, steps_per_epoch)
    mid = (s for s in range(every_steps, total + 1, every_steps) if s % steps_per_epoch)
    return sorted([*ends, *mid])


def density_at(step: int, granet: GraNetConfig, steps_per_epoch: int) -> float:
    """The masks' density after global step ``step``: the cubic target of the last pruning
    update at or before it (the initial density before the first)."""
    start, end = granet.prune_start * steps_per_epoch, granet.prune_end * steps_per_epoch
    last = min(step, end) // granet.update_interval * granet.update_interval
    target = target_density(
        last,
        update_interval=granet.update_interval,
        prune_start=start,
        prune_end=end,
        init_density=granet.init_density,
        final_density=granet.final_density,
    )
    return granet.init_density if target is None else target


def checkpoint_bytes(density: float, folder: str) -> int:
    """Bytes of a ResNet-50 checkpoint with the preset's masks at ``density`` and momentum."""
    train = preset("imagenet_resnet50")
    granet = dataclasses.replace(train.granet, init_density=density)
    torch.manual_seed(0)
    net = build_model(train.model, num_classes=1000)
    optimizer = build_optimizer(net, train)
    total = STEPS_PER_EPOCH * EPOCHS
    engine = GraNet(net, optimizer, granet, total_steps=total, steps_per_epoch=STEPS_PER_EPOCH)
    net(torch.randn(2, 3, 224, 224)).logsumexp(dim=1).mean().backward()
    optimizer.step()  # momentum buffers, as every checkpoint after step 1 holds them
    engine.apply_masks()
    uri = save_sparse(
        net.state_dict(),
        f"{folder}/checkpoint_d{density}",
        masks=engine.masks,
        optimizer_state=optimizer_state_by_name(optimizer, net.named_parameters()),
    )
    return summarize(uri).total_bytes


def main() -> None:
    torch.set_num_threads(2)
    granet = preset("imagenet_resnet50").granet
    low, high = granet.final_density, granet.init_density
    with tempfile.TemporaryDirectory() as temp:
        folder = sys.argv[1] if len(sys.argv) > 1 else temp
        sizes = {d: checkpoint_bytes(d, folder) for d in (low, high)}
    per_density = (sizes[high] - sizes[low]) / (high - low)
    steps = checkpoint_steps(STEPS_PER_EPOCH, EPOCHS, EVERY_STEPS)
    total = sum(
        sizes[low] + per_density * (density_at(s, granet, STEPS_PER_EPOCH) - low) for s in steps
    )
    for density, size in sizes.items():
        print(f"one checkpoint, ResNet-50 at density {density}: {size / 1e6:.1f} MB")
    print(f"checkpoints of the run: {len(steps)}; without retention {total / 1e9:.1f} GB")
    kept = KEEP + BEST
    print(
        f"--keep-checkpoints {KEEP} --keep-best val_accuracy: {kept} at rest "
        f"({kept * sizes[low] / 1e9:.2f} GB once pruning has ended, at most "
        f"{kept * sizes[high] / 1e9:.2f} GB before), {kept + 1} for a moment after a save"
    )


if __name__ == "__main__":
    main()
