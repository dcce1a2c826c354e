"""Several points sweeps in one Tune run: a study's cells searched side by side.

Each sweep keeps its own MLflow run (params, tags, its trials nested under it, its table
and plot), and ends FINISHED as soon as its own trials have ended, while the others go
on. Their points run in one Tune run, one after another in order, with synchronous
successive halving ranking each sweep's points only among themselves (a cohort each,
with its own rungs): while one sweep waits at a rung for its last trial, the next
sweep's trials use the free cores, and the trial processes (``reuse_actors``) start
once for all of them instead of once per sweep. Measured on the default EG-vs-GD study
(32 cells on 2 cores): see README.

A sweep's run is summarized (table, plot) as soon as its trials ended, and ends FINISHED
once Tune has saved the state that holds its results (when the Tune run returns, also
after a Ctrl-C that Tune caught); on any other stop it ends KILLED with the rest.

Resuming: a run of several sweeps with halving is not resumable trial by trial (Tune
does not save the halving decisions); the sweeps that finished are kept, the others
run again (:mod:`sweeps.study` does this on ``--resume``).

Extra ``Sweep.callbacks`` see the trials of every sweep of the run.

Example::

    outcomes = run_together([Sweep(name="s", base=a, points=pa, rungs=(1,)),
                             Sweep(name="s", base=b, points=pb, rungs=(1,))],
                            folder="s-20261203-search")
"""

from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ray.tune import Callback
from ray.tune.experiment import Trial

from sweeps.callbacks import ConsoleProgress, DiskFullWatch, finite_tensorboard_logger
from sweeps.halving import SynchronousHalving, point_index
from sweeps.init_weights import absolute_paths
from sweeps.ray_env import init_ray, with_cluster_gpus
from sweeps.resume import driver_lock
from sweeps.runner import (
    TrialRecord,
    fit,
    make_tuner,
    prepare,
    start_run,
    summarize,
    sweep_callback,
)
from sweeps.search import check_list_lengths
from sweeps.spec import Sweep, SweepInterrupted, SweepOutcome
from sweeps.tracking import MLflowSweepCallback, SweepTracker
from trainables.config import ConfigError, TrialConfig

__all__ = ["run_together", "SHARED_FIELDS"]

# What the sweeps run together must agree on: one Tune run, one scheduler, one store.
SHARED_FIELDS = ("name", "metric", "mode", "reduction_factor", "rung_margin", "tracking_uri",
                 "storage_path", "address", "max_failures", "max_concurrent")

# A sweep's outcome, or the error that ended it (every one of its trials failed).
Done = Callable[[int, "SweepOutcome | RuntimeError"], None]


@dataclass
class _Part:
    """One sweep of the run: its points are ``points`` of the combined list."""

    sweep: Sweep
    base: TrialConfig
    searched: list[str]
    tracker: SweepTracker
    parent: str
    callback: MLflowSweepCallback
    progress: ConsoleProgress
    points: range
    trials: dict[str, Any] = field(default_factory=dict)  # trial id -> Tune trial
    outcome: SweepOutcome | RuntimeError | None = None
    ended: bool = False  # its MLflow run ended


def run_together(sweeps: Sequence[Sweep], folder: str, on_done: Done | None = None
                 ) -> list[SweepOutcome | RuntimeError]:
    """Run ``sweeps`` (points sweeps) in one Tune run in ``folder``; each one's outcome,
    or the RuntimeError of one whose every trial failed. ``on_done(i, outcome)`` is
    called as sweep ``i`` ends, while the others may still run."""
    _check(sweeps)
    prepared = [prepare(sweep) for sweep in sweeps]
    first = prepared[0][0]
    with driver_lock(Path(first.storage_path).resolve() / folder / ".driver.lock",
                     f"sweeps {folder}"):
        return _run(prepared, folder, on_done)


def _check(sweeps: Sequence[Sweep]) -> None:
    if not sweeps:
        raise ConfigError("run_together needs at least one sweep")
    for sweep in sweeps:
        if not sweep.points or sweep.resume_run_id:
            raise ConfigError(f"sweep {sweep.title or sweep.name} is invalid here: allowed "
                              "points sweeps that start afresh (no space, no resume_run_id)")
        for name in SHARED_FIELDS:
            if getattr(sweep, name) != getattr(sweeps[0], name):
                raise ConfigError(f"{name}={getattr(sweep, name)!r} of sweep "
                                  f"{sweep.title or sweep.name} is invalid: allowed the "
                                  f"same as the first sweep's ({getattr(sweeps[0], name)!r})")
    first = sweeps[0]
    check_list_lengths([(f"sweep {first.title or first.name}", first.base.to_flat()),
                        *((f"sweep {s.title or s.name}", s.base.replace(p).to_flat())
                          for s in sweeps for p in s.points)])


def _run(prepared: list, folder: str, on_done: Done | None) -> list[SweepOutcome | RuntimeError]:
    parts: list[_Part] = []
    router = _Router(parts, on_done)
    saved = False  # Tune returned, its final state saved: summarized sweeps are in it
    try:
        for sweep, base, searched, design, tracker in prepared:
            start = parts[-1].points.stop if parts else 0
            points = range(start, start + len(sweep.points))
            parent = start_run(sweep, base, tracker, searched, design, folder,
                               {"tune_points": f"{points.start}:{points.stop}"})
            callback = sweep_callback(sweep, tracker, searched)
            progress = ConsoleProgress(callback, searched, sweep.metric, base.train.epochs,
                                       label=sweep.title or sweep.name)
            parts.append(_Part(sweep, base, searched, tracker, parent, callback, progress,
                               points))
        first = parts[0].sweep
        init_ray(first.address)
        for part in parts:
            part.base = with_cluster_gpus(part.sweep, part.base, part.tracker, part.parent)
        with _state_saved_every(STATE_PERIOD_S):
            fit(_tuner(parts, router, folder), router, parts[0].parent,
                first.storage_path, resume=RESUME)
        saved = True
        _end_summarized(parts)
        if any(part.outcome is None for part in parts):  # a Ctrl-C that Tune caught
            router.end_interrupted(f"the sweep was interrupted; {RESUME}")
            raise SweepInterrupted(next(p.parent for p in parts if p.outcome is None))
    except KeyboardInterrupt:
        if saved:  # a Ctrl-C just after Tune returned
            _end_summarized(parts)
        _end_all(parts, "KILLED")
        raise
    except BaseException as exc:
        router.end_interrupted(f"the run of several sweeps failed: {exc!r}")
        _end_all(parts, "FAILED")
        raise
    return [part.outcome for part in parts]


def _end_summarized(parts: list[_Part]) -> None:
    """Tune saved its state as it returned: a summarized sweep's results are in it."""
    for part in parts:
        if part.outcome is not None and not part.ended:
            status = "FAILED" if isinstance(part.outcome, RuntimeError) else "FINISHED"
            part.tracker.end_run(part.parent, status)
            part.ended = True


RESUME = "resume the study (or sweeps) it belongs to with --resume"

# Tune saves its whole state (every trial's config and last result: 8 MB for the default
# study's 256 points) every TUNE_GLOBAL_CHECKPOINT_S; sweeps.ray_env asks for every
# second, for the trial-by-trial resume of a single sweep. A run of sweeps together
# resumes by sweep, from the state Tune saves as it returns: saved every second, that
# state cost the driver about 8 GB of writes and its CPU time over the default study.
STATE_PERIOD_S = "300"


@contextlib.contextmanager
def _state_saved_every(seconds: str) -> Iterator[None]:
    """TUNE_GLOBAL_CHECKPOINT_S for the Tune runs started inside (read as Tune starts)."""
    before = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = seconds
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TUNE_GLOBAL_CHECKPOINT_S", None)
        else:
            os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = before


def _end_all(parts: list[_Part], status: str) -> None:
    """End every sweep run not ended FINISHED or FAILED above (a summarized one too: Tune
    may not have saved the state that holds its results)."""
    for part in parts:
        if not part.ended:
            part.tracker.end_run(part.parent, status)
            part.ended = True


def _tuner(parts: list[_Part], router: _Router, folder: str) -> Any:
    first = parts[0]
    points = [absolute_paths(part.base.replace(p)).to_flat()
              for part in parts for p in part.sweep.points]
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep = first.sweep
    if any(part.sweep.rungs for part in parts):
        # No limit in the generator: it counts paused trials as running (see
        # sweeps.search.build_search); the cluster's CPUs limit.
        scheduler = SynchronousHalving(
            sweep.metric, sweep.mode, reduction=int(sweep.reduction_factor),
            margin=sweep.rung_margin,
            cohorts=[(len(part.points), tuple(part.sweep.rungs)) for part in parts])
        search = (BasicVariantGenerator(points_to_evaluate=points), scheduler, len(points))
    else:
        search = (BasicVariantGenerator(points_to_evaluate=points,
                                        max_concurrent=sweep.max_concurrent),
                  FIFOScheduler(), len(points))
    single = all(TrialConfig.from_flat(p).train.num_workers == 1 for p in points)
    extra = list(dict.fromkeys(c for part in parts for c in part.sweep.callbacks))
    callbacks = [DiskFullWatch(), router, *finite_tensorboard_logger(), *extra]
    return make_tuner(sweep, first.base.to_flat(), search, callbacks, folder,
                      reuse_actors=single)


class _Router(Callback):
    """Hands each trial's hooks to its own sweep's MLflow callback and console progress;
    ends a sweep's run (table, plot, FINISHED) as soon as its last trial has ended."""

    def __init__(self, parts: list[_Part], on_done: Done | None) -> None:
        self.parts, self.on_done = parts, on_done

    def _part(self, trial: Any) -> _Part:
        i = point_index(trial)
        return next(part for part in self.parts if i in part.points)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        part = self._part(trial)
        part.trials[trial.trial_id] = trial
        part.callback.on_trial_start(iteration, trials, trial, **info)
        part.progress.on_trial_start(iteration, trials, trial, **info)

    def on_trial_result(self, iteration: int, trials: list, trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        part = self._part(trial)
        part.callback.on_trial_result(iteration, trials, trial, result, **info)
        part.progress.on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        part = self._part(trial)
        part.callback.on_trial_complete(iteration, trials, trial, **info)
        part.progress.on_trial_complete(iteration, trials, trial, **info)
        self._maybe_done(part)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        part = self._part(trial)
        part.trials.setdefault(trial.trial_id, trial)  # it may fail before it starts
        part.callback.on_trial_error(iteration, trials, trial, **info)
        part.progress.on_trial_error(iteration, trials, trial, **info)
        self._maybe_done(part)

    def end_interrupted(self, why: str) -> None:
        """Ctrl-C (or a full disk): the open trial runs of every unfinished sweep end
        KILLED, saying ``why``."""
        for part in self.parts:
            if part.outcome is None:
                part.callback.end_interrupted(why)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """A trial whose reused process failed to reset ends ERROR without any hook: end
        its run FAILED here, or its sweep would wait for it forever. (At a Ctrl-C Tune
        marks the trials TERMINATED without hooks: those stay unfinished.)"""
        for trial in trials:
            if trial.status == Trial.ERROR:
                part = self._part(trial)
                if trial.trial_id not in part.callback.statuses:
                    self.on_trial_error(iteration, trials, trial)

    def _maybe_done(self, part: _Part) -> None:
        """Summarize a sweep whose trials all ended. Nothing raised here may reach Tune (a
        callback's error would stop the run of every sweep, or leave a trial paused
        forever): a sweep whose summary fails ends FAILED, saying why."""
        if part.outcome is not None or len(part.callback.ended_now) < len(part.points):
            return
        records = [TrialRecord(dict(t.last_result or {}), dict(t.config),
                               part.callback.histories.get(t.trial_id, []))
                   for t in sorted(part.trials.values(), key=point_index)]
        try:
            part.outcome = summarize(part.sweep, records, part.callback, part.tracker,
                                     part.parent, part.searched)
        except Exception as exc:  # noqa: BLE001 (see the docstring)
            if not isinstance(exc, RuntimeError):  # RuntimeError: no trial reported
                traceback.print_exc()
            self._failed(part, exc if isinstance(exc, RuntimeError) else
                         RuntimeError(f"its summary failed: {exc!r}"))
        if self.on_done is None:
            return
        try:
            self.on_done(self.parts.index(part), part.outcome)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            self._failed(part, RuntimeError(f"its result could not be used: {exc!r}"))

    @staticmethod
    def _failed(part: _Part, error: RuntimeError) -> None:
        part.outcome = error
        part.tracker.set_tags(part.parent, {"mlflow.note.content": str(error)})
