"""Datasets as in-memory uint8 tensors, decoded once and cached on disk; batched from memory.

Every dataset goes through its torchvision class (MNIST, FashionMNIST, EMNIST digits,
CIFAR10/100) or ``ImageFolder`` layout (the CIFAR-10 JPEG copy, cats-vs-dogs, any
``train/<class>/`` + ``test/<class>/`` folder), is decoded once into a ``uint8`` tensor
``N x C x H x W`` and cached under ``$QSWEEP_CACHE`` (default ``~/.cache/qsweep``).
Batches are sliced from that tensor (on the GPU when training there), normalized and
augmented as whole batches: on two cores torchvision's per-image ``DataLoader`` caps
training at ~3300 img/s; indexing a tensor does ~90000 img/s.

Example::

    splits = load_splits(DataConfig(name="mnist", root="../shared/data"), seed=0)
    loader = splits.loader("train", batch_size=128, device=torch.device("cpu"), seed=0)
    for x, y in loader: ...
"""

from __future__ import annotations

import hashlib
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from trainables.config import DataConfig

__all__ = ["DataNotFoundError", "Splits", "BatchLoader", "load_splits", "prepare_data",
           "channel_stats", "data_root", "cache_dir"]


class DataNotFoundError(FileNotFoundError):
    """The dataset is not under the data root and could not be downloaded."""


# Files each torchvision dataset reads, relative to the data root (used to say what is
# missing when offline).
_TORCHVISION_FILES = {
    "mnist": [f"MNIST/raw/{f}" for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
    "fashion_mnist": [f"FashionMNIST/raw/{f}" for f in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
    "emnist_digits": [f"EMNIST/raw/emnist-digits-{s}-{k}" for s in ("train", "test")
                      for k in ("images-idx3-ubyte", "labels-idx1-ubyte")],
    "cifar10": [f"cifar-10-batches-py/{f}" for f in (
        "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
        "test_batch", "batches.meta")],
    "cifar100": [f"cifar-100-python/{f}" for f in ("train", "test", "meta")],
}
_FOLDERS = {"cifar10_jpeg": "cifar10-jpeg", "cats_vs_dogs": "cats_vs_dogs"}
# Colour natural-image datasets get random-crop + flip under augment=auto.
_AUGMENTED_BY_DEFAULT = {"cifar10", "cifar100", "cifar10_jpeg", "cats_vs_dogs", "image_folder"}
_CACHE_VERSION = 1


def data_root(cfg: DataConfig) -> Path:
    """``data.root``, else ``$QSWEEP_DATA``, else ``./data``."""
    return Path(cfg.root or os.environ.get("QSWEEP_DATA") or "data").expanduser()


def cache_dir(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$QSWEEP_CACHE``, else ``~/.cache/qsweep``."""
    default = Path.home() / ".cache" / "qsweep"
    return Path(cfg.cache_dir or os.environ.get("QSWEEP_CACHE") or default).expanduser()


@dataclass(frozen=True)
class _Arrays:
    """Decoded images ``uint8 N x C x H x W`` and labels ``int64 N``."""

    x: torch.Tensor
    y: torch.Tensor

    def take(self, index: torch.Tensor) -> "_Arrays":
        return _Arrays(self.x[index], self.y[index])


# --------------------------------------------------------------------------- decoding
def _torchvision_arrays(name: str, root: Path, train: bool) -> _Arrays:
    from torchvision import datasets

    if name in ("mnist", "fashion_mnist", "emnist_digits"):
        if name == "emnist_digits":
            ds = datasets.EMNIST(str(root), split="digits", train=train, download=False)
            # EMNIST's IDX files are stored transposed relative to MNIST.
            images = ds.data.transpose(1, 2)
        else:
            cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
            ds = cls(str(root), train=train, download=False)
            images = ds.data
        return _Arrays(images.unsqueeze(1).contiguous(), torch.as_tensor(ds.targets).long())
    cls = _cifar_classes()[0 if name == "cifar10" else 1]
    ds = cls(str(root), train=train, download=False)
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return _Arrays(images, torch.as_tensor(ds.targets).long())


def _cifar_classes():
    import pickle

    from torchvision import datasets

    class Unchecked:
        """torchvision checks the official pickles' md5 sums; re-pickled copies (and the
        tiny datasets the tests write) are refused by it, so presence is checked instead."""

        def _check_integrity(self) -> bool:
            return all((Path(self.root) / self.base_folder / f).exists()
                       for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as fh:
                names = pickle.load(fh, encoding="latin1")[self.meta["key"]]
            self.classes = names
            self.class_to_idx = {name: i for i, name in enumerate(names)}

    class Unchecked10(Unchecked, datasets.CIFAR10):
        pass

    class Unchecked100(Unchecked, datasets.CIFAR100):
        pass

    return Unchecked10, Unchecked100


def _download(name: str, root: Path) -> None:
    from torchvision import datasets

    root.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # an offline machine must fail fast, not hang
    try:
        for train in (True, False):
            if name == "emnist_digits":
                datasets.EMNIST(str(root), split="digits", train=train, download=True)
            else:
                cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST,
                       "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
                cls(str(root), train=train, download=True)
    finally:
        socket.setdefaulttimeout(previous)


def _ensure_present(name: str, root: Path) -> None:
    missing = [f for f in _TORCHVISION_FILES[name] if not (root / f).exists()]
    if not missing:
        return
    try:
        if os.environ.get("QSWEEP_NO_DOWNLOAD"):
            raise RuntimeError("downloads disabled by QSWEEP_NO_DOWNLOAD")
        _download(name, root)
    except Exception as exc:  # offline, or the server refused: say what is missing, where
        raise DataNotFoundError(
            f"dataset {name!r} is not under data root {str(root)!r} and could not be "
            f"downloaded ({type(exc).__name__}: {exc}). Missing files: {', '.join(missing)}. "
            "Set QSWEEP_DATA (or data.root / --data-root) to the folder that holds them."
        ) from exc


def _folder_of(cfg: DataConfig, root: Path) -> Path:
    if cfg.name == "image_folder":
        folder = Path(cfg.folder).expanduser()
        return folder if folder.is_absolute() else root / folder
    return root / _FOLDERS[cfg.name]


def _image_size(cfg: DataConfig) -> int:
    if cfg.image_size:
        return cfg.image_size
    return 32 if cfg.name == "cifar10_jpeg" else 64


def _folder_arrays(folder: Path, size: int, channels: int = 3) -> tuple[_Arrays, list[str]]:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise DataNotFoundError(f"image folder {str(folder)!r} does not exist: expected "
                                f"{folder}/<class>/<image> files (ImageFolder layout)")
    ds = ImageFolder(str(folder))

    def decode(path: str) -> np.ndarray:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
            return array if channels == 3 else array[:, :, None]

    # PIL decodes with the GIL released: threads use both cores.
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        images = list(pool.map(decode, [p for p, _ in ds.samples], chunksize=256))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return _Arrays(x, torch.tensor(ds.targets, dtype=torch.long)), list(ds.classes)


def _decode(cfg: DataConfig, root: Path) -> dict[str, torch.Tensor]:
    if cfg.name in _TORCHVISION_FILES:
        _ensure_present(cfg.name, root)
        try:
            train = _torchvision_arrays(cfg.name, root, train=True)
            test = _torchvision_arrays(cfg.name, root, train=False)
        except (RuntimeError, ValueError, EOFError, OSError) as exc:
            # A truncated or corrupt file fails deep inside torchvision's decoder.
            files = [root / f for f in _TORCHVISION_FILES[cfg.name]]
            sizes = ", ".join(f"{f.name} ({f.stat().st_size:,} bytes)" for f in files
                              if f.exists())
            raise DataNotFoundError(
                f"dataset {cfg.name!r} under data root {str(root)!r} cannot be decoded "
                f"({type(exc).__name__}: {str(exc)[:200]}): a file is truncated or corrupt. "
                f"Files: {sizes}. Replace them with complete copies (delete them to let "
                "torchvision download them again where there is internet).") from None
    else:
        folder, size = _folder_of(cfg, root), _image_size(cfg)
        for split in ("train", "test"):
            if not (folder / split).is_dir():
                raise DataNotFoundError(
                    f"dataset {cfg.name!r} needs {str(folder / split)!r} (ImageFolder layout: "
                    f"{split}/<class>/<image>) under data root {str(root)!r}. Set QSWEEP_DATA "
                    "(or data.root / --data-root) to the folder that holds it.")
        train, train_classes = _folder_arrays(folder / "train", size)
        test, test_classes = _folder_arrays(folder / "test", size)
        if train_classes != test_classes:
            raise DataNotFoundError(f"{folder}: train classes {train_classes} differ from "
                                    f"test classes {test_classes}")
    return {"train_x": train.x, "train_y": train.y, "test_x": test.x, "test_y": test.y}


def _cache_path(cfg: DataConfig, root: Path) -> Path:
    if cfg.name in _TORCHVISION_FILES:
        source = str((root / _TORCHVISION_FILES[cfg.name][0]).resolve())
        key = f"{cfg.name}"
    else:
        source = str(_folder_of(cfg, root).resolve())
        key = f"{cfg.name}-{_image_size(cfg)}px"
    digest = hashlib.sha1(f"{_CACHE_VERSION}|{source}".encode()).hexdigest()[:10]
    return cache_dir(cfg) / f"{key}-{digest}.pt"


def _load_tensors(cfg: DataConfig) -> dict[str, torch.Tensor]:
    """Decoded tensors from the cache, decoding and caching them on the first call."""
    root = data_root(cfg)
    path = _cache_path(cfg, root)
    if path.exists():
        return torch.load(path, weights_only=True)
    tensors = _decode(cfg, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(tensors, tmp)
    os.replace(tmp, path)  # atomic: concurrent trials never read half a file
    return tensors


def prepare_data(cfg: DataConfig) -> None:
    """Make sure the decoded cache exists (downloading or decoding now if needed).

    Raises :class:`DataNotFoundError` naming the missing files and the data root."""
    if not _cache_path(cfg, data_root(cfg)).exists():
        _load_tensors(cfg)


# --------------------------------------------------------------------------- splitting
@dataclass(frozen=True)
class Splits:
    """Train / optional validation / test arrays plus what models need to know."""

    train: _Arrays
    val: _Arrays | None
    test: _Arrays
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    extra: _Arrays | None = None  # data.extra_test: another test set of the same classes

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[-1])

    def loader(self, split: str, batch_size: int, device: torch.device, seed: int,
               rank: int = 0, world_size: int = 1) -> "BatchLoader":
        arrays = {"train": self.train, "val": self.val, "test": self.test,
                  "extra": self.extra}[split]
        if arrays is None:
            raise ValueError(f"no {split} split: set data.val_fraction > 0 (val) or "
                             "data.extra_test (extra)")
        training = split == "train"
        return BatchLoader(arrays, batch_size, self.mean, self.std, device, seed=seed,
                           shuffle=training, augment=training and self.augment,
                           drop_uneven=training, rank=rank, world_size=world_size)


def _subset(arrays: _Arrays, n: int, generator: torch.Generator) -> _Arrays:
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
    t = _load_tensors(cfg)
    generator = torch.Generator().manual_seed(seed)
    train = _subset(_Arrays(t["train_x"], t["train_y"]), cfg.train_subset, generator)
    test = _subset(_Arrays(t["test_x"], t["test_y"]), cfg.test_subset, generator)
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
                ) -> _Arrays | None:
    """``data.extra_test``: an image folder (``<class>/<image>``; class folders sorted by
    name give the labels, e.g. 0..9) read at the training images' channels (grayscale for
    MNIST-like sets) and size: generalization to another dataset of the same classes."""
    if not cfg.extra_test:
        return None
    folder = Path(cfg.extra_test).expanduser()
    folder = folder if folder.is_absolute() else data_root(cfg) / folder
    arrays, classes = _folder_arrays(folder, size, channels)
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

    def __init__(self, arrays: _Arrays, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], device: torch.device, seed: int = 0,
                 shuffle: bool = False, augment: bool = False, drop_uneven: bool = False,
                 rank: int = 0, world_size: int = 1) -> None:
        self.x = arrays.x.to(device)
        self.y = arrays.y.to(device)
        self.batch_size, self.seed = batch_size, seed
        self.shuffle, self.augment = shuffle, augment
        self.rank, self.world_size = rank, world_size
        self.drop_uneven = drop_uneven
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
            yield torch.addcmul(self.shift, x.float(), self.scale), self.y[index]


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
