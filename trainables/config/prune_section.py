"""The ``prune`` section: magnitude pruning with a sparsity schedule (:mod:`compress`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from trainables.config.base import ConfigError, Section

__all__ = ["PruneSection", "PRUNE_SCHEDULES", "PRUNE_GRANULARITIES"]

PRUNE_SCHEDULES = ("none", "oneshot", "constant", "polynomial")
PRUNE_GRANULARITIES = ("element", "channel")


@dataclass(frozen=True)
class PruneSection(Section):
    """Unstructured magnitude pruning of every Linear/Conv weight through masks
    (``compress.prune``), on a schedule (``compress.schedule``): ``oneshot`` prunes to
    ``final_sparsity`` at ``start`` (a fraction of training) and fine-tunes after;
    ``constant`` prunes from the first step; ``polynomial`` (Zhu & Gupta) raises the
    sparsity from ``initial_sparsity`` at ``start`` to ``final_sparsity`` at ``end``,
    every ``frequency`` optimizer steps. ``scope=global``: one magnitude threshold over
    all layers; ``layer``: each layer to the same sparsity. ``exclude_first_last`` keeps
    the first and last layer dense (as ``quant.first_last_bits`` keeps them wide).
    ``granularity=channel`` prunes whole output channels by L2 norm instead
    (``compress.channels``: layers whose channels are not tied to others' by a residual
    sum), and the trial's final model is the smaller dense one. Every epoch reports
    ``sparsity``: exact zeros among the prunable weights, measured on the weights the
    layers compute with."""

    section: ClassVar[str] = "prune"
    schedule: str = "none"
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.5
    start: float = 0.0
    end: float = 1.0
    frequency: int = 100
    granularity: str = "element"
    scope: str = "layer"
    exclude_first_last: bool = False
    label_fields: ClassVar[tuple[str, ...]] = ("schedule", "final_sparsity")

    def _validate(self) -> None:
        self._choice("schedule", PRUNE_SCHEDULES)
        self._choice("granularity", PRUNE_GRANULARITIES)
        self._choice("scope", ("layer", "global"))
        if self.granularity == "channel" and self.scope == "global":
            raise ConfigError("prune.scope=global is invalid with prune.granularity=channel:"
                              " allowed layer (each layer's channels ranked by their own "
                              "L2 norms; norms of different layers are not comparable)")
        self._range("initial_sparsity", 0.0, 1.0, hi_open=True)
        self._range("final_sparsity", 0.0, 1.0, hi_open=True)
        self._range("start", 0.0, 1.0)
        self._range("end", 0.0, 1.0)
        self._range("frequency", 1, 10**9)
        if self.final_sparsity < self.initial_sparsity:
            raise ConfigError(f"prune.final_sparsity={self.final_sparsity} is invalid: "
                              f"allowed >= prune.initial_sparsity ({self.initial_sparsity})")
        if self.schedule == "polynomial" and self.end <= self.start:
            raise ConfigError(f"prune.end={self.end} is invalid: allowed > prune.start "
                              f"({self.start}) with prune.schedule=polynomial")

    def sparsity_schedule(self) -> Any:
        """The :class:`compress.SparsitySchedule` these fields describe."""
        from compress import SparsitySchedule

        return SparsitySchedule(self.schedule, self.initial_sparsity, self.final_sparsity,
                                self.start, self.end, self.frequency)

    @classmethod
    def label(cls, flat: Mapping[str, Any]) -> str:
        """``prune0.7-polynomial``; "" when not pruning."""
        schedule = cls.get(flat, "schedule")
        if schedule in (None, "none"):
            return ""
        return f"prune{cls.get(flat, 'final_sparsity'):g}-{schedule}"

    @classmethod
    def tags(cls, flat: Mapping[str, Any]) -> dict[str, str]:
        return {"prune": cls.label(flat) or "none"}
