"""The ``evaluate`` section: post-training evaluations (weight rounding)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quant.named import WEIGHT_ROUNDING_FORMATS
from trainables.config.base import Section, fail

__all__ = ["EvaluateConfig"]


@dataclass(frozen=True)
class EvaluateConfig(Section):
    """Evaluations a trial runs after its last epoch (trial stages, see trainables.stages).

    ``weight_rounding``: number formats (``lns8``, ``lns4``) to round every 2+-dim weight
    tensor to (weight-only post-training rounding, scale = max |w| per tensor); each adds
    the metric ``test_acc_<format>`` and the file ``weight_rounding.json``.

    ``test_each_epoch``: score the test split after every epoch (``test_loss``,
    ``test_acc``). False: only the stages score it, at the end (a study's search trials,
    which choose on the validation split, skip it); needs ``data.val_fraction > 0``.
    """

    section: ClassVar[str] = "evaluate"
    weight_rounding: tuple[str, ...] = ()
    test_each_epoch: bool = True

    def _validate(self) -> None:
        for i, name in enumerate(self.weight_rounding):
            if name not in WEIGHT_ROUNDING_FORMATS:
                fail(f"evaluate.weight_rounding[{i}]", name,
                     "one of " + ", ".join(WEIGHT_ROUNDING_FORMATS))
