"""Tiny datasets written in the exact on-disk layouts torchvision reads, and test settings.

The images are learnable (each class lights its own block of pixels, plus noise), so the
training tests can check that accuracy rises without real data.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["QSWEEP_NO_DOWNLOAD"] = "1"  # tests never touch the network

N_TRAIN, N_TEST = 320, 80


def class_images(n: int, classes: int, channels: int, size: int, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images N x size x size x channels whose class is a bright block's position."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, size, size, channels), dtype=np.uint8)
    block = max(2, size // 5)
    for i, label in enumerate(labels):
        row, col = divmod(int(label) % 16, 4)
        r0, c0 = row * size // 4, col * size // 4
        images[i, r0 : r0 + block, c0 : c0 + block, :] = 230
    return images, labels.astype(np.int64)


def write_idx_pair(folder: Path, prefix_images: str, prefix_labels: str,
                   images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape[:3]
    with open(folder / prefix_images, "wb") as fh:
        fh.write(struct.pack(">IIII", 2051, n, h, w))
        fh.write(images[..., 0].astype(np.uint8).tobytes())
    with open(folder / prefix_labels, "wb") as fh:
        fh.write(struct.pack(">II", 2049, n))
        fh.write(labels.astype(np.uint8).tobytes())


def write_mnist_like(root: Path, folder: str, names: dict[str, tuple[str, str]],
                     seed: int) -> None:
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = class_images(n, 10, 1, 28, seed + (split == "test"))
        write_idx_pair(root / folder / "raw", *names[split], images, labels)


def write_cifar(root: Path, classes: int, seed: int) -> None:
    def dump(path: Path, images: np.ndarray, labels: np.ndarray, key: str) -> None:
        # CIFAR pickles hold rows of R-plane, G-plane, B-plane (3072 bytes per image).
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(path, "wb") as fh:
            pickle.dump({"data": data, key: labels.tolist()}, fh)

    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for b in range(1, 6):
            images, labels = class_images(N_TRAIN // 5, 10, 3, 32, seed + b)
            dump(folder / f"data_batch_{b}", images, labels, "labels")
        images, labels = class_images(N_TEST, 10, 3, 32, seed + 9)
        dump(folder / "test_batch", images, labels, "labels")
        with open(folder / "batches.meta", "wb") as fh:
            pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, n, s in (("train", N_TRAIN, seed), ("test", N_TEST, seed + 1)):
            images, labels = class_images(n, 100, 3, 32, s)
            dump(folder / name, images, labels, "fine_labels")
        with open(folder / "meta", "wb") as fh:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, fh)


def write_image_folder(folder: Path, classes: int, size: tuple[int, int], seed: int,
                       n_train: int = 40, n_test: int = 12, ext: str = "png") -> None:
    from PIL import Image

    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        images, labels = class_images(n, classes, 3, max(size), s)
        for i, (img, label) in enumerate(zip(images, labels, strict=False)):
            target = folder / split / f"class{label}"
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[: size[1], : size[0]]).save(target / f"{i}.{ext}")


def tiny_config(root: Path, *overrides: str):
    """A small LeNet on the tiny data under ``root``, 3 epochs; ``overrides`` win."""
    from trainables.config import TrialConfig

    return TrialConfig().with_overrides([
        f"data.root={root}", "data.batch_size=32", "data.test_batch_size=64",
        "model.name=lenet", "model.channels=[4,8]", "model.hidden=[32]",
        "optim.lr=0.05", "train.epochs=3", *overrides])


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding every dataset qsweep reads, tiny, in torchvision's layouts."""
    root = tmp_path_factory.mktemp("data")
    mnist_names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                   "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    write_mnist_like(root, "MNIST", mnist_names, seed=1)
    write_mnist_like(root, "FashionMNIST", mnist_names, seed=2)
    write_mnist_like(root, "EMNIST", {
        s: (f"emnist-digits-{s}-images-idx3-ubyte", f"emnist-digits-{s}-labels-idx1-ubyte")
        for s in ("train", "test")}, seed=3)
    write_cifar(root, 10, seed=4)
    write_cifar(root, 100, seed=5)
    write_image_folder(root / "cifar10-jpeg", 10, (32, 32), seed=6, ext="jpg")
    write_image_folder(root / "cats_vs_dogs", 2, (50, 40), seed=7, ext="jpg")
    write_image_folder(root / "custom", 3, (20, 24), seed=8)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QSWEEP_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory: pytest.TempPathFactory, tiny_root: Path):
    """(folder, completed process) of one smoke EG-vs-GD study (gd and eg, embedded Ray),
    run once and shared by the tests that only read its output and its store
    (``folder/mlflow.db``, ``folder/ray_results``): each such study costs about a minute."""
    from test_cli import run

    folder = tmp_path_factory.mktemp("smoke_study")
    script = Path(__file__).resolve().parent.parent / "sweeps" / "eg_vs_gd.py"
    out = run(["--smoke-test", "--optimizers", "gd", "eg", "--address", "local"], folder,
              tiny_root, timeout=600, script=script)
    assert out.returncode == 0, out.stderr[-3000:]
    return folder, out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything that starts real processes (a Ray runtime, a cluster) is slow too: the
    fast lane is ``pytest -m "not slow"``."""
    for item in items:
        if item.get_closest_marker("ray") or item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.slow)
