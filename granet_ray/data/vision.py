"""CIFAR-10 and ImageNet through torchvision, with the standard augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from granet_ray.data.bundle import DataBundle, shuffled_subset

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_FILES = (
    "data_batch_1",
    "data_batch_2",
    "data_batch_3",
    "data_batch_4",
    "data_batch_5",
    "test_batch",
    "batches.meta",
)

# torchvision is imported inside the builders: it adds about 1.5 s to import time, and the
# mnist5k and synthetic datasets do not need it.


def cifar10_transforms() -> tuple[Any, Any]:
    """CIFAR-10's (train, test) transforms of a PIL image: random crop 32 with padding 4,
    horizontal flip, normalise; test: normalise only."""
    from torchvision import transforms

    normalize = transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)
    train = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return train, transforms.Compose([transforms.ToTensor(), normalize])


def imagenet_transforms() -> tuple[Any, Any]:
    """ImageNet's (train, test) transforms of a PIL image: RandomResizedCrop 224, horizontal
    flip, normalise; test: resize 256, center crop 224, normalise."""
    from torchvision import transforms

    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    test = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize]
    )
    return train, test


def build_cifar10(root: Path, download: bool, train_size: int | None, seed: int) -> DataBundle:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (python pickled batches).

    Train: random crop 32 with padding 4, horizontal flip, normalise; test: normalise only.
    ``train_size`` keeps the first N training images of an order shuffled by ``seed``.
    """
    from torchvision import datasets

    folder = root / "cifar-10-batches-py"
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing and not download:
        raise FileNotFoundError(
            f"dataset 'cifar10': expected the python CIFAR-10 batches in {folder} "
            f"(missing: {', '.join(missing)}); fetch them once where there is internet with "
            "torchvision.datasets.CIFAR10(ROOT, download=True) and pass --data-root ROOT"
        )
    train_tf, test_tf = cifar10_transforms()
    try:
        train = datasets.CIFAR10(str(root), train=True, transform=train_tf, download=download)
        test = datasets.CIFAR10(str(root), train=False, transform=test_tf, download=False)
    except RuntimeError as err:
        raise RuntimeError(
            f"dataset 'cifar10': the files in {folder} failed torchvision's MD5 check; "
            "delete them and fetch them again where there is internet with "
            "torchvision.datasets.CIFAR10(ROOT, download=True)"
        ) from err
    return DataBundle(
        train=shuffled_subset(train, train_size, seed, "cifar10"),
        test=test,
        num_classes=10,
        input_shape=(3, 32, 32),
    )


def build_imagenet(root: Path, train_size: int | None, seed: int) -> DataBundle:
    """ImageNet as two ImageFolder trees, ``root/train/<class>/*`` and ``root/val/<class>/*``.

    Train: RandomResizedCrop 224, horizontal flip, normalise; test: resize 256, center crop
    224, normalise. ``train_size`` keeps the first N training images of an order shuffled by
    ``seed``.
    """
    from torchvision import datasets

    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"dataset 'imagenet': expected the folder {root / split} holding one "
                "sub-folder of images per class (ImageFolder layout)"
            )
    train_tf, test_tf = imagenet_transforms()
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    test = datasets.ImageFolder(str(root / "val"), transform=test_tf)
    if train.classes != test.classes:
        raise ValueError(
            f"dataset 'imagenet': the class folders of {root / 'train'} ({len(train.classes)}) "
            f"and {root / 'val'} ({len(test.classes)}) differ; both need the same classes"
        )
    return DataBundle(
        train=shuffled_subset(train, train_size, seed, "imagenet"),
        test=test,
        num_classes=len(train.classes),
        input_shape=(3, 224, 224),
    )
