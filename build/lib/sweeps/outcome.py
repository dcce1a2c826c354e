"""How a trial ended: the one rule every part of a sweep uses (MLflow status, console line,
tables, study reports).

- FAILED: the trial raised (its error is logged), or it diverged.
- FINISHED: it reported every planned epoch.
- KILLED: it ended without error before its last epoch: the scheduler (ASHA) stopped it.
- diverged (a flag beside the status): its training loss was non-finite at some epoch
  (the loop then stops the trial within that epoch); a study also counts a seed whose
  final accuracy is at chance (:func:`at_chance`: it froze) as diverged.

Example::

    trial_status(reported_epochs=3, planned_epochs=3)        # "FINISHED"
    trial_status(1, 3, diverged=True)                         # "FAILED"
    diverged([{"train_loss": 0.3}, {"train_loss": float("nan")}])   # True
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

__all__ = ["FINISHED", "KILLED", "FAILED", "trial_status", "diverged", "at_chance"]

FINISHED, KILLED, FAILED = "FINISHED", "KILLED", "FAILED"
# An accuracy within this share of the headroom above chance is "at chance": 10 classes:
# below 0.145 (MNIST's most frequent test class alone is 11.35%: a frozen classifier
# scores 0.098..0.114); 2 classes: below 0.525.
CHANCE_MARGIN = 0.05


def trial_status(reported_epochs: int, planned_epochs: int, errored: bool = False,
                 diverged: bool = False) -> str:
    if errored or diverged:
        return FAILED
    return FINISHED if reported_epochs >= planned_epochs else KILLED


def diverged(history: Iterable[Mapping[str, Any]]) -> bool:
    """The loop's ``diverged`` flag, or a training loss that is NaN or infinite, at any
    reported epoch (runs from before the flag have only the loss)."""
    for row in history:
        loss = row.get("train_loss")
        if row.get("diverged") == 1 or (isinstance(loss, (int, float))
                                        and not math.isfinite(loss)):
            return True
    return False


def at_chance(accuracy: float, chance: float) -> bool:
    """An accuracy no better than guessing: below ``chance + 5% of (1 - chance)``, with
    ``chance`` = 1 / classes; NaN counts as at chance."""
    return not accuracy >= chance + CHANCE_MARGIN * (1 - chance)
