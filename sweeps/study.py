"""A study: many cells (e.g. dataset x model x optimizer), one search per cell, the picked
config of every cell re-run with fresh seeds, and a comparison on the study's MLflow run.

The design, on purpose:

- **Search = a fixed, paired quasi-random design.** Every cell runs the same
  ``num_samples`` scrambled Sobol points (seeded by ``seed``) mapped into its own ranges
  (:class:`SearchSpace`), each trial to its last epoch (FIFO). No result feeds back into
  what runs next, so the same command picks the same configs, and every optimizer gets
  the same quantiles of its lr range (a paired comparison). TPE with 8 trials never left
  Optuna's random start-up phase, and asynchronous ASHA stopped slow starters (EG at
  large lr) depending on which results arrived first: neither was what it claimed.
- **Pick = back off from the edge.** Among the search trials within ``pick_within`` of the
  best ``search_metric`` (validation), take the one with the smallest ``backoff_key``
  (the learning rate): the best single trial was often the largest lr that still
  trained, and its re-runs with other seeds diverged.
- **Re-runs** of the picked configs with seeds ``seed+1 .. seed+seeds`` score the test set
  (``metric``); the table reports mean +- std and a 95% confidence interval, every seed
  asked for (ok, diverged: non-finite loss or chance accuracy, failed), and every
  ``extra_metrics`` the trials report (their stages' metrics, e.g. rounded weights).
- **Pairs**: matched cells (``pairs``, e.g. EG vs GD) are compared seed by seed: the same
  seed gives both the same initial weights and data order, so the paired difference
  is much tighter than two separate intervals.

MLflow: a study run (``kind=study``), one nested run per cell's search (``kind=search``,
tag ``cell``) and one for the seed re-runs (``kind=points``), trials nested under those.
The study run holds comparison.md/.png (the bars: mean and 95% interval per cell),
pairs.md, *.table.csv (both tables as CSV), a description with the compact table, curves.png,
sensitivity.png, weights.png and the per-cell mean, std and interval as metrics.
:func:`report_from` rebuilds all of it from the runs.

Example::

    cells = [Cell(("mnist", "mlp", "eg"), base, SearchSpace((("optim.lr", 0.1, 10, True),)))]
    outcome = run_study(Study(name="demo", cells=tuple(cells),
                              key_names=("dataset", "model", "optimizer")))
    print(outcome.table)
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from sweeps.compare import (
    CellResult,
    paired_rows,
    plot_comparison,
    plot_curves,
    plot_sensitivity,
    plot_weights,
    table_rows,
    weight_vector,
)
from sweeps.init_weights import absolute_paths, check_initial_weights
from sweeps.outcome import FAILED, FINISHED, diverged, trial_status
from sweeps.resume import driver_lock, restorable
from sweeps.runner import run_sweep
from sweeps.search import validate_points
from sweeps.spec import Sweep, SweepInterrupted
from sweeps.tracking import SweepTracker, default_tracking_uri, result_history, rows_to_markdown
from trainables.config import ConfigError, DataConfig, TrialConfig
from trainables.data import load_splits, prepare_data
from trainables.sessions import load_state_file

__all__ = ["SearchSpace", "Cell", "Study", "StudyOutcome", "run_study", "report_from",
           "pick_config"]


@dataclass(frozen=True)
class SearchSpace:
    """Ranges searched as one quasi-random design: ``(key, low, high, log)`` each, plus
    constant overrides. ``points`` are the same for every space with the same number of
    ranges and the same seed (in the unit cube), which pairs the cells of a study."""

    ranges: tuple[tuple[str, float, float, bool], ...]
    constants: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ConfigError("a search space needs at least one range (key, low, high, log)")
        for key, low, high, log in self.ranges:
            if not low < high or (log and low <= 0):
                raise ConfigError(f"search range {key}={low}..{high} is invalid: allowed "
                                  "low < high (and low > 0 on a log scale)")

    def points(self, n: int, seed: int) -> list[dict[str, Any]]:
        """``n`` configs from scrambled Sobol points (torch's SobolEngine, seeded)."""
        engine = torch.quasirandom.SobolEngine(len(self.ranges), scramble=True, seed=seed)
        unit = engine.draw(n, dtype=torch.float64).tolist()
        points = []
        for u in unit:
            point = dict(self.constants)
            for (key, low, high, log), x in zip(self.ranges, u, strict=True):
                point[key] = (math.exp(math.log(low) + x * (math.log(high) - math.log(low)))
                              if log else low + x * (high - low))
            points.append(point)
        return points


@dataclass(frozen=True)
class Cell:
    """One point of the study's grid: its key (the last part names the plotted series),
    its base config, and what is searched."""

    key: tuple[str, ...]
    base: TrialConfig
    space: SearchSpace

    @property
    def label(self) -> str:
        return "/".join(self.key)


@dataclass(frozen=True)
class Study:
    name: str
    cells: tuple[Cell, ...]
    key_names: tuple[str, ...]
    num_samples: int = 8
    seeds: int = 3
    seed: int = 0
    search_metric: str = "val_acc"  # chooses configs (a validation split)
    metric: str = "test_acc"  # scores the seed re-runs
    pick_within: float = 0.003  # accuracy: 0.3 points
    backoff_key: str = "optim.lr"
    extra_metrics: tuple[str, ...] = ()  # reported by the trials, tabled like ``metric``
    # Matched series compared seed by seed within each panel, e.g. (("eg", "gd"),).
    pairs: tuple[tuple[str, str], ...] = ()
    # Cell key -> {extra metric: text} for values known without measuring (a no-op).
    notes: Callable[[tuple[str, ...]], Mapping[str, str]] | None = None
    max_concurrent: int = 2
    tracking_uri: str = field(default_factory=default_tracking_uri)
    storage_path: str = "ray_results"
    address: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)  # logged on the study run
    auto_gpus: bool = False  # see Sweep.auto_gpus
    max_failures: int = 0  # see Sweep.max_failures
    # Go on with this interrupted study run: finished cells are read back (not re-run),
    # the interrupted one resumes, the rest run.
    resume_run_id: str | None = None

    def __post_init__(self) -> None:
        if not self.cells:
            raise ConfigError("a study needs at least one cell")
        for name, low in (("num_samples", 1), ("seeds", 1), ("max_concurrent", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: allowed >= {low}")
        if len({c.key for c in self.cells}) != len(self.cells):
            raise ConfigError("the cells of a study need distinct keys")
        for cell in self.cells:
            if len(cell.key) != len(self.key_names):
                raise ConfigError(f"cell {cell.label} is invalid: allowed keys of "
                                  f"{len(self.key_names)} parts ({', '.join(self.key_names)})")
        if not self.pick_within >= 0:
            raise ConfigError(f"pick_within={self.pick_within} is invalid: allowed >= 0")

    def validate(self) -> None:
        """Every config the study will run is valid, and its data exists: before Ray."""
        for cell in self.cells:
            try:
                validate_points(cell.base, tuple(cell.space.points(self.num_samples,
                                                                   self.seed)))
            except ConfigError as exc:
                raise ConfigError(f"cell {cell.label}: {exc}") from None
        for data in {cell.base.data for cell in self.cells}:
            prepare_data(data)
        for cell in self.cells:  # train.init_from: the file, and that it fits the model
            check_initial_weights(absolute_paths(cell.base), ())


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


def run_study(study: Study) -> StudyOutcome:
    study.validate()
    tracker = SweepTracker(study.tracking_uri, study.name)
    if study.resume_run_id:
        parent, stamp = _reopen_study(study, tracker)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        parent = tracker.start_sweep(
            f"{study.name} study {time.strftime('%Y-%m-%d %H:%M')}",
            params={"study.num_samples": study.num_samples, "study.seeds": study.seeds,
                    "study.seed": study.seed, "study.search_metric": study.search_metric,
                    "study.metric": study.metric, "study.pick_within": study.pick_within,
                    "study.backoff_key": study.backoff_key, "study.design": "sobol+fifo",
                    "study.cells": len(study.cells), **study.params},
            tags={"sweep": study.name, "kind": "study", "stamp": stamp})
    lock = driver_lock(Path(study.storage_path).resolve() / f"{study.name}-{stamp}.lock",
                       f"study run {parent}")
    with lock, tracker.ending(parent):
        try:
            cells = _search_cells(study, tracker, parent, stamp)
            if not cells:
                raise RuntimeError("no cell produced a result; see the FAILED runs in MLflow")
            _rerun_seeds(study, tracker, cells, parent, stamp)
        except KeyboardInterrupt as stop:  # SweepInterrupted of a cell, or between cells
            # Resume the study, not the cell; a cause (a full disk) is kept.
            raise SweepInterrupted(parent, getattr(stop, "cause", None)) from None
        outcome = _report(study, tracker, parent, cells)
    _prune_search_checkpoints(study, stamp)
    return outcome


def _prune_search_checkpoints(study: Study, stamp: str) -> None:
    """A finished study's search trials were picked from and re-run with seeds: their
    checkpoints (best + latest each) only take disk. Their metrics stay (--report-from
    reads them); the seed re-runs keep theirs."""
    freed = 0
    for cell in study.cells:
        folder = Path(study.storage_path).resolve() / \
            f"{study.name}-{stamp}-search-{'-'.join(cell.key)}"
        # In-process trials keep trial_*/checkpoint_*, DDP ones trial_*/train-*/checkpoint_*.
        for checkpoint in [*folder.glob("trial_*/checkpoint_*"),
                           *folder.glob("trial_*/train-*/checkpoint_*")]:
            freed += sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
            shutil.rmtree(checkpoint)
    if freed:
        print(f"removed the search trials' checkpoints: {freed / 2**20:.1f} MiB freed",
              flush=True)


def _reopen_study(study: Study, tracker: SweepTracker) -> tuple[str, str]:
    """(run id, stamp) of the study run to resume, RUNNING again."""
    run_id = study.resume_run_id
    run = tracker.get_run(run_id)
    if run is None or run.data.tags.get("kind") != "study" or "stamp" not in run.data.tags:
        raise ConfigError(f"--resume {run_id} is invalid: allowed the run id of an "
                          f"unfinished {study.name} study run (tag kind=study)")
    if run.info.status == "FINISHED":
        raise ConfigError(f"--resume {run_id} is invalid: that study finished; allowed an "
                          "interrupted, killed or failed one")
    print(f"resuming study run {run_id}", flush=True)
    tracker.reopen_run(run_id)
    tracker.parent_run_id = run_id
    return run_id, run.data.tags["stamp"]


def _earlier_run(study: Study, tracker: SweepTracker, parent: str, folder: str
                 ) -> Any | None:
    """The nested sweep run of a resumed study whose Tune folder is ``folder``, if any."""
    if not study.resume_run_id:
        return None
    runs = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and "
                                 f"tags.tune_folder = '{folder}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _resume_id(study: Study, tracker: SweepTracker, earlier: Any | None, folder: str
               ) -> str | None:
    """The unfinished sweep run to resume for ``folder``; None to run it afresh (none
    yet, or interrupted before Tune saved a state with a trial: that run ends KILLED,
    saying so, and its folder, which nothing can restore, is cleared)."""
    if earlier is None:
        return None
    path = Path(study.storage_path).resolve() / folder
    if not path.exists():
        raise ConfigError(f"--resume: the study's Tune folder {path} is missing (was "
                          "--storage-path different?); allowed the --storage-path it ran with")
    if restorable(path):
        return earlier.info.run_id
    tracker.set_tags(earlier.info.run_id, {"mlflow.note.content": "Interrupted before Tune "
                     "saved a state with a trial in it; the resumed study ran this sweep "
                     "again as a new run."})
    tracker.end_run(earlier.info.run_id, "KILLED")
    shutil.rmtree(path, ignore_errors=True)
    return None


def _read_back(study: Study, folder: str) -> Any:
    """The ResultGrid of a finished sweep of this study, from its Tune folder."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    return ResultGrid(ExperimentAnalysis(str(Path(study.storage_path).resolve() / folder)))


def _sweep(study: Study, **kwargs: Any) -> Sweep:
    return Sweep(name=study.name, max_concurrent=study.max_concurrent,
                 auto_gpus=study.auto_gpus, max_failures=study.max_failures,
                 tracking_uri=study.tracking_uri, storage_path=study.storage_path,
                 address=study.address, seed=study.seed, prepare_data=False, **kwargs)


def _search_cells(study: Study, tracker: SweepTracker, parent: str, stamp: str
                  ) -> list[CellResult]:
    results = []
    for cell in study.cells:
        print(f"\n=== search {cell.label} ===", flush=True)
        points = tuple(cell.space.points(study.num_samples, study.seed))
        folder = f"{study.name}-{stamp}-search-{'-'.join(cell.key)}"
        earlier = _earlier_run(study, tracker, parent, folder)
        if earlier is not None and earlier.info.status == "FINISHED":
            grid = _read_back(study, folder)
            configs = {r.metrics.get("trial_id"): r.config for r in grid if r.metrics}
            results.append(_cell_result(study, cell.key, _restored_rows(grid, study),
                                        configs, earlier.data.tags.get("picked_trial_id")))
            print(f"finished before the interrupt: read back from {folder}", flush=True)
            continue
        try:
            outcome = run_sweep(_sweep(
                study, base=cell.base, points=points, metric=study.search_metric,
                kind="search", tags={"cell": cell.label}, parent_run_id=parent,
                run_name=folder, title=f"search {cell.label}",
                params=_design_params(study, cell), log_checkpoints=False,
                resume_run_id=_resume_id(study, tracker, earlier, folder)))
        except RuntimeError as exc:  # every trial failed: record it, go on with the rest
            print(f"cell {cell.label} failed: {exc}", flush=True)
            continue
        configs = {r.metrics.get("trial_id"): r.config for r in outcome.results if r.metrics}
        result = _cell_result(study, cell.key, _with_searched(study, outcome.rows, configs),
                              configs)
        # What was picked, on the search run: --report-from reads it back, not re-picks.
        tracker.set_tags(outcome.parent_run_id, {"picked_trial_id": result.picked_trial_id})
        results.append(result)
    return results


def _design_params(study: Study, cell: Cell) -> dict[str, Any]:
    """A search run's design: the ranges and constants of its Sobol points."""
    ranges = {f"search.{key}": f"{low:g}..{high:g}{' log' if log else ''}"
              for key, low, high, log in cell.space.ranges}
    return {"sweep.design": f"scrambled Sobol, {study.num_samples} points, seed "
                            f"{study.seed}", **ranges,
            **{f"search.{key}": f"= {value}" for key, value in cell.space.constants}}


def _with_searched(study: Study, rows: list[dict[str, Any]],
                   configs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Search rows carry the lr, weight decay and back-off key of their config, even where
    they did not vary (one point) or were not searched."""
    keys = ("optim.lr", "optim.weight_decay", study.backoff_key)
    return [{**row, **{k: configs[row["trial_id"]].get(k) for k in keys}} for row in rows]


def _cell_result(study: Study, key: tuple[str, ...], rows: list[dict[str, Any]],
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
    return CellResult(key, rows, dict(configs[picked_id]), picked_trial_id=picked_id,
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


def _rerun_seeds(study: Study, tracker: SweepTracker, cells: list[CellResult], parent: str,
                 stamp: str) -> None:
    """All cells' picked configs x seeds in one points sweep, each trial to its last epoch."""
    seeds = [study.seed + i for i in range(1, study.seeds + 1)]
    points = tuple({**cell.best_config, "train.seed": s} for cell in cells for s in seeds)
    print(f"\n=== picked configs x seeds {seeds}: {len(points)} trials ===", flush=True)
    folder = f"{study.name}-{stamp}-seeds"
    earlier = _earlier_run(study, tracker, parent, folder)
    if earlier is not None and earlier.info.status == "FINISHED":
        _add_seed_results(study, cells, _read_back(study, folder))
        return
    outcome = run_sweep(_sweep(
        study, base=TrialConfig.from_flat(cells[0].best_config), points=points,
        metric=study.metric, parent_run_id=parent, run_name=folder,
        title=f"seeds {seeds[0]}..{seeds[-1]} x {len(cells)} picked configs", log_best=False,
        resume_run_id=_resume_id(study, tracker, earlier, folder)))
    _add_seed_results(study, cells, outcome.results)


def _without_seed(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "train.seed"}


def _add_seed_results(study: Study, cells: list[CellResult], results: Any) -> None:
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


def _report(study: Study, tracker: SweepTracker, parent: str, cells: list[CellResult]
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
        tracker.log_artifact(parent, plot_curves(cells, Path(tmp) / "curves.png"))
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
    for run in children:
        kind, label = run.data.tags.get("kind"), run.data.tags.get("cell", "")
        if kind != "points" and label not in order:
            continue  # a cell this invocation does not ask about
        folder = run.data.tags.get("tune_folder", run.info.run_name)
        grid = _read_back(study, folder)
        if kind == "points":
            seeds = grid
            continue
        rows = _restored_rows(grid, study)
        if not rows:
            continue  # every trial of the cell failed: the run skipped it too
        configs = {r.metrics.get("trial_id"): r.config for r in grid if r.metrics}
        cells.append(_cell_result(study, tuple(label.split("/")), rows, configs,
                                  run.data.tags.get("picked_trial_id")))
    if not cells:
        raise ConfigError(f"--report-from={run_id} is invalid: none of its search runs is a "
                          "cell of this study (tag 'cell'); a study from before the study "
                          "module cannot be restored")
    cells.sort(key=lambda c: order["/".join(c.key)])
    if seeds is not None:
        _add_seed_results(study, cells, seeds)
    if tracker.client.get_run(run_id).info.status != "FINISHED":
        # An unfinished study keeps its status (it can still be resumed).
        return _report(study, tracker, run_id, cells)
    with tracker.ending(run_id):
        return _report(study, tracker, run_id, cells)


def _restored_rows(grid: Any, study: Study) -> list[dict[str, Any]]:
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
