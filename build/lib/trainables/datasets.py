"""Datasets from disk as ``uint8`` tensors, decoded once and cached.

Every dataset goes through its torchvision class (MNIST, FashionMNIST, EMNIST digits,
CIFAR10/100) or ``ImageFolder`` layout (the CIFAR-10 JPEG copy, cats-vs-dogs, any
``train/<class>/`` + ``test/<class>/`` folder), is decoded once into a ``uint8`` tensor
``N x C x H x W`` and cached under ``$QSWEEP_CACHE`` (default ``~/.cache/qsweep``). Where
internet exists, missing torchvision datasets are downloaded; offline, the error names the
missing files and the root. :mod:`trainables.data` splits and batches them.

Example::

    prepare_data(DataConfig(name="mnist", root="../shared/data"))   # decode + cache once
"""

from __future__ import annotations

import hashlib
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainables.config import DataConfig

__all__ = ["DataNotFoundError", "Arrays", "data_root", "cache_dir", "prepare_data",
           "load_tensors", "folder_arrays"]


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


_CACHE_VERSION = 1


def data_root(cfg: DataConfig) -> Path:
    """``data.root``, else ``$QSWEEP_DATA``, else ``./data``."""
    return Path(cfg.root or os.environ.get("QSWEEP_DATA") or "data").expanduser()


def cache_dir(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$QSWEEP_CACHE``, else ``~/.cache/qsweep``."""
    default = Path.home() / ".cache" / "qsweep"
    return Path(cfg.cache_dir or os.environ.get("QSWEEP_CACHE") or default).expanduser()


@dataclass(frozen=True)
class Arrays:
    """Decoded images ``uint8 N x C x H x W`` and labels ``int64 N``."""

    x: torch.Tensor
    y: torch.Tensor

    def take(self, index: torch.Tensor) -> "Arrays":
        return Arrays(self.x[index], self.y[index])


# --------------------------------------------------------------------------- decoding
def _torchvision_arrays(name: str, root: Path, train: bool) -> Arrays:
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
        return Arrays(images.unsqueeze(1).contiguous(), torch.as_tensor(ds.targets).long())
    cls = _cifar_classes()[0 if name == "cifar10" else 1]
    ds = cls(str(root), train=train, download=False)
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return Arrays(images, torch.as_tensor(ds.targets).long())


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


def folder_arrays(folder: Path, size: int, channels: int = 3) -> tuple[Arrays, list[str]]:
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
    return Arrays(x, torch.tensor(ds.targets, dtype=torch.long)), list(ds.classes)


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
        train, train_classes = folder_arrays(folder / "train", size)
        test, test_classes = folder_arrays(folder / "test", size)
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


def load_tensors(cfg: DataConfig) -> dict[str, torch.Tensor]:
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
        load_tensors(cfg)
