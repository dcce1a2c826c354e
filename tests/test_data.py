"""Data: every dataset from its torchvision layout, the cache, missing-data errors, and
the in-memory batcher (coverage, sharding, determinism, normalization, augmentation)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import N_TEST, N_TRAIN
from trainables.config import DataConfig
from trainables.data import BatchLoader, DataNotFoundError, load_splits, random_crop_flip
from trainables.datasets import Arrays

CPU = torch.device("cpu")


@pytest.mark.parametrize("name, shape, classes, augment", [
    ("mnist", (1, 28, 28), 10, False),
    ("fashion_mnist", (1, 28, 28), 10, False),
    ("emnist_digits", (1, 28, 28), 10, False),
    ("cifar10", (3, 32, 32), 10, True),
    ("cifar100", (3, 32, 32), 100, True),
    ("cifar10_jpeg", (3, 32, 32), 10, True),
])
def test_datasets_load_as_uint8_tensors(tiny_root: Path, name: str, shape: tuple,
                                        classes: int, augment: bool) -> None:
    splits = load_splits(DataConfig(name=name, root=str(tiny_root)), seed=0)
    assert splits.train.x.dtype == torch.uint8 and splits.train.x.shape[1:] == shape
    assert splits.test.x.shape[1:] == shape
    assert splits.train.y.dtype == torch.int64
    assert splits.num_classes == classes and splits.augment == augment
    if name.startswith("cifar10") or name in ("mnist", "fashion_mnist", "emnist_digits"):
        assert len(splits.train.y) + len(splits.test.y) in (N_TRAIN + N_TEST, 40 + 12)


def test_mnist_pixels_match_the_idx_file(tiny_root: Path) -> None:
    raw = (tiny_root / "MNIST/raw/train-images-idx3-ubyte").read_bytes()[16:]
    expected = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 28, 28)
    splits = load_splits(DataConfig(name="mnist", root=str(tiny_root)), seed=0)
    assert np.array_equal(splits.train.x[:, 0].numpy(), expected)


def test_image_folders_are_resized(tiny_root: Path) -> None:
    cats = load_splits(DataConfig(name="cats_vs_dogs", root=str(tiny_root), image_size=24), 0)
    assert cats.train.x.shape == (40, 3, 24, 24) and cats.num_classes == 2
    custom = load_splits(DataConfig(name="image_folder", root=str(tiny_root), folder="custom"),
                         0)
    assert custom.train.x.shape[1:] == (3, 64, 64) and custom.num_classes == 3


def test_cache_is_written_once_and_reused(tiny_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(tiny_root / "FashionMNIST", root / "FashionMNIST")
    cfg = DataConfig(name="fashion_mnist", root=str(root), cache_dir=str(tmp_path / "c"))
    first = load_splits(cfg, seed=0)
    assert len(list((tmp_path / "c").glob("fashion_mnist-*.pt"))) == 1
    shutil.rmtree(root / "FashionMNIST")  # the cache alone must now serve the data
    second = load_splits(cfg, seed=0)
    assert torch.equal(first.train.x, second.train.x)


def test_missing_data_names_files_and_root(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_splits(DataConfig(name="mnist", root=str(tmp_path / "nowhere")), seed=0)
    message = str(info.value)
    assert "nowhere" in message and "MNIST/raw/train-images-idx3-ubyte" in message
    assert "QSWEEP_DATA" in message
    with pytest.raises(DataNotFoundError, match="cifar10-jpeg/train"):
        load_splits(DataConfig(name="cifar10_jpeg", root=str(tmp_path)), seed=0)


def test_subsets_and_validation_split(tiny_root: Path) -> None:
    cfg = DataConfig(name="mnist", root=str(tiny_root), train_subset=200, test_subset=50,
                     val_fraction=0.25)
    splits = load_splits(cfg, seed=3)
    assert len(splits.val.y) == 50 and len(splits.train.y) == 150
    assert len(splits.test.y) == 50
    train_rows = {bytes(x.numpy()) for x in splits.train.x}
    assert not any(bytes(x.numpy()) in train_rows for x in splits.val.x)  # disjoint
    again = load_splits(cfg, seed=3)
    assert torch.equal(again.val.x, splits.val.x)


def _arrays(n: int = 100) -> Arrays:
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return Arrays(x, torch.arange(n))


def test_each_epoch_covers_every_example_once_in_a_new_order() -> None:
    loader = BatchLoader(_arrays(), 32, (0.0,), (1.0,), CPU, seed=1, shuffle=True)
    seen = [torch.cat([y for _, y in loader]) for _ in range(2)]
    loader.set_epoch(1)
    third = torch.cat([y for _, y in loader])
    assert sorted(seen[0].tolist()) == list(range(100))
    assert torch.equal(seen[0], seen[1])  # same epoch, same order
    assert not torch.equal(seen[0], third) and sorted(third.tolist()) == list(range(100))
    assert len(loader) == 4


def test_shards_are_disjoint_and_equal_for_training() -> None:
    shards = [torch.cat([y for _, y in BatchLoader(_arrays(101), 8, (0.0,), (1.0,), CPU,
                                                   seed=2, shuffle=True, drop_uneven=True,
                                                   rank=r, world_size=3)])
              for r in range(3)]
    assert [len(s) for s in shards] == [33, 33, 33]
    assert len(set(torch.cat(shards).tolist())) == 99
    evaluation = [BatchLoader(_arrays(101), 8, (0.0,), (1.0,), CPU, rank=r, world_size=3)
                  for r in range(3)]
    assert sum(e.num_examples for e in evaluation) == 101  # evaluation drops nothing


def test_channel_stats_match_float64_reference() -> None:
    from trainables.data import channel_stats

    x = torch.randint(0, 256, (50, 3, 5, 7), dtype=torch.uint8)
    mean, std = channel_stats(x)
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert mean == pytest.approx(ref.mean(dim=1).tolist(), abs=1e-12)
    assert std == pytest.approx(ref.std(dim=1).tolist(), abs=1e-12)


def test_normalization_matches_float64_reference() -> None:
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    loader = BatchLoader(Arrays(x, torch.zeros(5, dtype=torch.long)), 5, mean, std, CPU)
    (batch, _), = list(loader)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    assert batch.dtype == torch.float32
    torch.testing.assert_close(batch.double(), ref, rtol=1e-6, atol=1e-6)


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image() -> None:
    x = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        windows = [(padded[i, :, dy:dy + 8, dx:dx + 8], f) for dy in range(5) for dx in range(5)
                   for f in (False, True)]
        matches = [f for w, f in windows if torch.equal(out[i], w.flip(-1) if f else w)]
        assert matches, f"image {i} is not a crop of its padded original"
        flips += matches[0]
    assert 10 < flips < 54  # about half flipped


def test_a_truncated_dataset_file_is_named_not_a_decoder_traceback(tiny_root: Path,
                                                                  tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_root / "MNIST", root / "MNIST")
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    cfg = DataConfig(name="mnist", root=str(root), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError, match="cannot be decoded.*truncated or corrupt.*"
                                                "train-images-idx3-ubyte"):
        load_splits(cfg, seed=0)
