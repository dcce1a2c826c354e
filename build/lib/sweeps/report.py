"""Print a sweep's or study's comparison from MLflow alone (offline: no Ray, no data, no
Tune folders), for finished and running ones, and write its table and plot to a folder.

    python -m sweeps.report eg_vs_gd                  # the experiment's latest sweep/study
    python -m sweeps.report 3f2a...c9 --out report/   # a given sweep or study run
    python -m sweeps.report eg_vs_gd --tracking-uri http://127.0.0.1:5000

A study run prints its comparison.md and pairs.md when it has finished; while it runs
(or if they are missing) the table is built from its final-phase trials: test accuracy
mean +- std per (dataset, model, optimizer). A sweep run prints one row per trial: its
descriptive name, status, the varied params and its final metrics.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from sweeps.provenance import describe_drift
from sweeps.spec import SUMMARY_METRICS
from sweeps.tracking import existing_store, plot_sweep, rows_to_csv, rows_to_markdown
from trainables.config import ConfigError

__all__ = ["main", "report"]

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
CELL_TAGS = ("dataset", "model", "optimizer")


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def _resolve(client: Any, target: str) -> Any:
    """A run id, or an experiment name (its latest top-level sweep or study run)."""
    if RUN_ID.match(target):
        try:
            return client.get_run(target)
        except Exception:  # MLflow raises its own kinds for an unknown id
            raise ConfigError(f"run {target!r} is not in this tracking store") from None
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"{target!r} is invalid: allowed a run id or one of the "
                          f"experiments {', '.join(names) or '(none)'}")
    runs = client.search_runs([experiment.experiment_id], "tags.kind != ''",
                              order_by=["attributes.start_time DESC"], max_results=200)
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not top:
        raise ConfigError(f"experiment {target!r} has no sweep or study run yet")
    return top[0]


def _children(client: Any, run: Any) -> list[Any]:
    return client.search_runs([run.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                              max_results=5000)


def _text_artifact(client: Any, run: Any, name: str, folder: Path) -> str | None:
    if name not in {f.path for f in client.list_artifacts(run.info.run_id)}:
        return None
    return Path(client.download_artifacts(run.info.run_id, name, str(folder))).read_text()


def trial_rows(trials: list[Any], extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One row per trial run: name, status (and why it stopped), the params its sweep
    varied, its final metrics (the summary ones and ``extra``, e.g. the sweep's own)."""
    varied = _varied(trials)
    rows = []
    for trial in trials:
        metrics, params, tags = trial.data.metrics, trial.data.params, trial.data.tags
        notes = [f"stopped early ({tags['stopped_early']})"] if tags.get("stopped_early") \
            else []
        notes += ["diverged"] if tags.get("diverged") == "true" else []
        row: dict[str, Any] = {"run": trial.info.run_name, "status": trial.info.status,
                               "note": ", ".join(notes)}
        row.update({k: _number(params[k]) for k in sorted(varied) if k in params})
        row.update({k: round(metrics[k], 4) for k in dict.fromkeys((
            *SUMMARY_METRICS, *extra, "test_acc_lns8", "test_acc_int4", "packed_bytes",
            "budget_score")) if k in metrics})
        rows.append(row)
    return rows


def _varied(trials: list[Any]) -> set[str]:
    keys = {k for t in trials for k in t.data.params}
    return {k for k in keys if len({t.data.params.get(k) for t in trials}) > 1}


def cell_rows(trials: list[Any], metric: str = "test_acc") -> list[dict[str, Any]]:
    """Final-phase trials grouped by their (dataset, model, optimizer) tags: ``metric``
    mean +- std over the finished ones, and how many ran, finished and diverged."""
    cells: dict[tuple[str, ...], list[Any]] = {}
    for trial in trials:
        if trial.data.tags.get("phase") == "final":
            key = tuple(trial.data.tags.get(t, "") for t in CELL_TAGS)
            cells.setdefault(key, []).append(trial)
    rows = []
    for key, runs in cells.items():
        values = [r.data.metrics[metric] for r in runs
                  if r.info.status == "FINISHED" and metric in r.data.metrics]
        mean = statistics.fmean(values) if values else float("nan")
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append({**dict(zip(CELL_TAGS, key, strict=True)), "runs": len(runs),
                     "finished": len(values),
                     "diverged": sum(r.data.tags.get("diverged") == "true" for r in runs),
                     metric: f"{100 * mean:.2f} +- {100 * std:.2f}" if values else ""})
    return rows


def report(target: str, tracking_uri: str, out: Path | None = None) -> str:
    """The markdown report of ``target`` (a run id or an experiment name)."""
    import tempfile

    client = _client(tracking_uri)
    run = _resolve(client, target)
    kind, status = run.data.tags.get("kind", ""), run.info.status
    lines = [f"# {run.info.run_name} ({kind}, {status}, run {run.info.run_id})", ""]
    drift = describe_drift(run.data.tags)
    if drift:  # numbers made with other libraries may not reproduce here
        lines += [f"Library versions differ from the installed ones: {drift}.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "study":
            children = _children(client, run)
            trials = [t for c in children for t in _children(client, c)]
            table = _text_artifact(client, run, "comparison.md", Path(tmp))
            pairs = _text_artifact(client, run, "pairs.md", Path(tmp))
            if table is None:
                rows = cell_rows(trials)
                table = rows_to_markdown(rows) if rows else "(no final trial yet)\n"
                lines.append(f"Built from {len(trials)} trial runs so far (the study's "
                             "comparison.md is written when it ends).")
            lines += ["## Comparison", table]
            if pairs:
                lines += ["## Matched pairs", pairs]
            rows = trial_rows(trials)
        else:
            rows = trial_rows(_children(client, run),
                              (run.data.params.get("sweep.metric", "test_acc"),))
            lines += ["## Trials", rows_to_markdown(rows) if rows else "(no trial yet)\n"]
    if out is not None:
        _write(out, lines, rows, run)
    return "\n".join(lines)


def _write(out: Path, lines: list[str], rows: list[dict[str, Any]], run: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines))
    if rows:
        (out / "trials.csv").write_text(rows_to_csv(rows))
        metric = run.data.params.get("sweep.metric", "test_acc")
        varied = [k for k in rows[0] if "." in k]
        plot_sweep(rows, varied, metric, out / "sweep.png", run.info.run_name)


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a sweep or study run id, or an experiment name "
                                       "(its latest sweep or study)")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write report.md, trials.csv and sweep.png here")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stdout is the report
    try:
        print(report(args.target, existing_store(args.tracking_uri), args.out))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
