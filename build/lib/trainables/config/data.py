"""The ``data`` section: dataset, batching, held-out splits, augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from trainables.config.base import INF, Section, fail

__all__ = ["DataConfig", "DATASETS", "AUGMENTATIONS"]


DATASETS = (
    "mnist",
    "fashion_mnist",
    "emnist_digits",
    "cifar10",
    "cifar100",
    "cifar10_jpeg",
    "cats_vs_dogs",
    "image_folder",
)


AUGMENTATIONS = ("auto", "none", "crop_flip")


@dataclass(frozen=True)
class DataConfig(Section):
    """Dataset and batching. ``root`` empty means ``$QSWEEP_DATA`` (else ``./data``)."""

    section: ClassVar[str] = "data"
    name: str = "mnist"
    root: str = ""
    cache_dir: str = ""  # empty: $QSWEEP_CACHE, else ~/.cache/qsweep
    folder: str = ""  # image_folder only: a folder holding train/<class>/ and test/<class>/
    image_size: int = 0  # 0: native size (32 for cifar10_jpeg, 64 for other folders)
    batch_size: int = 128
    test_batch_size: int = 1000
    val_fraction: float = 0.0  # held out of train; metrics val_loss / val_acc
    train_subset: int = 0  # 0: all examples; else the first N (after a seeded shuffle)
    test_subset: int = 0
    augment: str = "auto"  # auto: crop_flip for the colour datasets, none otherwise
    # An extra test set of the same classes (image folder <class>/<image>, relative to the
    # data root or absolute): every epoch reports extra_acc, a quantized trial extra_acc_q.
    extra_test: str = ""


    @classmethod
    def tags(cls, flat: Mapping[str, Any]) -> dict[str, str]:
        return {"dataset": str(cls.get(flat, "name"))}

    def _validate(self) -> None:
        self._choice("name", DATASETS)
        self._choice("augment", AUGMENTATIONS)
        self._range("image_size", 0, 1024)
        self._range("batch_size", 1, 1 << 20)
        self._range("test_batch_size", 1, 1 << 20)
        self._range("val_fraction", 0.0, 0.5, hi_open=True)
        self._range("train_subset", 0, INF)
        self._range("test_subset", 0, INF)
        if self.name == "image_folder" and not self.folder:
            fail("data.folder", self.folder,
                  "a folder with train/ and test/ subfolders when data.name=image_folder")
