"""Resuming sweeps and studies: the driver lock (one driver per run folder), finding the
newest unfinished run, checking that a Tune folder can be restored, and saying which
disk is full.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Iterator

from sweeps.spec import Sweep
from sweeps.tracking import SweepTracker
from trainables.config import ConfigError

__all__ = ["driver_lock", "resumable_folder", "restorable", "find_resumable", "disk_space",
           "unfinished_run", "reopen_study_run", "nested_run_of_folder", "nested_cell_run",
           "resume_or_restart", "retire_run", "read_back", "cell_grid"]


@contextlib.contextmanager
def driver_lock(path: Path, what: str) -> Iterator[None]:
    """Hold ``path`` locked while this driver runs ``what``: a second driver (a --resume
    of a sweep still running) stops with a clear error. The kernel drops the lock when
    this process dies, however it dies (SIGKILL included), so a resume after a crash
    is never refused."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b", buffering=0) as handle:  # unbuffered: a full disk fails here
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().decode(errors="replace").strip() or "another process"
            raise ConfigError(f"{what} is running now ({holder}): wait for it, or stop it "
                              "first (Ctrl-C), then --resume") from None
        handle.seek(0)
        handle.truncate()
        try:
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}".encode())
        except OSError as err:  # ENOSPC names no file: say which
            err.filename = err.filename or str(path)
            raise
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def disk_space(*folders: Path) -> str:
    """"free: DIR N MiB, ..." for the folders a trial writes (the storage path, the temp
    folder checkpoints are staged in), to say which disk is full."""
    free = []
    for folder in dict.fromkeys(folders):
        probe = next((p for p in (folder, *folder.parents) if p.exists()), folder)
        try:
            stat = os.statvfs(probe)
            free.append(f"{folder} {stat.f_bavail * stat.f_frsize / 2**20:.1f} MiB")
        except OSError:
            free.append(f"{folder} unknown")
    return "free: " + ", ".join(free)


def unfinished_run(tracker: SweepTracker, run_id: str, fits: Callable[[Any], bool], expected: str,
                   noun: str) -> Any:
    """The MLflow run ``--resume run_id`` names, checked: ``fits`` says whether it is of
    the kind expected (a sweep run, a study run); a finished one cannot be resumed."""
    run = tracker.get_run(run_id)
    if run is None or not fits(run):
        raise ConfigError(f"--resume {run_id} is invalid: allowed the run id of {expected}")
    if run.info.status == "FINISHED":
        raise ConfigError(f"--resume {run_id} is invalid: that {noun} finished; allowed an "
                          "interrupted, killed or failed one")
    return run


def resumable_folder(tracker: SweepTracker, run_id: str, sweep: Sweep) -> Path:
    """The Tune folder of the sweep run ``run_id``, checked before any Ray work: a sweep
    run of this experiment, unfinished, of this metric, with a restorable state."""
    run = unfinished_run(tracker, run_id, lambda r: "tune_folder" in r.data.tags,
                         f"a sweep run of experiment {tracker.experiment_name!r} (see "
                         "find_resumable)", "sweep")
    was = run.data.params.get("sweep.metric")
    if was is not None and was != sweep.metric:
        raise ConfigError(f"--resume {run_id} is invalid here: that sweep searched on "
                          f"{was}, this command on {sweep.metric} (allowed: the command it "
                          "was started with)")
    path = Path(sweep.storage_path).resolve() / run.data.tags["tune_folder"]
    if not restorable(path):
        raise ConfigError(f"--resume {run_id}: its Tune state {path} is missing, or holds "
                          "no trial yet (was --storage-path different? was it stopped "
                          "before its first trial?); start the sweep again without --resume")
    return path


def reopen_study_run(tracker: SweepTracker, run_id: str, name: str) -> tuple[str, str]:
    """(run id, stamp) of the study run to resume, RUNNING again."""
    run = unfinished_run(tracker, run_id, lambda r: r.data.tags.get("kind") == "study" and
                         "stamp" in r.data.tags,
                         f"an unfinished {name} study run (tag kind=study)", "study")
    print(f"resuming study run {run_id}", flush=True)
    tracker.reopen_run(run_id)
    tracker.parent_run_id = run_id
    return run_id, run.data.tags["stamp"]


def nested_run_of_folder(tracker: SweepTracker, parent: str, folder: str) -> Any | None:
    """The sweep run nested under ``parent`` (a study) whose Tune folder is ``folder``."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and "
                                 f"tags.tune_folder = '{folder}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def nested_cell_run(tracker: SweepTracker, parent: str, label: str) -> Any | None:
    """The newest search run of cell ``label`` nested under the study run ``parent``."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and "
                                 f"tags.kind = 'search' and tags.cell = '{label}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def retire_run(tracker: SweepTracker, run: Any, why: str) -> None:
    """A sweep run that a resumed study runs again as a new run: an interrupted one ends
    KILLED, its description saying ``why``, with any trial run a killed driver left
    RUNNING; a FAILED one (every trial failed) keeps its status and description."""
    if run.info.status == "FAILED":
        return
    for trial in tracker.child_runs(run.info.run_id).values():
        if trial.info.status == "RUNNING":
            tracker.set_tags(trial.info.run_id, {
                "mlflow.note.content": "Its driver stopped before the trial ended; the "
                "resumed study ran its sweep again.", "interrupted": "true"})
            tracker.end_run(trial.info.run_id, "KILLED")
    tracker.set_tags(run.info.run_id, {"mlflow.note.content": f"{why}; the resumed study "
                     "ran this sweep again as a new run."})
    tracker.end_run(run.info.run_id, "KILLED")


def resume_or_restart(tracker: SweepTracker, storage_path: str, earlier: Any | None,
                      folder: str, afresh: bool = False) -> str | None:
    """The unfinished sweep run (``earlier``) to resume in a resumed study; None to run it
    afresh (none yet, ``afresh`` asked, or interrupted before Tune saved a state with a
    trial: that run ends KILLED, saying so, and its folder is cleared)."""
    if earlier is None:
        return None
    path = Path(storage_path).resolve() / folder
    if not path.exists():
        raise ConfigError(f"--resume: the study's Tune folder {path} is missing (was "
                          "--storage-path different?); allowed the --storage-path it ran with")
    if restorable(path) and not afresh:
        return earlier.info.run_id
    retire_run(tracker, earlier, HALVING_LOST if afresh else
               "Interrupted before Tune saved a state with a trial in it")
    shutil.rmtree(path, ignore_errors=True)
    return None


HALVING_LOST = "Interrupted; its successive-halving decisions are not in Tune's saved state"


def read_back(storage_path: str, folder: str) -> Any:
    """The ResultGrid of a finished sweep, from its Tune folder."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    return ResultGrid(ExperimentAnalysis(str(Path(storage_path).resolve() / folder)))


def cell_grid(storage_path: str, run: Any, grids: dict[str, Any]) -> list[Any]:
    """The Tune results of the sweep run ``run`` from its Tune folder (tag
    ``tune_folder``), only its own where sweeps ran together (tag ``tune_points``,
    ``start:stop`` of the folder's trials). ``grids`` caches each folder read."""
    from sweeps.halving import point_index
    from sweeps.tracking import result_trial_id

    folder = run.data.tags.get("tune_folder", run.info.run_name)
    if folder not in grids:
        grids[folder] = list(read_back(storage_path, folder))
    span = run.data.tags.get("tune_points")
    if span is None:
        return grids[folder]
    start, stop = (int(x) for x in span.split(":"))
    return [r for r in grids[folder]
            if start <= point_index(result_trial_id(r)) < stop]


def restorable(path: Path) -> bool:
    """Tune can go on from ``path``: its state was saved with at least one trial in it.
    (A state saved before any trial existed does not restore: Tune's variant generator
    then fails on the dotted config keys with a KeyError.)"""
    import json

    from ray import tune

    if not tune.Tuner.can_restore(str(path)):
        return False
    states = sorted(path.glob("experiment_state-*.json"))
    try:
        return bool(states) and bool(json.loads(states[-1].read_text())["trial_data"])
    except (OSError, ValueError, KeyError):
        return False


def find_resumable(tracking_uri: str, experiment: str, kind: str | None = None) -> str:
    """The newest top-level run of ``experiment`` (of tag ``kind``, if given) that did not
    finish: what ``--resume`` with no run id resumes."""
    tracker = SweepTracker(tracking_uri, experiment)
    kind_filter = f"tags.kind = '{kind}'" if kind else ""
    for run in tracker.search_all(kind_filter, order_by=["attributes.start_time DESC"]):
        if "mlflow.parentRunId" in run.data.tags:
            continue
        if run.info.status != "FINISHED":
            return run.info.run_id
        break  # the newest finished: nothing was left unfinished after it
    raise ConfigError(f"--resume is invalid here: experiment {experiment!r} has no "
                      "unfinished sweep run to resume (allowed --resume RUN_ID of an "
                      "interrupted, killed or failed one)")
