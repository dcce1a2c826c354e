"""The MLflow store of sweeps, plain MLflow (no Ray): one experiment per sweep, a parent run
per sweep, a nested child run per trial; opening an existing store, and finding the
artifacts of a store whose folder moved.

Example::

    tracker = SweepTracker("sqlite:///mlflow.db", "baseline")
    parent = tracker.start_sweep("baseline-1", params={"num_samples": 8})
    child = tracker.start_trial("trial-0", TrialConfig().to_flat(), tags={})
    tracker.log_metrics(child, {"test_acc": 0.99}, step=1)
    tracker.end_run(child, "FINISHED")
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import unquote, urlparse

from sweeps.provenance import environment_tags
from sweeps.tracking.tables import is_number, rows_to_csv, rows_to_markdown

# MLflow's store opens print SQLAlchemy's "noload is deprecated" on every open: noise that
# hides what matters (mlflow's own issue, not ours to act on).
warnings.filterwarnings("ignore", message=".*noload.*", category=DeprecationWarning)

__all__ = ["SweepTracker", "default_tracking_uri", "existing_store", "adopt_moved_store"]


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite store ``mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class SweepTracker:
    """Thin, explicit wrapper over :class:`mlflow.tracking.MlflowClient` (no global state)."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        adopt_moved_store(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        existing = self.client.get_experiment_by_name(experiment)
        if existing is not None:
            self.experiment_id = existing.experiment_id
            if existing.lifecycle_stage == "deleted":  # deleted in the UI: bring it back
                self.client.restore_experiment(self.experiment_id)
        else:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=_artifact_location(tracking_uri, experiment))
        self._set_up_experiment(experiment)
        self.parent_run_id: str | None = None

    def _set_up_experiment(self, experiment: str) -> None:
        """Open on the runs table (MLflow 3's UI shows a GenAI overview for experiments of
        unknown kind) and say what made the experiment, once."""
        tags = self.client.get_experiment(self.experiment_id).tags
        if tags.get("mlflow.experimentKind") != "custom_model_development":
            self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind",
                                           "custom_model_development")
        if "mlflow.note.content" not in tags:
            script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
            command = " ".join(["python", *sys.argv]) if script.endswith(".py") else script
            self.client.set_experiment_tag(
                self.experiment_id, "mlflow.note.content",
                f"qsweep sweep `{experiment}`, started by `{command}`. Each sweep or study "
                "is a parent run (phase tags: search | final); trials are nested under it. "
                "Compare with `python -m sweeps.report " + experiment + "`.")

    def start_sweep(self, run_name: str, params: Mapping[str, Any] | None = None,
                    tags: Mapping[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={**environment_tags(), **(tags or {})})
        self.parent_run_id = run.info.run_id
        if params:
            self.log_params(self.parent_run_id, params)
        return self.parent_run_id

    def start_trial(self, run_name: str, params: Mapping[str, Any],
                    tags: Mapping[str, str]) -> str:
        nested = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={**environment_tags(), **tags, **nested})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if is_number(v)]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None
                     ) -> None:
        path = Path(path)
        if path.is_dir():  # a folder keeps its name under artifact_path
            target = f"{artifact_path}/{path.name}" if artifact_path else path.name
            self.client.log_artifacts(run_id, str(path), target)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_table(self, run_id: str, rows: list[Mapping[str, Any]], stem: str,
                  describe: str | None = None) -> str:
        """``stem.md`` and ``stem.table.csv`` (the UI lists files by name: the readable
        table sorts before its CSV and plot, ``stem.csv`` would not).
        With ``describe``, the table also becomes the run's description (its Overview
        tab), under that heading. Returns the markdown."""
        table = rows_to_markdown(list(rows))
        self.client.log_text(run_id, table, f"{stem}.md")
        self.client.log_text(run_id, rows_to_csv(list(rows)), f"{stem}.table.csv")
        if describe is not None:
            self.set_tags(run_id, {"mlflow.note.content": f"{describe}\n\n{table}"})
        return table

    def end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def get_run(self, run_id: str) -> Any | None:
        """The run, if it is one of this experiment's; else None."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # MLflow raises its own kinds for an unknown id
            return None
        return run if run.info.experiment_id == self.experiment_id else None

    def child_runs(self, parent_run_id: str) -> dict[str, Any]:
        """Trial id -> run, for the trial runs nested under a sweep run."""
        runs = self.search_all(f"tags.mlflow.parentRunId = '{parent_run_id}'")
        return {r.data.tags["trial_id"]: r for r in runs if "trial_id" in r.data.tags}

    def search_all(self, filter_string: str, order_by: list[str] | None = None
                   ) -> Iterator[Any]:
        """Every run of this experiment that matches, page by page (MLflow returns at
        most 1000 per call)."""
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string,
                                           order_by=order_by, page_token=token)
            yield from page
            token = page.token
            if not token:
                return

    def reopen_run(self, run_id: str, note: str | None = None) -> None:
        """A run that goes on (a resumed sweep or trial) is RUNNING again; ``note`` replaces
        its description (which said how it ended)."""
        self.client.update_run(run_id, status="RUNNING")
        if note is not None:
            self.set_tags(run_id, {"mlflow.note.content": note, "interrupted": "resumed"})

    def metric_rows(self, run_id: str) -> list[dict[str, float]]:
        """A run's logged metrics as one dict per step (epoch), in step order."""
        by_step: dict[int, dict[str, float]] = {}
        for key in self.client.get_run(run_id).data.metrics:
            for point in self.client.get_metric_history(run_id, key):
                by_step.setdefault(point.step, {})[key] = point.value
        return [by_step[step] for step in sorted(by_step)]

    @contextlib.contextmanager
    def ending(self, run_id: str) -> Iterator[None]:
        """End ``run_id`` FINISHED when the block completes, KILLED on Ctrl-C, FAILED on any
        other exception (which propagates): no run is left RUNNING."""
        try:
            yield
        except KeyboardInterrupt:
            self.end_run(run_id, "KILLED")
            raise
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")


def existing_store(tracking_uri: str | None) -> str:
    """``tracking_uri`` (default :func:`default_tracking_uri`) for commands that read a
    store: a local SQLite file must exist (MLflow would create an empty one)."""
    from trainables.config import ConfigError

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ConfigError(f"no MLflow store at {uri}: run from the folder that holds "
                          "mlflow.db (where a sweep ran), or pass --tracking-uri")
    adopt_moved_store(uri)
    return uri


def adopt_moved_store(tracking_uri: str) -> int:
    """A local store whose folder was moved or copied (mlflow.db with its mlartifacts/)
    still names the old folder in every artifact location (MLflow stores them absolute):
    rewrite them to this folder, so the UI and downloads find the artifacts. Returns the
    number of locations rewritten and says so; 0 for servers and stores in place."""
    import sqlite3

    if not tracking_uri.startswith("sqlite:///"):
        return 0
    db = Path(tracking_uri[len("sqlite:///"):]).resolve()
    here = db.parent / "mlartifacts"
    if not db.exists() or not here.is_dir():
        return 0
    new = here.as_uri() + "/"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        locations = [row[0] or "" for row in conn.execute(
            "SELECT artifact_location FROM experiments")]
        # An experiment this project made lives at <folder>/mlartifacts/<name>; it moved
        # with this store if its last part is here now (another live root is left alone).
        old_roots = {loc.rsplit("/", 1)[0] + "/" for loc in locations
                     if loc.startswith("file://")
                     and loc.rsplit("/", 1)[0].endswith("/mlartifacts")
                     and (here / unquote(loc.rsplit("/", 1)[1])).is_dir()} - {new}
        changed = 0
        for old in old_roots:
            for table, column in (("experiments", "artifact_location"),
                                  ("runs", "artifact_uri"),
                                  ("logged_models", "artifact_location")):
                if not _has_table(conn, table):
                    continue
                changed += conn.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, len(old), old)).rowcount
    if changed:
        print(f"note: this MLflow store was moved from {', '.join(sorted(old_roots))}; "
              f"{changed} artifact locations now point to {new}", file=sys.stderr)
    return changed


def _has_table(conn: Any, table: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (table,)).fetchone() is not None


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts beside a SQLite store; a server (``http://``) chooses (and proxies) its own."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        db_path = Path(tracking_uri[len("sqlite:///"):])
        return (db_path.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None
