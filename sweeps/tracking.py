"""MLflow tracking: one experiment per sweep, a parent run per sweep, a nested child run
per trial, written from the Ray driver.

Ray's MLflow integrations neither nest runs (ray issue 19978) nor send artifacts through
an ``http://`` tracking server from remote nodes (ray issue 36257), and a trial stopped by
ASHA stays RUNNING under ``setup_mlflow``. So all writing happens on the driver, in a Tune
:class:`~ray.tune.Callback` (:class:`MLflowSweepCallback`) that sees every result and every
ending: one writer per store (no SQLite lock contention between trials), artifacts go
wherever the tracking URI says (a server proxies them), and every child run ends
FINISHED, KILLED (stopped early by the scheduler) or FAILED.

:class:`SweepTracker` is the plain-MLflow part (no Ray), usable from any script.

Example::

    tracker = SweepTracker("sqlite:///mlflow.db", "baseline")
    parent = tracker.start_sweep("baseline-1", params={"num_samples": 8})
    child = tracker.start_trial("trial-0", TrialConfig().to_flat(), tags={})
    tracker.log_metrics(child, {"test_acc": 0.99}, step=1)
    tracker.end_run(child, "FINISHED")
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping
from urllib.parse import unquote, urlparse

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS

from sweeps.outcome import diverged, trial_status
from sweeps.provenance import environment_tags
from trainables.sessions import ARTIFACTS_DIR

# MLflow's store opens print SQLAlchemy's "noload is deprecated" on every open: noise that
# hides what matters (mlflow's own issue, not ours to act on).
warnings.filterwarnings("ignore", message=".*noload.*", category=DeprecationWarning)

__all__ = ["SweepTracker", "MLflowSweepCallback", "default_tracking_uri", "plot_curves",
           "plot_sweep", "trial_metrics", "load_quantized_model", "trial_run_name",
           "trial_tags", "quant_label", "existing_store"]


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
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
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


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def format_value(value: Any) -> str:
    """A table cell: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rows_to_markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(format_value(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_curves(history: Iterable[Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """Loss and accuracy per epoch (train, test, val when present) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(history)
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, kind in zip(axes, ("loss", "acc"), strict=False):
        for split in ("train", "val", "test"):
            key = f"{split}_{kind}"
            if rows and key in rows[0]:
                ax.plot(epochs, [r[key] for r in rows], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(kind)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_sweep(rows: list[Mapping[str, Any]], searched: list[str], metric: str,
               path: str | Path, title: str) -> Path | None:
    """The final ``metric`` of every trial against each numeric searched parameter (log
    axis where the values span more than 20x); colours tell finished from stopped trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in searched if all(_is_number(r.get(k)) for r in rows)]
    if not keys or not rows:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    colours = {"FINISHED": "tab:green", "KILLED": "tab:orange", "FAILED": "tab:red"}
    for ax, key in zip(axes[0], keys, strict=True):
        for status, colour in colours.items():
            chosen = [r for r in rows if r.get("status") == status and metric in r]
            ax.scatter([r[key] for r in chosen], [r[metric] for r in chosen], c=colour,
                       label=f"{status} ({len(chosen)})")
        values = [r[key] for r in rows]
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# Keys Tune adds to every result (iteration counters, clocks, host): not the trial's own.
_TUNE_KEYS = frozenset((*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag",
                        "checkpoint_path", "should_checkpoint"))


def trial_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric metric a trial reported (epoch metrics and stage metrics alike), without
    the keys Tune adds to each result."""
    return {k: v for k, v in result.items() if k not in _TUNE_KEYS and _is_number(v)}


def tracked_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields the trial reads (see :meth:`TrialConfig.tracked_params`); a config
    that no longer parses is logged as given."""
    from trainables.config import TrialConfig

    try:
        return TrialConfig.from_stored({k: v for k, v in config.items() if "." in k}
                                       ).tracked_params()
    except ValueError:
        return dict(config)


MAX_RUN_NAME = 250
# Short names for a run's title; other keys show their last part (quant.bits -> bits).
_SHORT = {"optim.lr": "lr", "optim.weight_decay": "wd", "optim.bias_lr": "bias_lr"}


def quant_label(config: Mapping[str, Any]) -> str:
    """``int4-qat``, ``lns8-ptq``, ``codebook16-qat``, ``fp16-ptq``, ``int-mixed-qat``
    (bits per layer); "" when not quantizing."""
    mode = config.get("quant.mode", "none")
    if mode in (None, "none"):
        return ""
    fmt = config.get("quant.format", "int")
    if config.get("quant.layer_bits"):  # bits per layer: quant.bits is not used
        return f"{fmt}-mixed-{mode}"
    size = {"codebook": config.get("quant.k"), "fp16": "", "bf16": ""}.get(
        fmt, config.get("quant.bits"))
    return f"{fmt}{size if size is not None else ''}-{mode}"


def trial_run_name(config: Mapping[str, Any], varied: Iterable[str] = ()) -> str:
    """A trial's MLflow run name, what distinguishes it first: optimizer, quantization,
    the dataset/model where they vary, the other varied keys, the seed; e.g.
    ``madam lr=0.0995 wd=4.3e-05 s2``, ``gd int4-qat lenet s1``."""
    parts = [str(config.get("optim.name", ""))]
    parts += [label for label in (quant_label(config),) if label]
    shown = {"optim.name", "train.seed", "quant.mode", "quant.format", "quant.bits", "quant.k"}
    cell = [str(config[k]) for k in ("data.name", "model.name") if k in varied]
    if cell:
        parts.append("/".join(cell))
        shown |= {"data.name", "model.name"}
    for key in varied:
        if key not in shown and key in config:
            value = config[key]
            text = f"{value:.3g}" if isinstance(value, float) else str(value)
            parts.append(f"{_SHORT.get(key, key.rpartition('.')[2])}={text}")
    seed = f"s{config.get('train.seed', 0)}"
    name = " ".join(p for p in parts if p)
    # MLflow's SQL stores cap run names at 250 characters: cut the varied keys, keep the seed.
    return f"{name[:MAX_RUN_NAME - len(seed) - 2]}~ {seed}" \
        if len(name) + len(seed) + 1 > MAX_RUN_NAME else f"{name} {seed}"


def trial_tags(config: Mapping[str, Any], phase: str) -> dict[str, str]:
    """What filtering and grouping in the MLflow UI need on every trial run."""
    return {"phase": phase, "optimizer": str(config.get("optim.name", "")),
            "dataset": str(config.get("data.name", "")),
            "model": str(config.get("model.name", "")),
            "precision": str(config.get("precision.mode", "fp32")),
            "quant": quant_label(config) or "none",
            "seed": str(config.get("train.seed", "")),
            "num_workers": str(config.get("train.num_workers", 1))}


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
                 resumed: Mapping[str, Any] | None = None) -> None:
        self.tracker = tracker
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
            trial_run_name(config, self.varied), tracked_params(config), tags)
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
            return {"stopped_early": f"ASHA at epoch {epochs}",
                    "mlflow.note.content": f"Stopped early by the ASHA scheduler at epoch "
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
    epochs = [int(h["epoch"]) for h in history if _is_number(h.get("epoch"))]
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


def load_quantized_model(run_id: str, tracking_uri: str | None = None) -> tuple[Any, Any]:
    """``(model, TrialConfig)`` of a quantized trial's MLflow run: the architecture rebuilt
    from its config.yaml and shapes (quant.json), the weights from its packed model.qsw,
    so the model reproduces the accuracy the trial evaluated (eval mode)."""
    import json

    import yaml
    from mlflow.tracking import MlflowClient

    import quant
    from trainables.config import TrialConfig
    from trainables.models import build_model

    client = MlflowClient(tracking_uri or default_tracking_uri())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = {name: client.download_artifacts(run_id, name, tmp)
                     for name in ("config.yaml", "quant.json", "model.qsw")}
        except Exception as exc:  # MLflow raises several kinds for a missing artifact
            raise ValueError(f"run {run_id} has no packed model (config.yaml, quant.json, "
                             f"model.qsw): was it a quant.mode=ptq|qat trial? ({exc})") from None
        cfg = TrialConfig.from_stored(yaml.safe_load(Path(paths["config.yaml"]).read_text()))
        channels, size, classes = json.loads(Path(paths["quant.json"]).read_text())[
            "data_shape"]
        model = build_model(cfg.model, channels, size, classes)
        quant.load_packed(paths["model.qsw"], model)
    return model.eval(), cfg
