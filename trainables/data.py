"""Datasets as in-memory uint8 tensors (decoded once and cached on disk by
:mod:`trainables.datasets`), split and batched from memory.

Batches are sliced from that tensor (on the GPU when training there), normalized and
augmented as whole batches: on two cores torchvision's per-image ``DataLoader`` caps
training at ~3300 img/s; indexing a tensor does ~90000 img/s.

Example::

    splits = load_splits(DataConfig(name="mnist", root="../shared/data"), seed=0)
    loader = splits.loader("train", batch_size=128, device=torch.device("cpu"), seed=0)
    for x, y in loader: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from trainables.config import DataConfig
from trainables.datasets import (
    Arrays,
    DataNotFoundError,
    cache_dir,
    data_root,
    folder_arrays,
    load_tensors,
    prepare_data,
)

__all__ = ["DataNotFoundError", "Splits", "BatchLoader", "load_splits", "prepare_data",
           "channel_stats", "data_root", "cache_dir"]


# Colour natural-image datasets get random-crop + flip under augment=auto.
_AUGMENTED_BY_DEFAULT = {"cifar10", "cifar100", "cifar10_jpeg", "cats_vs_dogs", "image_folder"}


# --------------------------------------------------------------------------- splitting
@dataclass(frozen=True)
class Splits:
    """Train / optional validation / test arrays plus what models need to know."""

    train: Arrays
    val: Arrays | None
    test: Arrays
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    extra: Arrays | None = None  # data.extra_test: another test set of the same classes

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])

    def loader(self, split: str, batch_size: int, device: torch.device, seed: int,
               rank: int = 0, world_size: int = 1, channels_last: bool = False
               ) -> "BatchLoader":
        arrays = {"train": self.train, "val": self.val, "test": self.test,
                  "extra": self.extra}[split]
        if arrays is None:
            raise ValueError(f"no {split} split: set data.val_fraction > 0 (val) or "
                             "data.extra_test (extra)")
        training = split == "train"
        return BatchLoader(arrays, batch_size, self.mean, self.std, device, seed=seed,
                           shuffle=training, augment=training and self.augment,
                           drop_uneven=training, rank=rank, world_size=world_size,
                           channels_last=channels_last)


def _subset(arrays: Arrays, n: int, generator: torch.Generator) -> Arrays:
    if not n or n >= len(arrays.y):
        return arrays
    return arrays.take(torch.randperm(len(arrays.y), generator=generator)[:n])


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 images ``N x C x H x W``, scaled to [0, 1].

    From a 256-bin histogram per channel: no float copy of the dataset (CIFAR-10 as
    float64 would be 1.2 GB per trial)."""
    means, stds = [], []
    values = torch.arange(256, dtype=torch.float64) / 255
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / max(n - 1, 1)
        means.append(float(mean))
        stds.append(max(float(var.sqrt()), 1e-3))
    return tuple(means), tuple(stds)


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load (or decode and cache) the dataset; carve subsets and validation split by ``seed``.

    Raises :class:`DataNotFoundError` naming the missing files and the data root.
    """
    t = load_tensors(cfg)
    generator = torch.Generator().manual_seed(seed)
    train = _subset(Arrays(t["train_x"], t["train_y"]), cfg.train_subset, generator)
    test = _subset(Arrays(t["test_x"], t["test_y"]), cfg.test_subset, generator)
    val = None
    if cfg.val_fraction > 0:
        order = torch.randperm(len(train.y), generator=generator)
        n_val = max(1, int(round(cfg.val_fraction * len(order))))
        val, train = train.take(order[:n_val]), train.take(order[n_val:])
    # Statistics of the (final) training set, so no test information leaks in.
    mean, std = channel_stats(train.x)
    augment = cfg.augment == "crop_flip" or (
        cfg.augment == "auto" and cfg.name in _AUGMENTED_BY_DEFAULT)
    num_classes = int(torch.cat([t["train_y"], t["test_y"]]).max()) + 1
    extra = _extra_test(cfg, train.x.shape[1], train.x.shape[-1], num_classes)
    return Splits(train, val, test, num_classes, mean, std, augment, extra)


def _extra_test(cfg: DataConfig, channels: int, size: int, num_classes: int
                ) -> Arrays | None:
    """``data.extra_test``: an image folder (``<class>/<image>``; class folders sorted by
    name give the labels, e.g. 0..9) read at the training images' channels (grayscale for
    MNIST-like sets) and size: generalization to another dataset of the same classes."""
    if not cfg.extra_test:
        return None
    folder = Path(cfg.extra_test).expanduser()
    folder = folder if folder.is_absolute() else data_root(cfg) / folder
    arrays, classes = folder_arrays(folder, size, channels)
    if len(classes) > num_classes:
        raise DataNotFoundError(f"data.extra_test {str(folder)!r} has {len(classes)} class "
                                f"folders: allowed at most the {num_classes} classes of "
                                f"{cfg.name}")
    return arrays


# --------------------------------------------------------------------------- batching
class BatchLoader:
    """Shuffled, sharded, normalized (and optionally augmented) batches from a tensor.

    ``rank``/``world_size`` shard like ``DistributedSampler``: every rank sees a disjoint
    slice of the same seeded permutation. With ``drop_uneven`` (training) each rank gets
    the same number of examples, so DDP ranks run the same number of steps.
    """

    def __init__(self, arrays: Arrays, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], device: torch.device, seed: int = 0,
                 shuffle: bool = False, augment: bool = False, drop_uneven: bool = False,
                 rank: int = 0, world_size: int = 1, channels_last: bool = False) -> None:
        self.x = arrays.x.to(device)
        self.y = arrays.y.to(device)
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.augment = shuffle, augment
        self.rank, self.world_size = rank, world_size
        self.drop_uneven = drop_uneven
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        # (x/255 - mean)/std folded into one multiply-add per pixel.
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Each epoch draws its own permutation and crops, reproducibly from the seed."""
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.y)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.drop_uneven:
            order = order[: n - n % self.world_size]
        return order[self.rank :: self.world_size].to(self.x.device)

    @property
    def num_examples(self) -> int:
        return len(self._indices())

    def __len__(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices()
        g = torch.Generator(device=self.x.device).manual_seed(
            self.seed * 7_919 + self.epoch * 31 + self.rank)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            x = self.x[index]
            if self.augment:
                x = random_crop_flip(x, padding=4, generator=g)
            x = torch.addcmul(self.shift, x.float(), self.scale)
            yield x.contiguous(memory_format=self.memory_format), self.y[index]


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop (zero padding) and horizontal flip of a whole batch at once."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dev = x.device
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    cols = torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(0), cols)  # flipping = reversed columns
    rows = dy[:, None] + torch.arange(h, device=dev)
    cols = dx[:, None] + cols
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
