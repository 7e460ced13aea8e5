"""A user's own package, written into a folder outside the repository by the tests of models
and datasets by reference: ``userpkg.nets`` (a small ViT built on ``nn.MultiheadAttention``,
a ConvMixer-style net with depthwise convolutions, and factories that go wrong) and
``userpkg.data`` (a ``Dataset`` class of its own and factories that go wrong)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

NETS = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PatchViT(nn.Module):
    """1 x 8 x 8 inputs cut into four 4 x 4 patches, two attention blocks, a class head."""

    def __init__(self, num_classes, dim=32, heads=4, depth=2):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, stride=4)
        self.pos = nn.Parameter(torch.zeros(1, 4, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class DepthwiseNet(nn.Module):
    """ConvMixer-style: a patch stem, depthwise 3 x 3 and pointwise 1 x 1 convolutions."""

    def __init__(self, num_classes, dim=16, depth=2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dim, 2, stride=2), nn.GELU(), nn.BatchNorm2d(dim))
        self.mix = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, dim, 3, padding=1, groups=dim),
                nn.GELU(),
                nn.BatchNorm2d(dim),
                nn.Conv2d(dim, dim, 1),
                nn.GELU(),
                nn.BatchNorm2d(dim),
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.mix:
            x = x + block(x)
        return self.head(x.mean(dim=(2, 3)))


def vit(num_classes):
    return PatchViT(num_classes)


def depthwise(num_classes):
    return DepthwiseNet(num_classes)


def ten_classes(num_classes):
    return PatchViT(10)


def raises(num_classes):
    raise RuntimeError("this factory needs a GPU")


def not_a_model(num_classes):
    return "a model"


NOT_CALLABLE = 3
'''

DATA = '''
import numpy as np
import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    """1 x 8 x 8 noise with one bright quadrant; the label is the quadrant (4 classes).
    ``targets`` lists every label, as torchvision's datasets do."""

    def __init__(self, size, seed, bad_label_at=None):
        rng = np.random.default_rng(seed)
        self.targets = rng.integers(4, size=size).tolist()
        self.noise = rng.standard_normal((size, 1, 8, 8)).astype(np.float32)
        if bad_label_at is not None:
            self.targets[bad_label_at] = 4

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        label = self.targets[index]
        x = torch.from_numpy(self.noise[index]).clone()
        row, col = divmod(label % 4, 2)
        x[:, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] += 2.0
        return x, label


class NoLength:
    def __getitem__(self, index):
        return torch.zeros(1, 8, 8), 0


class NumpyInputs(Blobs):
    def __getitem__(self, index):
        x, label = super().__getitem__(index)
        return x.numpy(), label


def blobs(root=None, seed=0):
    return Blobs(256, seed), Blobs(64, seed + 1), 4


def bad_labels(root=None, seed=0):
    return Blobs(64, seed, bad_label_at=37), Blobs(16, seed + 1), 4


def no_len(root=None, seed=0):
    return NoLength(), NoLength(), 4


def numpy_inputs(root=None, seed=0):
    return NumpyInputs(64, seed), NumpyInputs(16, seed + 1), 4


def wrong_type(root=None, seed=0):
    return [Blobs(64, seed)]


def raises(root=None, seed=0):
    raise FileNotFoundError(f"no dataset under {root}")
'''


def write_user_package(folder: Path) -> Path:
    """Write ``userpkg`` into ``folder`` (which must lie outside the repository); returns
    ``folder``. Forgets any ``userpkg`` imported before, so each test imports its own."""
    package = folder / "userpkg"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent(NETS))
    (package / "data.py").write_text(textwrap.dedent(DATA))
    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        del sys.modules[name]
    return folder
