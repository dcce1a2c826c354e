"""Tune callbacks of a sweep besides MLflow's: console progress, the full-disk watch, and a
TensorBoard logger that skips non-finite values.
"""
from __future__ import annotations

import math
import time
from typing import Any

from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback

from sweeps.tracking import MLflowSweepCallback, format_value, last_error_line

__all__ = ["ConsoleProgress", "DiskFullWatch", "NoSpaceLeft", "finite_tensorboard_logger"]


class NoSpaceLeft(Exception):
    """A trial failed writing (its checkpoint, its results) because the disk is full."""


class DiskFullWatch(Callback):
    """Stops the sweep at the first trial failure that is a full disk (errno 28 in its
    error): every later checkpoint would fail the same way, and Tune would go on starting
    and retrying trials, each failing (measured: all 4 trials of a smoke sweep, then a
    traceback from Tune reading a truncated error file). Raised from a callback, the
    error leaves ``tuner.fit()`` (wrapped in a TuneError: ``full`` says what it was);
    Tune's last saved state stays resumable. Called before the MLflow callback, and on
    the failure Tune would retry too (on_trial_recover): the trial is then unfinished,
    and --resume goes on with it from its last checkpoint."""

    def __init__(self) -> None:
        self.full: str | None = None  # the trial's error line, once the disk was full

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def _check(self, trial: Any) -> None:
        line = last_error_line(trial)
        if "[Errno 28]" in line or "No space left on device" in line:
            self.full = line
            raise NoSpaceLeft(line)


class ConsoleProgress(Callback):
    """One line per trial start, epoch report and ending. (Tune's own output prints every
    trial's whole config; this prints what a researcher watches.)"""

    def __init__(self, tracking: MLflowSweepCallback, searched: list[str], metric: str,
                 epochs: int, label: str = "") -> None:
        self.tracking = tracking  # it already knows how each trial ended
        self.searched, self.metric, self.epochs = searched, metric, epochs
        self.label = f"({label}) " if label else ""  # which sweep, where several share a run
        self.start = time.time()

    def _say(self, trial: Any, text: str) -> None:
        print(f"[{time.time() - self.start:6.0f}s] {trial} {self.label}{text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = " ".join(f"{k}={format_value(trial.config.get(k))}" for k in self.searched)
        self._say(trial, f"started: {params}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        self._say(trial, f"epoch {result.get('epoch')}/{self.epochs} "
                         f"{self.metric}={format_value(result.get(self.metric, float('nan')))} "
                         f"train_loss={format_value(result.get('train_loss', float('nan')))} "
                         f"{format_value(result.get('images_per_s', 0.0))} img/s")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.tracking.diverged(trial):
            ending = "diverged (non-finite training loss): stopped"
        elif self.tracking.status(trial) == "FINISHED":
            ending = "finished"
        else:
            ending = "stopped early by the scheduler"
        self._say(trial, ending)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trial, f"FAILED: see {trial.error_file}")


class _FiniteTBXLogger(TBXLoggerCallback):
    """Tune's TensorBoard logger, minus non-finite values: a diverged epoch reports +inf
    losses, and tensorboardX prints "NaN or Inf found in input tensor" for each. (Given
    one, Tune adds no default TensorBoard logger of its own.)"""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        finite = {k: v for k, v in result.items()
                  if not (isinstance(v, float) and not math.isfinite(v))}
        super().log_trial_result(iteration, trial, finite)


def finite_tensorboard_logger() -> list[Any]:
    try:
        return [_FiniteTBXLogger()]
    except ImportError:  # no tensorboardX: Tune logs CSV and JSON only
        return []
