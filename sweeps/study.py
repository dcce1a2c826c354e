"""A study: many cells (e.g. dataset x model x optimizer), one search per cell, the picked
config of every cell re-run with fresh seeds, and a comparison on the study's MLflow run.

The design, on purpose:

- **Search = a fixed, paired quasi-random design.** Every cell runs the same
  ``num_samples`` scrambled Sobol points (seeded by ``seed``) mapped into its own ranges
  (:class:`SearchSpace`), stopped early only by synchronous successive halving (rungs:
  :mod:`sweeps.halving`), whose decisions depend on the metrics alone. No result feeds
  back into what runs next, so the same command picks the same configs, and every optimizer gets
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

Running: the cells that halve search side by side in one Tune run
(:mod:`sweeps.together`, each ranked only among its own points), the others one sweep
each; then the seed re-runs in one more.

MLflow: a study run (``kind=study``), one nested run per cell's search (``kind=search``,
tag ``cell``; ``tune_points``: its trials in a Tune folder shared by cells) and one for
the seed re-runs (``kind=points``), trials nested under those.
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

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from sweeps.compare import (
    CellResult,
)
from sweeps.init_weights import absolute_paths, check_initial_weights
from sweeps.resume import (
    HALVING_LOST,
    cell_grid,
    driver_lock,
    nested_cell_run,
    nested_run_of_folder,
    read_back,
    reopen_study_run,
    resume_or_restart,
    retire_run,
)
from sweeps.runner import run_sweep
from sweeps.search import check_list_lengths, validate_points
from sweeps.spec import Sweep, SweepInterrupted
from sweeps.study_design import Cell, SearchSpace, auto_rungs
from sweeps.study_results import (
    StudyOutcome,
    add_seed_results,
    cell_result,
    pick_config,
    report,
    report_from,
    restored_rows,
    with_searched,
)
from sweeps.together import run_together
from sweeps.tracking import SweepTracker, default_tracking_uri, format_value
from trainables.config import ConfigError, TrialConfig
from trainables.data import prepare_data

__all__ = ["SearchSpace", "Cell", "Study", "StudyOutcome", "run_study", "report_from",
           "pick_config", "auto_rungs"]


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
    # Synchronous successive halving in each cell's search (sweeps.halving): the epochs
    # at which its points are ranked and the best 1/reduction go on (with any within
    # pick_within of the last of them); "auto": halve down to 2 finishers (8 points over
    # 3 epochs: rungs 1, 2); (): every point to the end.
    rungs: tuple[int, ...] | str = "auto"
    reduction: int = 2

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
        if self.reduction < 2:
            raise ConfigError(f"reduction={self.reduction} is invalid: allowed >= 2")
        if isinstance(self.rungs, str) and self.rungs != "auto":
            raise ConfigError(f"rungs={self.rungs!r} is invalid: allowed 'auto' or epochs")

    def cell_rungs(self, cell: Cell) -> tuple[int, ...]:
        """The rungs of a cell's search (its epochs decide the automatic ones)."""
        if self.rungs != "auto":
            return tuple(self.rungs)
        return auto_rungs(self.num_samples, cell.base.train.epochs, self.reduction)

    @property
    def design(self) -> str:
        halving = any(self.cell_rungs(cell) for cell in self.cells)
        return "sobol+halving" if halving else "sobol+fifo"

    def validate(self) -> None:
        """Every config the study will run is valid, and its data exists: before Ray."""
        for cell in self.cells:
            try:
                validate_points(cell.base, tuple(cell.space.points(self.num_samples,
                                                                   self.seed)))
                if self.metric.startswith("test_") and \
                        not cell.base.evaluate.test_each_epoch:
                    raise ConfigError(f"evaluate.test_each_epoch=false is invalid with the "
                                      f"study metric {self.metric}: allowed true (the "
                                      "search trials skip the test split by themselves)")
                rungs = self.cell_rungs(cell)
                if rungs:  # checked as the cell's sweep will be
                    _sweep(self, base=cell.base, points=({},), rungs=rungs,
                           reduction_factor=self.reduction)
            except ConfigError as exc:
                raise ConfigError(f"cell {cell.label}: {exc}") from None
        # The cells search side by side in one Tune run, and the seeds re-run in one
        # (with the fields the search left out back: SEARCH_ONLY).
        for base in (lambda cell: search_base(self, cell), lambda cell: cell.base):
            check_list_lengths([(f"cell {cell.label}", base(cell).replace(point).to_flat())
                                for cell in self.cells
                                for point in cell.space.points(self.num_samples, self.seed)])
        for data in {cell.base.data for cell in self.cells}:
            prepare_data(data)
        for cell in self.cells:  # train.init_from: the file, and that it fits the model
            check_initial_weights(absolute_paths(cell.base), ())


def run_study(study: Study) -> StudyOutcome:
    study.validate()
    tracker = SweepTracker(study.tracking_uri, study.name)
    if study.resume_run_id:
        parent, stamp = reopen_study_run(tracker, study.resume_run_id, study.name)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        parent = tracker.start_sweep(
            f"{study.name} study {time.strftime('%Y-%m-%d %H:%M')}",
            params={"study.num_samples": study.num_samples, "study.seeds": study.seeds,
                    "study.seed": study.seed, "study.search_metric": study.search_metric,
                    "study.metric": study.metric, "study.pick_within": study.pick_within,
                    "study.backoff_key": study.backoff_key, "study.design": study.design,
                    "study.rungs": str(study.rungs), "study.reduction": study.reduction,
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
        outcome = report(study, tracker, parent, cells)
    _prune_search_checkpoints(study, stamp)
    return outcome


def _prune_search_checkpoints(study: Study, stamp: str) -> None:
    """A finished study's search trials were picked from and re-run with seeds: their
    checkpoints (best + latest each) only take disk. Their metrics stay (--report-from
    reads them); the seed re-runs keep theirs."""
    freed = 0
    for folder in Path(study.storage_path).resolve().glob(f"{study.name}-{stamp}-search*"):
        # In-process trials keep trial_*/checkpoint_*, DDP ones trial_*/train-*/checkpoint_*.
        for checkpoint in [*folder.glob("trial_*/checkpoint_*"),
                           *folder.glob("trial_*/train-*/checkpoint_*")]:
            freed += sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
            shutil.rmtree(checkpoint)
    if freed:
        print(f"removed the search trials' checkpoints: {freed / 2**20:.1f} MiB freed",
              flush=True)


def search_base(study: Study, cell: Cell) -> TrialConfig:
    """A cell's config for its search trials. Choosing on a validation split, they skip
    what only the seed re-runs report: the test split after every epoch and the end
    stages' evaluations (weight rounding, deployment). The picked config gets them back
    (``study_results.SEARCH_ONLY``)."""
    if not study.search_metric.startswith("val_") or cell.base.data.val_fraction == 0:
        return cell.base
    return cell.base.replace({"evaluate.weight_rounding": (),
                              "evaluate.test_each_epoch": False, "export.formats": ()})


def _sweep(study: Study, **kwargs: Any) -> Sweep:
    return Sweep(name=study.name, max_concurrent=study.max_concurrent,
                 auto_gpus=study.auto_gpus, max_failures=study.max_failures,
                 tracking_uri=study.tracking_uri, storage_path=study.storage_path,
                 address=study.address, seed=study.seed, prepare_data=False, **kwargs)


def _search_cells(study: Study, tracker: SweepTracker, parent: str, stamp: str
                  ) -> list[CellResult]:
    """Every cell's search and pick. The cells that halve run together in one Tune run
    (:mod:`sweeps.together`: another cell's trials use the cores one cell leaves idle at
    its rungs); the others one sweep each (resumable trial by trial). A resumed study
    reads back the cells that finished."""
    results: dict[tuple[str, ...], CellResult] = {}
    grids: dict[str, Any] = {}  # Tune folders read back, by name
    together, alone = [], []
    for cell in study.cells:
        earlier = nested_cell_run(tracker, parent, cell.label) if study.resume_run_id \
            else None
        if earlier is not None and earlier.info.status == "FINISHED":
            restored = _read_back_cell(study, cell, earlier, grids)
            if restored is not None:
                results[cell.key] = restored
            continue
        (together if study.cell_rungs(cell) else alone).append((cell, earlier))
    if together:
        results.update(_search_together(study, tracker, parent, stamp, together))
    for cell, earlier in alone:
        result = _search_alone(study, tracker, parent, stamp, cell, earlier)
        if result is not None:
            results[cell.key] = result
    return [results[cell.key] for cell in study.cells if cell.key in results]


def _read_back_cell(study: Study, cell: Cell, run: Any, grids: dict[str, Any]
                    ) -> CellResult | None:
    grid = cell_grid(study.storage_path, run, grids)
    rows = restored_rows(grid, study)
    print(f"=== search {cell.label}: finished before the interrupt: read back from "
          f"{run.data.tags.get('tune_folder')} ===", flush=True)
    if not rows:
        return None  # every trial failed: the run skipped the cell too
    configs = {r.metrics.get("trial_id"): r.config for r in grid if r.metrics}
    return cell_result(study, cell.key, rows, configs, run.data.tags.get("picked_trial_id"))


def _cell_sweep(study: Study, cell: Cell, parent: str, folder: str, **kwargs: Any) -> Sweep:
    return _sweep(study, base=search_base(study, cell),
                  points=tuple(cell.space.points(study.num_samples, study.seed)),
                  metric=study.search_metric, rungs=study.cell_rungs(cell),
                  reduction_factor=study.reduction,
                  # A point a hair behind at a rung may be the one the pick backs off to.
                  rung_margin=study.pick_within,
                  kind="search", tags={"cell": cell.label}, parent_run_id=parent,
                  run_name=folder, title=f"search {cell.label}",
                  params=_design_params(study, cell), log_checkpoints=False, **kwargs)


def _picked(study: Study, tracker: SweepTracker, cell: Cell, outcome: Any) -> CellResult:
    """The cell's pick from its search, tagged on the search run (--report-from reads it
    back rather than picking again)."""
    configs = {r.metrics.get("trial_id"): r.config for r in outcome.results if r.metrics}
    result = cell_result(study, cell.key, with_searched(study, outcome.rows, configs),
                         configs)
    tracker.set_tags(outcome.parent_run_id, {"picked_trial_id": result.picked_trial_id})
    return result


def _search_together(study: Study, tracker: SweepTracker, parent: str, stamp: str,
                     cells: list[tuple[Cell, Any]]) -> dict[tuple[str, ...], CellResult]:
    for _, earlier in cells:
        if earlier is not None:  # Tune does not save the halving decisions
            retire_run(tracker, earlier, HALVING_LOST)
    # Not "-search-<key>", the folder of a cell searched alone.
    folder = _new_folder(study, f"{study.name}-{stamp}-searches")
    labels = ", ".join(cell.label for cell, _ in cells)
    print(f"\n=== search {len(cells)} cells side by side, each ranked by itself: {labels} "
          "===", flush=True)
    results: dict[tuple[str, ...], CellResult] = {}

    def done(i: int, outcome: Any) -> None:
        cell = cells[i][0]
        if isinstance(outcome, RuntimeError):  # every trial failed: go on with the rest
            print(f"cell {cell.label} failed: {outcome}", flush=True)
            return
        results[cell.key] = _picked(study, tracker, cell, outcome)
        print(f"=== search {cell.label} finished: picked {study.backoff_key}="
              f"{format_value(results[cell.key].best_config.get(study.backoff_key))} ===",
              flush=True)

    run_together([_cell_sweep(study, cell, parent, folder) for cell, _ in cells], folder,
                 done)
    return results


def _new_folder(study: Study, name: str) -> str:
    """``name``, or ``name-2``, ... where a resumed study already has that folder."""
    root, k = Path(study.storage_path).resolve(), 1
    folder = name
    while (root / folder).exists():
        k += 1
        folder = f"{name}-{k}"
    return folder


def _search_alone(study: Study, tracker: SweepTracker, parent: str, stamp: str, cell: Cell,
                  earlier: Any | None) -> CellResult | None:
    print(f"\n=== search {cell.label} ===", flush=True)
    folder = f"{study.name}-{stamp}-search-{'-'.join(cell.key)}"
    if earlier is not None and earlier.data.tags.get("tune_folder") != folder:
        retire_run(tracker, earlier, "Interrupted in a run of several cells")
        earlier = None
    try:
        outcome = run_sweep(_cell_sweep(
            study, cell, parent, folder,
            resume_run_id=resume_or_restart(tracker, study.storage_path, earlier, folder)))
    except RuntimeError as exc:  # every trial failed: record it, go on with the rest
        print(f"cell {cell.label} failed: {exc}", flush=True)
        return None
    return _picked(study, tracker, cell, outcome)


def _design_params(study: Study, cell: Cell) -> dict[str, Any]:
    """A search run's design: the ranges and constants of its Sobol points."""
    ranges = {f"search.{key}": f"{low:g}..{high:g}{' log' if log else ''}"
              for key, low, high, log in cell.space.ranges}
    return {"sweep.design": f"scrambled Sobol, {study.num_samples} points, seed "
                            f"{study.seed}", **ranges,
            **{f"search.{key}": f"= {value}" for key, value in cell.space.constants}}


def _rerun_seeds(study: Study, tracker: SweepTracker, cells: list[CellResult], parent: str,
                 stamp: str) -> None:
    """All cells' picked configs x seeds in one points sweep, each trial to its last epoch."""
    seeds = [study.seed + i for i in range(1, study.seeds + 1)]
    points = tuple({**cell.best_config, "train.seed": s} for cell in cells for s in seeds)
    print(f"\n=== picked configs x seeds {seeds}: {len(points)} trials ===", flush=True)
    folder = f"{study.name}-{stamp}-seeds"
    earlier = nested_run_of_folder(tracker, parent, folder) if study.resume_run_id else None
    if earlier is not None and earlier.info.status == "FINISHED":
        add_seed_results(study, cells, read_back(study.storage_path, folder))
        return
    outcome = run_sweep(_sweep(
        study, base=TrialConfig.from_flat(cells[0].best_config), points=points,
        metric=study.metric, parent_run_id=parent, run_name=folder,
        title=f"seeds {seeds[0]}..{seeds[-1]} x {len(cells)} picked configs", log_best=False,
        resume_run_id=resume_or_restart(tracker, study.storage_path, earlier, folder)))
    add_seed_results(study, cells, outcome.results)


