"""Sparsity schedules: the fraction of pruned weights at each optimizer step.

Start and end are fractions of training (0..1), so a sweep can search them without
knowing the steps per epoch; the pipeline's training plan turns them into steps.

- ``oneshot``: 0 before ``start``, ``final`` from it on (prune once, then fine-tune).
- ``constant``: ``final`` from the first step (masks from the initial weights).
- ``polynomial`` (Zhu & Gupta 2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3
  between t0 = start and t1 = end, updated every ``frequency`` steps (at t0, t0 + f,
  ...), ``final`` from t1 on; 0 before t0.

Example::

    schedule = SparsitySchedule("polynomial", initial=0.0, final=0.7, start=0.1, end=0.8,
                                frequency=100)
    schedule.sparsity_at(step=500, total_steps=1000)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["SparsitySchedule", "SCHEDULES"]

SCHEDULES = ("none", "oneshot", "constant", "polynomial")


@dataclass(frozen=True)
class SparsitySchedule:
    kind: str = "none"
    initial: float = 0.0
    final: float = 0.5
    start: float = 0.0  # fraction of training
    end: float = 1.0  # fraction of training (polynomial)
    frequency: int = 100  # steps between updates (polynomial)

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"kind={self.kind!r} is invalid: allowed one of "
                             f"{', '.join(SCHEDULES)}")
        for name in ("initial", "final"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0 or math.isnan(value):
                raise ValueError(f"{name}={value!r} is invalid: allowed 0 <= {name} < 1")
        if self.final < self.initial:
            raise ValueError(f"final={self.final} is invalid: allowed >= initial "
                             f"({self.initial})")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0 or math.isnan(value):
                raise ValueError(f"{name}={value!r} is invalid: allowed 0..1 (a fraction "
                                 "of training)")
        if self.kind == "polynomial" and self.end <= self.start:
            raise ValueError(f"end={self.end} is invalid: allowed > start ({self.start})")
        if self.frequency < 1:
            raise ValueError(f"frequency={self.frequency} is invalid: allowed >= 1 (steps)")

    def update_steps(self, total_steps: int) -> tuple[int, int]:
        """(first, last) optimizer step at which the masks are updated."""
        t0 = round(self.start * total_steps)
        t1 = round(self.end * total_steps) if self.kind == "polynomial" else t0
        return t0, max(t0, t1)

    def sparsity_at(self, step: int, total_steps: int) -> float:
        """The target sparsity after ``step`` optimizer steps (0: before the first)."""
        if self.kind == "none":
            return 0.0
        if self.kind == "constant":
            return self.final
        t0, t1 = self.update_steps(total_steps)
        if step < t0:
            return 0.0
        if self.kind == "oneshot" or step >= t1:
            return self.final
        # Held between updates: the value at the last update step t0 + k f.
        at = t0 + (step - t0) // self.frequency * self.frequency
        progress = (at - t0) / (t1 - t0)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def changes_at(self, step: int, total_steps: int) -> bool:
        """Whether the masks are updated after ``step`` (so before ``step + 1``)."""
        return self.kind != "none" and \
            self.sparsity_at(step, total_steps) != self.sparsity_at(step - 1, total_steps)
