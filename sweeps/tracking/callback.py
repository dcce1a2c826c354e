"""The Tune callback that records a sweep in MLflow, on the driver.

Ray's MLflow integrations neither nest runs (ray issue 19978) nor send artifacts through
an ``http://`` tracking server from remote nodes (ray issue 36257), and a trial stopped by
ASHA stays RUNNING under ``setup_mlflow``. So all writing happens on the driver, in a Tune
:class:`~ray.tune.Callback` (:class:`MLflowSweepCallback`) that sees every result and every
ending: one writer per store (no SQLite lock contention between trials), artifacts go
wherever the tracking URI says (a server proxies them), and every child run ends
FINISHED, KILLED (stopped early by the scheduler) or FAILED.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from ray.tune import Callback

from sweeps.outcome import diverged, trial_status
from sweeps.tracking.naming import logged_params, trial_metrics, trial_run_name, trial_tags
from sweeps.tracking.plots import plot_curves
from sweeps.tracking.store import SweepTracker
from sweeps.tracking.tables import is_number
from trainables.sessions import ARTIFACTS_DIR

__all__ = ["MLflowSweepCallback", "result_history", "result_trial_id", "last_error_line",
           "diverged_description"]


class MLflowSweepCallback(Callback):
    """Mirror every Tune trial into a nested MLflow child run of the sweep's parent run.

    Name: :func:`trial_run_name` (what distinguishes the trial, ``varied``: the keys the
    sweep varies); tags: :func:`trial_tags` (``phase`` search | final, optimizer, dataset,
    model, precision, quant, seed) and the Tune trial id. Params: the config fields the
    trial reads. Per result: every numeric metric the trial reported, with ``step =
    epoch``. At the end: ``config.yaml``, ``curves.png``, the files the trial's stages
    wrote (from its final checkpoint's ``artifacts/`` folder, on whichever node it ran),
    the final checkpoint; the status by :func:`trial_status`, a ``diverged`` tag, and for
    a trial the scheduler stopped early (KILLED) a ``stopped_early`` tag and a run
    description that say so; a FAILED one's description holds its error.
    """

    def __init__(self, tracker: SweepTracker, log_checkpoint: bool = True,
                 varied: Iterable[str] = (), phase: str = "search",
                 resumed: Mapping[str, Any] | None = None, stopper: str = "ASHA") -> None:
        self.tracker = tracker
        self.stopper = stopper  # the scheduler that stops trials early, as runs name it
        self.log_checkpoint = log_checkpoint
        self.varied = tuple(varied)
        self.phase = phase
        self.run_ids: dict[str, str] = {}
        self.histories: dict[str, list[dict[str, Any]]] = {}
        self.statuses: dict[str, str] = {}
        self._checkpoint_paths: dict[str, str] = {}
        # A resumed sweep: its trial runs so far (trial id -> MLflow run), reused; the
        # ones that ended keep their status unless Tune resumes their trial.
        self._resumed = dict(resumed or {})
        self.ended_now: set[str] = set()  # trials whose end this session's hooks saw
        for trial_id, run in self._resumed.items():
            self.run_ids[trial_id] = run.info.run_id
            if run.info.status != "RUNNING":
                self.statuses[trial_id] = run.info.status

    # -- Tune hooks -----------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self._resumed:  # a resumed sweep goes on with this trial
            run_id = self.run_ids[trial.trial_id]
            self.statuses.pop(trial.trial_id, None)
            self.histories[trial.trial_id] = self.tracker.metric_rows(run_id)
            epochs = _epochs(self.histories[trial.trial_id])
            self.tracker.reopen_run(run_id, f"Resumed with its sweep after epoch {epochs}, "
                                    "from its last checkpoint.")
            del self._resumed[trial.trial_id]
            return
        if trial.trial_id in self.run_ids:  # restarted after a failure: same run
            return
        config = dict(trial.config)
        tags = {"trial_id": trial.trial_id, **trial_tags(config, self.phase)}
        self.run_ids[trial.trial_id] = self.tracker.start_trial(
            trial_run_name(config, self.varied), logged_params(config), tags)
        self.histories[trial.trial_id] = []

    def on_trial_result(self, iteration: int, trials: list, trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        history = self.histories[trial.trial_id]
        if not history:  # first report: where it ran
            self.tracker.set_tags(run_id, {"device": result.get("device", "unknown"),
                                           "worker_hostname": result.get("hostname", "")})
        metrics = trial_metrics(result)
        # A trial resumed from its checkpoint re-reports the epochs after it: replace.
        while history and history[-1].get("epoch", -1) >= metrics.get("epoch", math.inf):
            history.pop()
        history.append(metrics)
        self.tracker.log_metrics(run_id, metrics, step=int(result.get("epoch", len(history))))
        if result.get("checkpoint_path"):  # a Ray Train (DDP) trial's own checkpoint
            self._checkpoint_paths[trial.trial_id] = result["checkpoint_path"]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any
                          ) -> None:
        self._finish(trial, self.status(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, self.status(trial, errored=True))

    def status(self, trial: Any, errored: bool = False) -> str:
        """The trial's ending by the one rule (:func:`sweeps.outcome.trial_status`)."""
        if trial.trial_id in self.statuses:
            return self.statuses[trial.trial_id]
        return trial_status(_epochs(self.histories.get(trial.trial_id, [])),
                            int(trial.config.get("train.epochs", 0)), errored,
                            self.diverged(trial))

    def diverged(self, trial: Any) -> bool:
        return diverged(self.histories.get(trial.trial_id, []))

    # -- endings --------------------------------------------------------------------------
    def end_interrupted(self, why: str) -> None:
        """Ctrl-C: every trial run still open ends KILLED, saying so and how to go on
        (also runs an earlier killed driver left RUNNING: the next resume reopens them)."""
        for trial_id in list(self.run_ids):
            if trial_id in self.statuses:
                continue
            epochs = _epochs(self.histories.get(trial_id, []))
            self._settle(trial_id, "KILLED", f"Interrupted after epoch {epochs}: {why}.",
                         interrupted="true")

    def settle(self, results: Any) -> None:
        """Runs a killed driver left RUNNING that this session did not touch: a trial Tune
        had finished ends with its true status; a run whose trial is not in Tune's saved
        state (the driver died between the two) ends KILLED, saying so."""
        seen = set()
        for result in results:
            trial_id = result_trial_id(result)
            seen.add(trial_id)
            if trial_id not in self._resumed or trial_id in self.statuses:
                continue
            history = result_history(result)
            status = trial_status(_epochs(history), int(result.config.get("train.epochs", 0)),
                                  result.error is not None, diverged(history))
            self._settle(trial_id, status, "Its trial ended while the sweep's driver was "
                         "down; status set when the sweep resumed.")
        for trial_id in set(self._resumed) - seen:
            if trial_id not in self.statuses:
                self._settle(trial_id, "KILLED", "Its trial is not in the Tune state the "
                             "sweep resumed from (the driver died first); not re-run.")

    def _settle(self, trial_id: str, status: str, note: str, **tags: str) -> None:
        """End a trial's run outside Tune's hooks: status, why (its description), tags."""
        run_id = self.run_ids[trial_id]
        self.statuses[trial_id] = status
        self.tracker.set_tags(run_id, {"ended_as": status, "mlflow.note.content": note,
                                       **tags})
        self.tracker.end_run(run_id, status)

    def _finish(self, trial: Any, status: str) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if trial.trial_id in self.statuses:
            return
        self.statuses[trial.trial_id] = status
        self.ended_now.add(trial.trial_id)
        if run_id is None:  # it failed before it started: no run to end
            return
        try:
            self._log_trial_artifacts(trial, run_id, status)
        finally:  # whatever happened to the artifacts, the run must not stay RUNNING
            self.tracker.set_tags(run_id, {"ended_as": status,
                                           "diverged": str(self.diverged(trial)).lower(),
                                           **self._ending_tags(trial, status)})
            self.tracker.end_run(run_id, status)

    def _ending_tags(self, trial: Any, status: str) -> dict[str, str]:
        """KILLED here is a scheduler decision, not a crash: say so where the UI shows it
        (the run's description is the tag ``mlflow.note.content``)."""
        epochs = len(self.histories.get(trial.trial_id, []))
        planned = int(trial.config.get("train.epochs", 0))
        if status == "KILLED":
            return {"stopped_early": f"{self.stopper} at epoch {epochs}",
                    "mlflow.note.content": f"Stopped early by {self.stopper} at epoch "
                    f"{epochs} of {planned}: its result ranked below the cut of that rung. "
                    "Not an error."}
        if status == "FAILED" and self.diverged(trial):
            return {"mlflow.note.content": diverged_description(
                self.histories[trial.trial_id], planned)}
        if status == "FAILED":
            return {"mlflow.note.content": f"Failed after {epochs} of {planned} epochs: "
                    f"{last_error_line(trial)} (full traceback: artifact error/)"}
        return {}

    def _log_trial_artifacts(self, trial: Any, run_id: str, status: str) -> None:
        import yaml

        from trainables.config import TrialConfig

        config = {k: v for k, v in trial.config.items() if "." in k}
        try:
            text = TrialConfig.from_stored(config).to_yaml()
        except ValueError:
            text = yaml.safe_dump(config)
        self.tracker.log_text(run_id, text, "config.yaml")
        history = self.histories.get(trial.trial_id, [])
        if history:
            with tempfile.TemporaryDirectory() as tmp:
                title = f"{trial_run_name(trial.config, self.varied)} ({status})"
                png = plot_curves(history, Path(tmp) / "curves.png", title)
                self.tracker.log_artifact(run_id, png)
        if status == "FAILED":
            if trial.error_file and Path(trial.error_file).exists():
                self.tracker.log_artifact(run_id, trial.error_file, "error")
        checkpoint = self._checkpoint_dir(trial)
        if checkpoint is None:
            return
        for item in sorted(Path(checkpoint).iterdir()):
            if item.name == ARTIFACTS_DIR:  # files the trial's stages wrote: the run's own
                for produced in sorted(item.iterdir()):
                    self.tracker.log_artifact(run_id, produced)
            elif self.log_checkpoint:
                self.tracker.log_artifact(run_id, item, "checkpoint")

    def _checkpoint_dir(self, trial: Any) -> str | None:
        path = self._checkpoint_paths.get(trial.trial_id)
        if path is None and getattr(trial, "checkpoint", None) is not None:
            path = trial.checkpoint.path
        return path if path and Path(path).is_dir() else None


def result_trial_id(result: Any) -> str:
    """A Tune result's trial id, also for a trial that failed before its first report:
    from its folder (``trial_<id>``, sweeps.runner names them so)."""
    return (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix(
        "trial_")


def result_history(result: Any) -> list[dict[str, Any]]:
    """A Tune result's per-epoch reports (none for a trial that never reported)."""
    frame = result.metrics_dataframe
    return [] if frame is None else frame.to_dict("records")


def _epochs(history: list[Mapping[str, Any]]) -> int:
    """Epochs a trial reported: its last ``epoch`` (a resumed trial's history may start
    later), else the number of reports."""
    epochs = [int(h["epoch"]) for h in history if is_number(h.get("epoch"))]
    return max(epochs) if epochs else len(history)


def diverged_description(history: list[Mapping[str, Any]], planned: int) -> str:
    """Where a diverged trial's loss turned non-finite and what it did then."""
    last = history[-1] if history else {}
    where = f"in epoch {len(history)} of {planned}"
    if "diverged_batch" in last:
        where = (f"in epoch {int(last['diverged_epoch'])} of {planned}, by batch "
                 f"{int(last['diverged_batch'])} (optimizer step {int(last['diverged_step'])})")
    scores = ", ".join(f"{k}={last[k]:.4g}" for k in ("val_acc", "test_acc") if k in last)
    return (f"Diverged: the training loss became non-finite {where}; the trial stopped there "
            f"and reported that epoch as its last (losses as +inf, {scores or 'no accuracy'}"
            "), which is what the searcher learned from. Not a crash: a config to avoid.")


def last_error_line(trial: Any) -> str:
    """The last line of a failed trial's error file (the exception), or 'no error file'."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [line for line in Path(path).read_text(errors="replace").splitlines()
                 if line.strip()]
        if lines:
            return lines[-1].strip()[:500]
    return "no error file"
