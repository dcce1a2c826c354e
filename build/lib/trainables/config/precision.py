"""The ``precision`` section: FP32 or autocast bf16/fp16."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from trainables.config.base import Section

__all__ = ["PrecisionConfig", "PRECISIONS"]


PRECISIONS = ("fp32", "amp_bf16", "amp_fp16")


@dataclass(frozen=True)
class PrecisionConfig(Section):
    """Arithmetic of the forward/backward pass: FP32, or autocast with bf16/fp16."""

    section: ClassVar[str] = "precision"
    mode: str = "fp32"


    @classmethod
    def tags(cls, flat: Mapping[str, Any]) -> dict[str, str]:
        return {"precision": str(cls.get(flat, "mode"))}

    def _validate(self) -> None:
        self._choice("mode", PRECISIONS)
