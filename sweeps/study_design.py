"""What a study searches: a cell of its grid (:class:`Cell`), the paired quasi-random
design each cell searches (:class:`SearchSpace`), and the rungs of its synchronous
successive halving (:func:`auto_rungs`). ``sweeps.study`` runs them; it re-exports these.

Example::

    space = SearchSpace((("optim.lr", 0.01, 1.0, True),))
    space.points(8, seed=0)      # the same 8 unit-cube points for every 1-range space
    auto_rungs(8, 3)             # (1, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from trainables.config import ConfigError, TrialConfig

__all__ = ["SearchSpace", "Cell", "auto_rungs"]


@dataclass(frozen=True)
class SearchSpace:
    """Ranges searched as one quasi-random design: ``(key, low, high, log)`` each, plus
    constant overrides. ``points`` are the same for every space with the same number of
    ranges and the same seed (in the unit cube), which pairs the cells of a study."""

    ranges: tuple[tuple[str, float, float, bool], ...]
    constants: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ConfigError("a search space needs at least one range (key, low, high, log)")
        for key, low, high, log in self.ranges:
            if not low < high or (log and low <= 0):
                raise ConfigError(f"search range {key}={low}..{high} is invalid: allowed "
                                  "low < high (and low > 0 on a log scale)")

    def points(self, n: int, seed: int) -> list[dict[str, Any]]:
        """``n`` configs from scrambled Sobol points (torch's SobolEngine, seeded)."""
        engine = torch.quasirandom.SobolEngine(len(self.ranges), scramble=True, seed=seed)
        unit = engine.draw(n, dtype=torch.float64).tolist()
        points = []
        for u in unit:
            point = dict(self.constants)
            for (key, low, high, log), x in zip(self.ranges, u, strict=True):
                point[key] = (math.exp(math.log(low) + x * (math.log(high) - math.log(low)))
                              if log else low + x * (high - low))
            points.append(point)
        return points


@dataclass(frozen=True)
class Cell:
    """One point of the study's grid: its key (the last part names the plotted series),
    its base config, and what is searched."""

    key: tuple[str, ...]
    base: TrialConfig
    space: SearchSpace

    @property
    def label(self) -> str:
        return "/".join(self.key)



def auto_rungs(points: int, epochs: int, reduction: int = 2) -> tuple[int, ...]:
    """Rungs that halve ``points`` down to two finishers (at least one halving), spaced
    geometrically over ``epochs`` (epochs / reduction^k, rounded up); () where training
    is one epoch long."""
    if points < 2:
        return ()
    halvings = max(1, math.floor(math.log(max(points, 1), reduction) + 1e-9) - 1)
    rungs = {math.ceil(epochs / reduction ** k) for k in range(1, halvings + 1)}
    return tuple(sorted(r for r in rungs if 1 <= r < epochs))
