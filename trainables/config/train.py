"""The ``train`` section: epochs, seed, resources, checkpoints, initial weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from trainables.config.base import Section, fail

__all__ = ["TrainConfig", "DEVICES"]


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig(Section):
    """Epochs, seed and resources. ``num_workers > 1`` trains with DDP under Ray Train."""

    section: ClassVar[str] = "train"
    epochs: int = 2
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu; fractional lets small trials share a GPU
    threads: int = 0  # torch intra-op threads per worker; 0: round(cpus_per_worker)
    device: str = "auto"  # auto: cuda when use_gpu and available, else cpu
    checkpoint: bool = True  # a checkpoint every epoch (model, optimizer, schedule, RNG)
    # Start from the weights of a trained model of the same architecture: a qsweep
    # checkpoint folder (or its state.pt), e.g. QAT fine-tuning of an FP32 model. Only
    # the weights: optimizer, schedule and epochs start afresh. "": the seeded init.
    init_from: str = ""
    # Diverged: weights inf/NaN, or this many non-finite batch losses in a row (every
    # step skipped); the trial then stops within its epoch (trainables/loop.py).
    nonfinite_streak: int = 20
    # Convolution weights and activations in channels-last (NHWC) layout. On this CPU a
    # LeNet step is ~1.6x faster (bench/layout.py); results equal
    # the default layout's to float rounding, not bit for bit.
    channels_last: bool = False


    @classmethod
    def tags(cls, flat: Mapping[str, Any]) -> dict[str, str]:
        return {"seed": str(cls.get(flat, "seed")),
                "num_workers": str(cls.get(flat, "num_workers"))}

    def _validate(self) -> None:
        self._range("epochs", 1, 100_000)
        self._range("nonfinite_streak", 1, 10**9)
        self._range("seed", 0, 2**31 - 1)
        self._range("num_workers", 1, 4096)
        self._range("cpus_per_worker", 0.0, 1024, lo_open=True)
        self._range("gpus_per_worker", 0.0, 64, lo_open=True)
        self._range("threads", 0, 1024)
        self._choice("device", DEVICES)
        if self.device == "cuda" and not self.use_gpu:
            fail("train.device", "cuda", "auto or cpu unless train.use_gpu=true")
