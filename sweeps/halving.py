"""Synchronous successive halving over a fixed list of points: early stopping whose
decisions do not depend on which trial finished first.

Every point trains to the first rung (an epoch count); only when all of them are there
(or ended: diverged, failed) are they ranked by the metric, ties broken by the point's
index, and the better ``1/reduction`` (rounded up) go on to the next rung, with any
other within ``margin`` of the last of them; the rest stop.
Trials that reach a rung early wait there, paused (Tune keeps their last checkpoint and
resumes them from it, to the same numbers as an uninterrupted run). The decisions depend
only on the metrics at each rung, so the same points give the same survivors whatever
the order the trials ran in, the machine's speed or the number running at once.

The points can form several cohorts (consecutive runs of points, e.g. one study cell
each), each ranked only among itself with its own rungs: one Tune run then holds many
cells, and while one cell waits at a rung for its last trial, another cell's trials use
the free cores.

ASHA (asynchronous) promotes a trial as soon as it beats the trials that reached its
rung *so far*: a slow starter could be stopped in one run and promoted in another.

Example::

    scheduler = SynchronousHalving("val_acc", "max", rungs=(1, 2), reduction=2, trials=8)
    # 8 points: all train 1 epoch, the best 4 a second, the best 2 to the end.
    cells = SynchronousHalving("val_acc", "max", reduction=2, cohorts=[(8, (1, 2))] * 4)
    # 32 points, 4 cells of 8 ranked separately.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

__all__ = ["SynchronousHalving", "point_index", "survivors", "halving_epochs"]


def point_index(trial: Any) -> int:
    """The trial's place in the sweep's points: Tune numbers trials in the order its
    search algorithm created them (``<experiment>_00003``), and restores keep the id.
    ``trial``: a Tune trial, or its id."""
    trial_id = trial if isinstance(trial, str) else trial.trial_id
    return int(str(trial_id).rsplit("_", 1)[-1])


def survivors(scores: dict[int, float], cohort: int, reduction: int, mode: str,
              margin: float = 0.0) -> list[int]:
    """The point indices that go on from a rung: of ``scores`` (index -> metric at the
    rung; non-finite is worst), the best ``ceil(cohort / reduction)`` finite ones, ties
    to the lower index, and every other one within ``margin`` of the last of those (a
    study picks among the configs within a margin of the best: one a hair behind at a
    rung must not be cut where it would be picked)."""
    keep = max(1, math.ceil(cohort / reduction))
    sign = -1.0 if mode == "max" else 1.0
    ranked = sorted((i for i, v in scores.items() if math.isfinite(v)),
                    key=lambda i: (sign * scores[i], i))
    if not ranked:
        return []
    cut = sign * scores[ranked[min(keep, len(ranked)) - 1]]
    close = [i for i in ranked[keep:] if sign * scores[i] <= cut + margin] if margin > 0 \
        else []
    return sorted(ranked[:keep] + close)


def halving_epochs(points: int, rungs: tuple[int, ...], reduction: int, epochs: int) -> int:
    """Epochs trained in all, every point to the first rung, the survivors onward."""
    total, alive, done = 0, points, 0
    for rung in (*rungs, epochs):
        total += alive * (rung - done)
        alive, done = max(1, math.ceil(alive / reduction)), rung
    return total


class _Cohort:
    """The rung state of one cohort: points ``start .. start + size - 1``."""

    def __init__(self, start: int, size: int, rungs: tuple[int, ...]) -> None:
        self.start, self.size, self.rungs = start, size, rungs
        self.scores: dict[int, dict[int, float]] = {r: {} for r in rungs}
        self.promoted: dict[int, list[int]] = {}  # rung -> indices going on (decided)

    def due(self, rung: int) -> list[int]:
        """The indices due at ``rung``: every point at the first, then the survivors of
        the rung before (empty until it is decided)."""
        k = self.rungs.index(rung)
        return list(range(self.start, self.start + self.size)) if k == 0 \
            else self.promoted.get(self.rungs[k - 1], [])

    def open_rung(self) -> int | None:
        """The first rung not decided yet whose cohort is known."""
        for k, rung in enumerate(self.rungs):
            if rung not in self.promoted:
                return rung if k == 0 or self.rungs[k - 1] in self.promoted else None
        return None

    def ready(self, rung: int, gone: set[int]) -> bool:
        return all(i in self.scores[rung] or i in gone for i in self.due(rung))

    def waiting_rung(self, i: int) -> int | None:
        """The undecided rung point ``i`` is paused at (None: free to go on)."""
        for rung in self.rungs:
            if i in self.scores[rung] and rung not in self.promoted:
                return rung
        return None


class SynchronousHalving(TrialScheduler):
    """See the module docstring. One cohort: ``rungs`` and ``trials`` (the number of
    points); several: ``cohorts``, (points, rungs) each, in point order (a cohort with no
    rungs runs every point to the end). A rung is decided once every point of its cohort
    still in the running has reported it or ended."""

    def __init__(self, metric: str, mode: str, rungs: tuple[int, ...] = (),
                 reduction: int = 2, trials: int = 0, margin: float = 0.0,
                 cohorts: Sequence[tuple[int, tuple[int, ...]]] = ()) -> None:
        super().__init__()
        cohorts = list(cohorts) or [(trials, tuple(rungs))]
        for _, cohort_rungs in cohorts:
            if reduction < 2 or list(cohort_rungs) != sorted(set(cohort_rungs)) or \
                    (cohort_rungs and cohort_rungs[0] < 1):
                raise ValueError(f"rungs={cohort_rungs} reduction={reduction}: allowed "
                                 "increasing epochs >= 1 and a reduction >= 2")
        if not any(r for _, r in cohorts) or any(size < 1 for size, _ in cohorts):
            raise ValueError(f"cohorts={cohorts}: allowed at least one rung and one point "
                             "per cohort")
        self._metric, self._mode = metric, mode
        self.reduction, self.margin = reduction, margin
        self.cohorts: list[_Cohort] = []
        for size, cohort_rungs in cohorts:
            start = sum(c.size for c in self.cohorts)
            self.cohorts.append(_Cohort(start, size, tuple(cohort_rungs)))
        self.trials = sum(c.size for c in self.cohorts)
        self.ended: set[int] = set()  # finished, diverged, failed or stopped
        self.stopped: set[int] = set()  # stopped by a decision
        self._deciding = False

    @property
    def rungs(self) -> tuple[int, ...]:
        return self.cohorts[0].rungs if len(self.cohorts) == 1 else \
            tuple(sorted({r for c in self.cohorts for r in c.rungs}))

    @property
    def promoted(self) -> dict[int, list[int]]:
        """Rung -> the indices that go on (one cohort; see ``cohorts`` for several)."""
        return self.cohorts[0].promoted

    def cohort_of(self, i: int) -> _Cohort:
        for cohort in self.cohorts:
            if cohort.start <= i < cohort.start + cohort.size:
                return cohort
        raise ValueError(f"point {i} is outside the {self.trials} points of this scheduler")

    def set_search_properties(self, metric: str | None, mode: str | None,
                              **spec: Any) -> bool:
        return True  # metric and mode are the sweep's, given at construction

    # -- the rungs ------------------------------------------------------------------------
    def _gone(self, controller: Any) -> set[int]:
        """Points whose trial ended: told by a hook, or seen ended (a trial whose reused
        process failed to reset ends ERROR without one)."""
        return self.ended | {point_index(t) for t in controller.get_trials()
                             if t.status in (Trial.ERROR, Trial.TERMINATED)}

    def _decide(self, controller: Any, cohort: _Cohort, rung: int, gone: set[int]) -> None:
        """Rank the rung; stop the paused trials that do not go on (the running one, if
        any, is told by on_trial_result's answer)."""
        due = cohort.due(rung)
        scores = {i: v for i, v in cohort.scores[rung].items()
                  if i in due and i not in gone}
        # Ranked by index within the cohort: ties go to its earlier point.
        local = survivors({i - cohort.start: v for i, v in scores.items()}, len(due),
                          self.reduction, self._mode, self.margin)
        cohort.promoted[rung] = [cohort.start + i for i in local]
        self._deciding = True
        try:
            for trial in controller.get_trials():
                i = point_index(trial)
                if i in scores and i not in cohort.promoted[rung]:
                    self.stopped.add(i)
                    if trial.status == Trial.PAUSED or trial.is_saving:
                        controller.stop_trial(trial)
        finally:
            self._deciding = False

    def _settle(self, controller: Any) -> None:
        """Decide every rung that is ready (a trial ending can complete one)."""
        if self._deciding:
            return
        gone = self._gone(controller)
        for cohort in self.cohorts:
            rung = cohort.open_rung()
            while rung is not None and cohort.ready(rung, gone):
                self._decide(controller, cohort, rung, gone)
                rung, gone = cohort.open_rung(), self._gone(controller)

    # -- Tune's hooks ---------------------------------------------------------------------
    def on_trial_add(self, controller: Any, trial: Trial) -> None:
        # Tune re-adds a failed trial it restarts (max_failures): it is due again.
        self.ended.discard(point_index(trial))

    def on_trial_result(self, controller: Any, trial: Trial, result: dict) -> str:
        i = point_index(trial)
        if i in self.stopped:
            return TrialScheduler.STOP
        cohort = self.cohort_of(i)
        epoch = result.get("epoch")
        if epoch not in cohort.scores:
            return TrialScheduler.CONTINUE
        diverged = bool(result.get("diverged"))
        if epoch in cohort.promoted:  # decided without it (it failed and was restarted)
            going_on = i in cohort.promoted[epoch] or diverged  # a diverged one ends itself
            return TrialScheduler.CONTINUE if going_on else TrialScheduler.STOP
        value = result.get(self._metric)
        finite = isinstance(value, numbers.Real) and math.isfinite(value) and not diverged
        cohort.scores[epoch][i] = float(value) if finite else math.nan
        self._settle(controller)
        if epoch in cohort.promoted:
            going_on = i in cohort.promoted[epoch] or diverged
            return TrialScheduler.CONTINUE if going_on else TrialScheduler.STOP
        if not finite:  # never goes on: a diverged trial ends itself, any other stops
            return TrialScheduler.CONTINUE if diverged else TrialScheduler.STOP
        return TrialScheduler.PAUSE

    def on_trial_complete(self, controller: Any, trial: Trial, result: dict) -> None:
        self.on_trial_remove(controller, trial)

    def on_trial_error(self, controller: Any, trial: Trial) -> None:
        # Not settled here: Tune may restart it (max_failures; on_trial_add follows at
        # once) and the rung must wait for it. If not, choose_trial_to_run sees it ERROR.
        self.ended.add(point_index(trial))

    def on_trial_remove(self, controller: Any, trial: Trial) -> None:
        self.ended.add(point_index(trial))
        self._settle(controller)

    def choose_trial_to_run(self, controller: Any) -> Trial | None:
        """Paused trials a decision let go on, in point order; then pending ones.

        Paused ones first: Tune makes the chosen trial PENDING until it has a process,
        and asks again on its next step; a pending trial chosen first would be chosen
        again and again, and a rung's survivors would resume one at a time on one core.
        (And the cohorts started first finish first.)
        """
        self._settle(controller)  # a trial may have ended without a hook
        trials = sorted(controller.get_trials(), key=point_index)
        going_on = {i for c in self.cohorts for kept in c.promoted.values() for i in kept}
        for trial in trials:
            i = point_index(trial)
            if trial.status == Trial.PAUSED and i in going_on and i not in self.stopped \
                    and self.cohort_of(i).waiting_rung(i) is None:
                return trial
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        return None

    def debug_string(self) -> str:
        decided = sum(len(c.promoted) for c in self.cohorts)
        rungs = sum(len(c.rungs) for c in self.cohorts)
        if len(self.cohorts) == 1:
            text = ", ".join(f"epoch {r}: {len(k)} go on"
                             for r, k in self.cohorts[0].promoted.items())
            return f"Synchronous successive halving (rungs {self.rungs}): " \
                   f"{text or 'none yet'}"
        return (f"Synchronous successive halving, {len(self.cohorts)} cohorts: {decided} of "
                f"{rungs} rungs decided")
