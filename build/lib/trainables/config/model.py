"""The ``model`` section: architecture by name and its shape fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from trainables.config.base import Section, fail

__all__ = ["ModelConfig", "MODELS"]


MODELS = ("mlp", "lenet", "resnet20", "resnet44", "resnet56", "resnet18",
          "mobilenet_v3_small", "alexnet")


@dataclass(frozen=True)
class ModelConfig(Section):
    """Architecture. ``widths`` are MLP hidden sizes; ``channels``/``hidden`` shape LeNet."""

    section: ClassVar[str] = "model"
    name: str = "lenet"
    widths: tuple[int, ...] = (256, 128)
    channels: tuple[int, ...] = (16, 32)
    hidden: tuple[int, ...] = (128,)
    kernel_size: int = 3
    batch_norm: bool = False
    dropout: float = 0.0


    @classmethod
    def tags(cls, flat: Mapping[str, Any]) -> dict[str, str]:
        return {"model": str(cls.get(flat, "name"))}

    def _validate(self) -> None:
        self._choice("name", MODELS)
        for name in ("widths", "channels", "hidden"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                fail(self._name(name), list(values), "a non-empty list of positive integers")
        if len(self.channels) != 2:
            fail("model.channels", list(self.channels), "exactly two conv widths, e.g. [16, 32]")
        if self.kernel_size not in (3, 5):
            fail("model.kernel_size", self.kernel_size, "3 or 5")
        self._range("dropout", 0.0, 1.0, hi_open=True)
