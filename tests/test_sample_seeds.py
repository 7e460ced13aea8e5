"""Random augmentation in data-loader processes resumes bit for bit
(``granet_ray.sample_seeds``): a run with 2 loader processes and random crops and flips,
interrupted mid-epoch and resumed on the same number of workers, ends exactly where the
uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import one_thread, tiny_train, weights  # noqa: F401
from torch.utils.data import Dataset
from torchvision import transforms

from granet_ray.config import RunSettings
from granet_ray.data import build_datasets
from granet_ray.data.bundle import DataBundle
from granet_ray.recipe import Hooks, Run, StepInfo, build_run
from granet_ray.sample_seeds import SampleSeeded, seed_sample
from granet_ray.session import FolderCheckpoints, train_session

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


class Augmented(Dataset):
    """``base`` with a random crop (padding 4) and a random horizontal flip."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.augment = transforms.Compose(
            [transforms.RandomCrop(28, padding=4), transforms.RandomHorizontalFlip()]
        )

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, label = self.base[index]
        return self.augment(image), label


class Interrupt(Hooks):
    """Stops the run (an exception) after global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, run: Run, info: StepInfo) -> None:
        if info.step == self.step:
            raise KeyboardInterrupt


def test_a_sample_draws_the_same_augmentation_in_any_process() -> None:
    data = Augmented(build_datasets("synthetic_mnist5k", train_size=8).train)
    seeded = SampleSeeded(data, seed=3)
    first = seeded[(1, 5)][0]
    torch.manual_seed(12345)  # another process state
    assert torch.equal(seeded[(1, 5)][0], first)
    assert not torch.equal(seeded[(2, 5)][0], first)  # another epoch, another crop
    seed_sample(3, 1, 5)
    assert torch.equal(data[5][0], first)


def test_loader_processes_resume_bit_for_bit(tmp_path: Path) -> None:
    """2 epochs of 3 steps, a checkpoint every 2 steps; interrupted in step 5, resumed from
    step 4 (mid-epoch) with new loader processes."""
    train = tiny_train()
    base = build_datasets("synthetic_mnist5k", train_size=96, seed=train.seed)
    data = DataBundle(
        train=Augmented(base.train),
        test=base.test,
        num_classes=base.num_classes,
        input_shape=base.input_shape,
    )

    def session(name: str, hooks: list[Hooks]) -> Run:
        settings = RunSettings(
            storage_path=str(tmp_path), name=name, checkpoint_every_steps=2, tensorboard=False
        )
        run = build_run(train, device=CPU, loader_workers=2, data=data)
        train_session(run, settings, checkpoints=FolderCheckpoints(settings), hooks=hooks)
        return run

    clean = weights(session("clean", []))
    with pytest.raises(KeyboardInterrupt):
        session("cut", [Interrupt(5)])
    resumed = weights(session("cut", []))
    assert all(torch.equal(clean[n], resumed[n]) for n in clean)
