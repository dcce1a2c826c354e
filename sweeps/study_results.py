"""A study's results: the config picked in each cell, the seed re-runs added to their
cells, and the report on the study run (comparison and pairs tables, plots, description,
metrics); :func:`report_from` rebuilds all of it from a study's MLflow runs and Tune
folders, training nothing.

Example::

    outcome = report_from(study, "3f2a...c9")
    print(outcome.table)
"""

from __future__ import annotations

import functools
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from sweeps.compare import (
    CellResult,
    paired_rows,
    plot_cell_curves,
    plot_comparison,
    plot_sensitivity,
    plot_weights,
    table_rows,
    weight_vector,
)
from sweeps.outcome import FAILED, FINISHED, diverged, trial_status
from sweeps.resume import cell_grid
from sweeps.tracking import SweepTracker, result_history, rows_to_markdown
from trainables.config import ConfigError, DataConfig
from trainables.data import load_splits
from trainables.sessions import load_state_file

if TYPE_CHECKING:  # the study module imports this one
    from sweeps.study import Study

# Config fields a study's search trials set otherwise than the cell (sweeps.study's
# search_base): they score only the validation split.
SEARCH_ONLY = ("evaluate.weight_rounding", "evaluate.test_each_epoch", "export.formats")

__all__ = ["SEARCH_ONLY", "StudyOutcome", "pick_config", "cell_result", "with_searched",
           "restored_rows",
           "add_seed_results", "report", "report_from"]


@dataclass
class StudyOutcome:
    run_id: str
    cells: list[CellResult]
    rows: list[dict[str, Any]]
    table: str
    pair_rows: list[dict[str, Any]] = field(default_factory=list)
    pairs_table: str = ""


def pick_config(rows: list[dict[str, Any]], metric: str, within: float,
                backoff_key: str | None) -> dict[str, Any] | None:
    """The finished, non-diverged row to re-run: of those within ``within`` of the best
    ``metric``, the smallest ``backoff_key`` (ties: the better metric). None if none."""
    usable = [r for r in rows if r.get("status") == FINISHED and not r.get("diverged")
              and _finite(r.get(metric))]
    if not usable:
        return None
    best = max(r[metric] for r in usable)
    close = [r for r in usable if r[metric] >= best - within]
    if backoff_key is None:
        return max(close, key=lambda r: r[metric])
    return min(close, key=lambda r: (_or_inf(r.get(backoff_key)), -r[metric]))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _or_inf(value: Any) -> float:
    return float(value) if _finite(value) else math.inf


def with_searched(study: Study, rows: list[dict[str, Any]],
                   configs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Search rows carry the lr, weight decay and back-off key of their config, even where
    they did not vary (one point) or were not searched."""
    keys = ("optim.lr", "optim.weight_decay", study.backoff_key)
    return [{**row, **{k: configs[row["trial_id"]].get(k) for k in keys}} for row in rows]


def cell_result(study: Study, key: tuple[str, ...], rows: list[dict[str, Any]],
                 configs: Mapping[str, dict[str, Any]], picked_id: str | None = None
                 ) -> CellResult:
    """The cell with its picked config: ``picked_id`` if given (a restored study), else by
    :func:`pick_config`, else (no trial finished without diverging) the best not-failed
    trial, said on the console."""
    if picked_id is None:
        picked = pick_config(rows, study.search_metric, study.pick_within, study.backoff_key)
        if picked is None:
            print(f"cell {'/'.join(key)}: no search trial finished without diverging; "
                  "re-running the best of the rest", flush=True)
            picked = max(rows, key=lambda r: (r.get("status") != FAILED,
                                              _or_inf(r.get(study.search_metric))))
        picked_id = picked["trial_id"]
    cell = next(c for c in study.cells if c.key == key)
    # What the search left out (sweeps.study.search_base) comes back for the re-runs.
    # (Only keys the search trial had: a study run by older code is read back as it ran.)
    picked = {**configs[picked_id], **{k: v for k, v in cell.base.to_flat().items()
                                       if k in SEARCH_ONLY and k in configs[picked_id]}}
    return CellResult(key, rows, picked, picked_trial_id=picked_id,
                      chance=_chance(cell.base.data), asked=study.seeds)


@functools.lru_cache(maxsize=None)
def _chance(data: DataConfig) -> float | None:
    """1 / classes of a dataset (None if its data is not here to count them)."""
    try:
        return 1.0 / load_splits(data, seed=0).num_classes
    except (ConfigError, OSError, RuntimeError) as exc:
        print(f"chance accuracy of {data.name} unknown ({exc}): only a non-finite "
              "loss counts as diverged", flush=True)
        return None


def _without_seed(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "train.seed"}


def add_seed_results(study: Study, cells: list[CellResult], results: Any) -> None:
    """Histories (with the stages' final metrics) and final weights of the seed re-runs."""
    # A re-run is its cell's picked config with another seed: match on everything else.
    by_config = [(_without_seed(c.best_config), c) for c in cells]
    for result in results:
        config = _without_seed(result.config)
        cell = next((c for picked, c in by_config if picked == config), None)
        if cell is None:
            print(f"a seed re-run (seed {result.config.get('train.seed')}) matches no cell's "
                  "picked config: left out of the table", flush=True)
            continue
        history = result_history(result)
        if result.error or not history:
            cell.add_failed_seed(result.config["train.seed"])  # counted, not dropped
            continue
        weights = None
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as folder:
                state = load_state_file(Path(folder))
            weights = weight_vector(state["model"]) if state else None
        cell.add_seed_run(result.config["train.seed"], history, weights)


def report(study: Study, tracker: SweepTracker, parent: str, cells: list[CellResult]
            ) -> StudyOutcome:
    notes = {c.key: study.notes(c.key) for c in cells} if study.notes else None
    rows = table_rows(cells, study.key_names, study.metric, study.search_metric,
                      study.extra_metrics, notes)
    table = tracker.log_table(parent, rows, "comparison")
    pairs = paired_rows(cells, study.pairs, study.key_names, study.metric)
    pairs_table = tracker.log_table(parent, pairs, "pairs") if pairs else ""
    tracker.set_tags(parent, {"mlflow.note.content": _description(study, rows, pairs)})
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(parent, plot_comparison(cells, Path(tmp) / "comparison.png",
                                                     study.metric))
        tracker.log_artifact(parent, plot_cell_curves(cells, Path(tmp) / "curves.png"))
        tracker.log_artifact(parent, plot_sensitivity(cells, Path(tmp) / "sensitivity.png",
                                                      study.search_metric))
        tracker.log_artifact(parent, plot_weights(cells, Path(tmp) / "weights.png"))
    metrics = {}
    for row, cell in zip(rows, cells, strict=True):
        if not math.isnan(row[f"{study.metric}_mean"]):
            prefix = ".".join(cell.key)
            # Rounded: the UI shows these numbers as they are (float noise otherwise).
            for stat in ("mean", "std", "ci95_lo", "ci95_hi"):
                value = row[f"{study.metric}_{stat}"]
                if not math.isnan(value):
                    metrics[f"{prefix}.{study.metric}_{stat}"] = round(value, 5)
    tracker.log_metrics(parent, metrics, step=0)
    return StudyOutcome(parent, cells, rows, table, pairs, pairs_table)


# MLflow keeps at most 8000 characters of a tag; the description is one.
_DESCRIPTION_LIMIT = 8000


_SUMMARY_COLUMNS = ("result", "ci95", "seeds_ok", "seeds_diverged", "seeds_failed", "best_lr")


_PAIR_COLUMNS = ("pair", "n_pairs", "first_wins", "diff_points", "ci95", "verdict")


def _description(study: Study, rows: list[dict], pairs: list[dict]) -> str:
    """The study run's Overview: the result per cell and the paired verdicts, cut to the
    columns a reader compares first (comparison.md and pairs.md hold every column)."""
    def compact(table: list[dict], columns: tuple[str, ...]) -> str:
        keep = (*study.key_names, *columns)
        return rows_to_markdown([{k: r[k] for k in keep if k in r} for r in table])

    text = (f"{study.metric} per cell: mean +- std over seeds, 95% t interval, seeds "
            f"ok/diverged/failed. Every column: comparison.md; plots: comparison.png.\n\n"
            + compact(rows, _SUMMARY_COLUMNS))
    if pairs:
        text += "\nMatched pairs, seed by seed (pairs.md):\n\n" + compact(pairs, _PAIR_COLUMNS)
    if len(text) > _DESCRIPTION_LIMIT:
        cut = "\n\n(cut here: the rest is in comparison.md and pairs.md)"
        text = text[:_DESCRIPTION_LIMIT - len(cut)].rsplit("\n", 1)[0] + cut
    return text


def report_from(study: Study, run_id: str) -> StudyOutcome:
    """Train nothing: rebuild a finished study's cells from its nested MLflow runs and
    their Tune folders under ``storage_path``, and write its report again."""
    tracker = SweepTracker(study.tracking_uri, study.name)
    children = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    if not children:
        raise ConfigError(f"--report-from={run_id} is invalid: allowed the run id of a "
                          f"{study.name} study run with nested search runs")
    order = {c.label: i for i, c in enumerate(study.cells)}
    cells, seeds = [], None
    grids: dict[str, Any] = {}  # Tune folders read back (cells run together share one)
    # A cell interrupted and run again on --resume left a KILLED search run: the new one
    # holds its result.
    rerun = {r.data.tags.get("cell") for r in children if r.data.tags.get("kind") == "search"
             and r.info.status != "KILLED"}
    seen: set[str] = set()  # a cell interrupted twice: only its newest run
    for run in sorted(children, key=lambda r: -r.info.start_time):
        kind, label = run.data.tags.get("kind"), run.data.tags.get("cell", "")
        if kind == "search":
            if label in seen:
                continue
            seen.add(label)
        if kind != "points" and label not in order:
            continue  # a cell this invocation does not ask about
        if kind == "search" and run.info.status == "KILLED" and label in rerun:
            continue
        grid = cell_grid(study.storage_path, run, grids)
        if kind == "points":
            seeds = grid
            continue
        rows = restored_rows(grid, study)
        if not rows:
            continue  # every trial of the cell failed: the run skipped it too
        configs = {r.metrics.get("trial_id"): r.config for r in grid if r.metrics}
        cells.append(cell_result(study, tuple(label.split("/")), rows, configs,
                                  run.data.tags.get("picked_trial_id")))
    if not cells:
        raise ConfigError(f"--report-from={run_id} is invalid: none of its search runs is a "
                          "cell of this study (tag 'cell'); a study from before the study "
                          "module cannot be restored")
    cells.sort(key=lambda c: order["/".join(c.key)])
    if seeds is not None:
        add_seed_results(study, cells, seeds)
    if tracker.client.get_run(run_id).info.status != "FINISHED":
        # An unfinished study keeps its status (it can still be resumed).
        return report(study, tracker, run_id, cells)
    with tracker.ending(run_id):
        return report(study, tracker, run_id, cells)


def restored_rows(grid: Any, study: Study) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        if not result.metrics or study.search_metric not in result.metrics:
            continue
        history = result_history(result)
        m = result.metrics
        status = trial_status(len(history), int(result.config["train.epochs"]),
                              errored=result.error is not None, diverged=diverged(history))
        rows.append({"trial_id": m["trial_id"], "status": status,
                     "diverged": diverged(history),
                     study.backoff_key: result.config.get(study.backoff_key),
                     "optim.lr": result.config.get("optim.lr"),
                     "optim.weight_decay": result.config.get("optim.weight_decay"),
                     **{k: m[k] for k in ("epoch", "train_loss", study.search_metric,
                                          study.metric) if k in m}})
    return rows
