"""Run a sweep: Optuna (define-by-run, TPE) proposes, ASHA stops, MLflow records; or run
explicit points (a fixed design, seed re-runs), each trial to its last epoch.

Every sweep script describes a :class:`Sweep` (a base config, a search space function or
points, the metric) and calls :func:`run_sweep`; a study of many cells uses
:mod:`sweeps.study`, which runs one sweep per cell. Before any Ray work starts, the space is sampled
once and every proposed config validated, and the MLflow store is opened: bad input fails
in a second with the field's name, not minutes later inside a worker.

Example::

    def space(trial):
        trial.suggest_float("optim.lr", 1e-3, 0.5, log=True)

    outcome = run_sweep(Sweep(name="demo", base=TrialConfig(), space=space, num_samples=4))
    print(outcome.best["test_acc"])
"""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps.callbacks import ConsoleProgress, DiskFullWatch, finite_tensorboard_logger
from sweeps.init_weights import (
    RUN_CHECKPOINT,
    absolute_paths,
    check_initial_weights,
    check_prunable_models,
    resolve_run_checkpoints,
)
from sweeps.outcome import diverged
from sweeps.ray_env import init_ray, with_cluster_gpus
from sweeps.ray_private import (
    restored_trials,
    result_trials,
    set_tuner_callbacks,
    tuner_callbacks,
)
from sweeps.resume import disk_space, driver_lock, resumable_folder
from sweeps.search import (
    build_search,
    describe_search,
    fixed_config,
    space_ranges,
    validate_points,
    validate_space,
)
from sweeps.spec import SUMMARY_METRICS, Sweep, SweepInterrupted, SweepOutcome
from sweeps.tracking import (
    MLflowSweepCallback,
    SweepTracker,
    plot_sweep,
)
from trainables.config import TrialConfig
from trainables.data import prepare_data

__all__ = ["run_sweep", "mlflow_ui_command", "prepare", "start_run", "sweep_callback",
           "make_tuner", "fit", "summarize", "TrialRecord"]


def _tuner(sweep: Sweep, base: TrialConfig, callback: MLflowSweepCallback, run_name: str,
           searched: list[str]):
    return make_tuner(sweep, base.to_flat(), build_search(sweep, base),
                      _callbacks(sweep, base, callback, searched), run_name,
                      reuse_actors=_single_worker(sweep, base))


def make_tuner(sweep: Sweep, param_space: dict[str, Any], search: tuple[Any, Any, int],
               callbacks: list[Any], run_name: str, reuse_actors: bool):
    """The Tuner of a sweep (or of sweeps run together, with ``sweep`` the first):
    ``search`` is (searcher, scheduler, num_samples)."""
    from ray import tune

    from trainables.tune_trial import trainable

    # Explicit points are whole configs: Tune warns, key by key, that each differs from
    # the base it is laid over (dozens of lines per cell); that is the point of them.
    logging.getLogger("ray.tune.search.variant_generator").setLevel(logging.ERROR)
    searcher, scheduler, num_samples = search
    return tune.Tuner(
        trainable(),
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=num_samples,
                                    max_concurrent_trials=None if sweep.points
                                    else sweep.max_concurrent,
                                    # One process runs trial after trial: no process
                                    # start and imports per trial (~3 s each here). Not
                                    # for DDP trials: their worker group's resources are
                                    # released when the trial's process ends.
                                    reuse_actors=reuse_actors,
                                    trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=str(Path(sweep.storage_path).resolve()),
            callbacks=callbacks,
            # Bounded disk: per trial the best checkpoint by the sweep's metric and the
            # latest (Tune never deletes the latest: restarts and --resume need it).
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=sweep.metric,
                checkpoint_score_order=sweep.mode),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            verbose=0,  # ConsoleProgress prints the progress
        ),
    )


def _callbacks(sweep: Sweep, base: TrialConfig, callback: MLflowSweepCallback,
               searched: list[str]) -> list[Any]:
    return [DiskFullWatch(), callback,
            ConsoleProgress(callback, searched, sweep.metric, base.train.epochs),
            *finite_tensorboard_logger(), *sweep.callbacks]


def _single_worker(sweep: Sweep, base: TrialConfig) -> bool:
    """Every trial of the sweep trains in its own process (no Ray Train worker group)."""
    return base.train.num_workers == 1 and all(
        base.replace(point).train.num_workers == 1 for point in sweep.points)


def _stopper(sweep: Sweep) -> str:
    """The scheduler that stops this sweep's trials early, as their runs say it."""
    return "synchronous successive halving" if sweep.rungs else "ASHA"


def _trial_name(trial: Any) -> str:
    # Tune's default names spell out every config key: too long for paths and the UI.
    return f"trial_{trial.trial_id}"


def run_sweep(sweep: Sweep) -> SweepOutcome:
    """Validate, run the Tune search, and record the sweep as a parent MLflow run."""
    sweep, base, searched, design, tracker = prepare(sweep)
    if sweep.resume_run_id:
        return _resume(sweep, base, tracker, searched)
    # The MLflow parent run and the Tune run folder share this name.
    run_name = sweep.run_name or f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Locked before the MLflow run exists: a second driver on this folder stops with an
    # error and leaves no run behind.
    with driver_lock(Path(sweep.storage_path).resolve() / run_name / ".driver.lock",
                     f"sweep {run_name}"):
        return _run_new(sweep, base, tracker, searched, design, run_name)


def prepare(sweep: Sweep) -> tuple[Sweep, TrialConfig, list[str], dict[str, str],
                                   SweepTracker]:
    """Everything checked before Ray starts: (sweep, its base with absolute paths, the
    keys it varies, its design params, its tracker)."""
    base = absolute_paths(sweep.base)
    if sweep.points:
        searched = validate_points(base, sweep.points)
        datasets = {base.replace(p).data for p in sweep.points}
        design = {"sweep.design": "points"}
    else:
        searched = validate_space(base, sweep.space)
        datasets = {base.data}
        design = {"sweep.design": "optuna", **space_ranges(sweep.space)}
    if sweep.prepare_data:
        for data in datasets:
            prepare_data(data)
    check_initial_weights(base, sweep.points, build=sweep.prepare_data)
    if sweep.prepare_data:
        check_prunable_models(base, sweep.points)
    tracker = SweepTracker(sweep.tracking_uri, sweep.name)  # fails now if the store is bad
    if RUN_CHECKPOINT in repr((base.train.init_from, sweep.points)):
        sweep, base = resolve_run_checkpoints(sweep, base, tracker)
        check_initial_weights(base, sweep.points, build=sweep.prepare_data)
    return sweep, base, searched, design, tracker


def start_run(sweep: Sweep, base: TrialConfig, tracker: SweepTracker, searched: list[str],
              design: dict[str, str], run_name: str, tags: dict[str, str] | None = None
              ) -> str:
    """The sweep's MLflow run (nested under ``sweep.parent_run_id`` if set): its params
    say the design, its tags where its Tune folder is (``run_name``)."""
    nested = {"mlflow.parentRunId": sweep.parent_run_id} if sweep.parent_run_id else {}
    searcher, scheduler = describe_search(sweep)
    return tracker.start_sweep(
        sweep.title or run_name,
        params={"sweep.num_samples": len(sweep.points) or sweep.num_samples,
                "sweep.metric": sweep.metric,
                "sweep.mode": sweep.mode, "sweep.max_concurrent": sweep.max_concurrent,
                "sweep.searcher": searcher, "sweep.scheduler": scheduler,
                "sweep.seed": sweep.seed, "sweep.varied": ",".join(searched), **design,
                **sweep.params,
                # The fixed fields as the trials ran them (a point's constants included);
                # a searched field's base value is not what ran.
                **{k: v for k, v in fixed_config(sweep, base).tracked_params().items()
                   if k not in searched}},
        tags={"sweep": sweep.name, "kind": sweep.kind or ("points" if sweep.points else "search"),
              "phase": sweep.phase, "tune_folder": run_name, **sweep.tags, **nested,
              **(tags or {})})


def sweep_callback(sweep: Sweep, tracker: SweepTracker, searched: list[str],
                   resumed: dict[str, Any] | None = None) -> MLflowSweepCallback:
    return MLflowSweepCallback(tracker, varied=searched, phase=sweep.phase,
                               log_checkpoint=sweep.log_checkpoints, resumed=resumed,
                               stopper=_stopper(sweep))


def _run_new(sweep: Sweep, base: TrialConfig, tracker: SweepTracker, searched: list[str],
             design: dict[str, str], run_name: str) -> SweepOutcome:
    parent = start_run(sweep, base, tracker, searched, design, run_name)
    callback = sweep_callback(sweep, tracker, searched)
    with tracker.ending(parent):
        init_ray(sweep.address)
        base = with_cluster_gpus(sweep, base, tracker, parent)
        results = fit(_tuner(sweep, base, callback, run_name, searched), callback, parent,
                      sweep.storage_path)
        return _finish_sweep(sweep, results, callback, tracker, parent, searched)


def _resume(sweep: Sweep, base: TrialConfig, tracker: SweepTracker, searched: list[str]
            ) -> SweepOutcome:
    """Go on with an interrupted sweep: its Tune folder restored (finished trials stay
    finished; unfinished ones resume from their last checkpoint; the searcher's state is
    Tune's saved copy), its MLflow run and trial runs reused."""
    parent = sweep.resume_run_id
    path = resumable_folder(tracker, parent, sweep)
    with driver_lock(path / ".driver.lock", f"sweep run {parent}"):
        return _resume_locked(sweep, base, tracker, searched, parent, path)


def _resume_locked(sweep: Sweep, base: TrialConfig, tracker: SweepTracker,
                   searched: list[str], parent: str, path: Path) -> SweepOutcome:
    from ray import tune

    from trainables.tune_trial import trainable

    children = tracker.child_runs(parent)
    print(f"resuming sweep run {parent} ({len(children)} trial runs so far) from {path}",
          flush=True)
    tracker.reopen_run(parent)
    tracker.parent_run_id = parent  # new trials nest under it
    callback = sweep_callback(sweep, tracker, searched, resumed=children)
    with tracker.ending(parent):
        init_ray(sweep.address)
        tuner = tune.Tuner.restore(str(path), trainable(), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # Tune restores the callbacks as pickled at the first start (their MLflow state
        # as it was then): use fresh ones that know this sweep's runs.
        set_tuner_callbacks(tuner, _callbacks(sweep, base, callback, searched))
        done_before = {t.trial_id for t in restored_trials(tuner)
                       if t.status in ("TERMINATED", "ERROR")}
        results = fit(tuner, callback, parent, sweep.storage_path)
        return _finish_sweep(sweep, results, callback, tracker, parent, searched,
                             done_before)


def fit(tuner: Any, callback: Any, parent: str, storage: str,
        resume: str | None = None) -> Any:
    """``tuner.fit()``; a Ctrl-C Tune does not catch itself (a second one, or one outside
    its loop) still ends the open trial runs KILLED and says how to resume (``resume``,
    default ``resume it with --resume PARENT``); so does a full disk. Tune installs its
    SIGINT handler for the run and leaves it installed after: restored here, else a
    Ctrl-C after this sweep (between a study's sweeps) would only stop a finished run."""
    resume = resume or f"resume it with --resume {parent}"
    handler = signal.getsignal(signal.SIGINT)
    watch = next(c for c in tuner_callbacks(tuner)
                 if isinstance(c, DiskFullWatch))
    try:
        return tuner.fit()
    except KeyboardInterrupt:
        callback.end_interrupted(f"the sweep was interrupted; {resume}")
        raise SweepInterrupted(parent) from None
    except Exception:
        if watch.full is None:
            raise
        where = disk_space(Path(storage).resolve(), Path(tempfile.gettempdir()))
        callback.end_interrupted(f"a disk is full ({watch.full}; {where}); free space, "
                                 f"then {resume}")
        raise SweepInterrupted(parent, cause=f"no space left on device while a trial wrote "
                               f"its checkpoint ({watch.full}); {where}") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def _finish_sweep(sweep: Sweep, results: Any, callback: MLflowSweepCallback,
                  tracker: SweepTracker, parent: str, searched: list[str],
                  done_before: set[str] | frozenset[str] = frozenset()) -> SweepOutcome:
    """Tune returned: after Ctrl-C (not every trial ended), end the runs KILLED and say how
    to resume; else settle runs a killed driver left RUNNING, and summarize."""
    # At a Ctrl-C Tune stops the running and pending trials and marks them TERMINATED
    # without the completion hooks: a trial really ended if its hooks ran this session,
    # or if it had ended in the state a resume restored.
    trials = result_trials(results)
    ended = done_before | callback.ended_now
    if len(trials) < (len(sweep.points) or sweep.num_samples) or \
            any(t.trial_id not in ended for t in trials):
        callback.end_interrupted(f"the sweep was interrupted; resume it with --resume {parent}")
        raise SweepInterrupted(parent)
    callback.settle(results)
    return _summarize(sweep, results, callback, tracker, parent, searched)


@dataclass(frozen=True)
class TrialRecord:
    """What a sweep's summary reads of one trial: its last result (``metrics``), its
    config and its per-epoch reports; from a Tune Result after the run, or from the
    trial itself when a sweep run together with others ends first."""

    metrics: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, Any]]


def _record(result: Any) -> TrialRecord:
    history = result.metrics_dataframe.to_dict("records") \
        if result.metrics_dataframe is not None else [result.metrics]
    return TrialRecord(result.metrics or {}, result.config, history)


def _summarize(sweep: Sweep, results: Any, callback: MLflowSweepCallback,
               tracker: SweepTracker, parent: str, searched: list[str]) -> SweepOutcome:
    outcome = summarize(sweep, [_record(r) for r in results], callback, tracker, parent,
                        searched)
    outcome.results = results
    return outcome


def summarize(sweep: Sweep, records: list[TrialRecord], callback: MLflowSweepCallback,
              tracker: SweepTracker, parent: str, searched: list[str]) -> SweepOutcome:
    """The sweep's table and plot on its run, its best trial; ``results`` are the records."""
    rows = []
    for record in records:
        if not record.metrics or sweep.metric not in record.metrics:
            continue  # failed before its first report
        trial_id = record.metrics.get("trial_id", "")
        params = {k: record.config[k] for k in searched if k in record.config}
        row = {"trial_id": trial_id, "status": callback.statuses.get(trial_id, "UNKNOWN"),
               "diverged": diverged(record.history),
               "mlflow_run_id": callback.run_ids.get(trial_id, ""), **params}
        objectives = (m for m, _ in sweep.objectives)
        for key in dict.fromkeys((*SUMMARY_METRICS, sweep.metric, *objectives)):
            if key in record.metrics:
                row[key] = record.metrics[key]
        rows.append(row)
    if not rows:
        raise RuntimeError(f"sweep {sweep.name!r}: no trial reported a result; see the "
                           "errors above and the FAILED child runs in MLflow")
    sign = 1.0 if sweep.mode == "max" else -1.0
    best = max(rows, key=lambda r: sign * r[sweep.metric] if sweep.metric in r
               else float("-inf"))
    best_record = next(r for r in records if r.metrics and
                       r.metrics.get("trial_id") == best["trial_id"])
    tracker.log_table(parent, rows, "trials")
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_sweep(rows, searched, sweep.metric, Path(tmp) / "sweep.png",
                         f"{sweep.name}: {len(rows)} trials")
        if png is not None:
            tracker.log_artifact(parent, png)
    if sweep.log_best:
        tracker.log_metrics(parent, {f"best_{k}": v for k, v in best.items()
                                     if k in SUMMARY_METRICS or k == sweep.metric}, step=0)
        tracker.set_tags(parent, {"best_trial_id": best["trial_id"],
                                  "best_mlflow_run_id": best["mlflow_run_id"]})
    return SweepOutcome(best=best, best_config=dict(best_record.config), rows=rows,
                        parent_run_id=parent, tracking_uri=sweep.tracking_uri,
                        experiment=sweep.name, results=records)


def mlflow_ui_command(tracking_uri: str) -> str:
    """The light UI (sweeps/ui.py: one worker, bound to 127.0.0.1) on this store."""
    return f"python -m sweeps.ui --tracking-uri {tracking_uri}"
