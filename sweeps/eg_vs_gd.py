"""EG vs GD: do multiplicative (exponentiated-gradient) updates train as well as additive
ones, and what do their weights look like? Optimizers x datasets x models on real data.

For every cell (dataset, model, optimizer) Optuna TPE searches the learning rate (a
log range per optimizer, define-by-run) and weight decay under ASHA, choosing on a
validation split (10% of the training set); then the best config of every cell is re-run
with fresh seeds and its test accuracy reported as mean +- std, also with the final
weights rounded to LNS-8 and LNS-4 (weight-only post-training quantization). The study's parent
MLflow run holds comparison.csv/.md, curves.png, sensitivity.png and weights.png; each
cell's search and the seed re-runs are nested runs under it, trials nested under those.

    python sweeps/eg_vs_gd.py --smoke-test            # MNIST + MLP, tiny subset, minutes
    python sweeps/eg_vs_gd.py                         # everything, full data (~1 h, 2 cores)
    python sweeps/eg_vs_gd.py --datasets mnist --optimizers gd eg --models cnn
    ray submit cluster/gpu.yaml sweeps/eg_vs_gd.py -- --gpus-per-trial 0.25 --max-concurrent 16
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeps.cli import base_config, common_parser, main_guard, tracking_uri
from sweeps.compare import (
    CellResult,
    plot_curves,
    plot_sensitivity,
    plot_weights,
    table_rows,
    weight_vector,
)
from sweeps.runner import (
    Sweep,
    mlflow_ui_command,
    rows_to_csv,
    rows_to_markdown,
    run_sweep,
    validate_space,
)
from trainables.config import ConfigError, TrialConfig
from trainables.data import prepare_data
from trainables.tracking import SweepTracker

# Configs are chosen on a validation split held out of the training set (SEARCH_METRIC);
# the test set only scores the re-runs (METRIC), so the table is not tuned on it.
SEARCH_METRIC, METRIC, MODE = "val_acc", "test_acc", "max"
STUDY = "eg_vs_gd"
OPTIMIZERS = ("gd", "eg", "adam_gd", "adam_eg", "madam", "lns_madam")
DATASETS = ("mnist", "fashion_mnist")
MODELS = {"mlp": ["model.name=mlp", "model.widths=[256,128]"],
          "cnn": ["model.name=lenet", "model.channels=[16,32]", "model.hidden=[128]"]}
# Learning-rate ranges (log-uniform). Multiplicative lrs are relative changes per step,
# additive ones absolute: the ranges differ by orders of magnitude. Calibrated by one
# epoch on 20k MNIST images (closing note of the optimizers issue); lns_madam needs
# lr * 2**frac_bits * g_bound >= 0.5 to move at all.
LR_RANGE = {"gd": (0.01, 1.0), "eg": (0.1, 10.0), "adam_gd": (1e-4, 0.05),
            "adam_eg": (3e-3, 1.0), "madam": (3e-3, 1.0), "lns_madam": (0.02, 1.0)}
WEIGHT_DECAY_RANGE = (1e-6, 1e-3)
# Biases and norm parameters of the multiplicative optimizers step additively (they start
# at 0); their learning rate is fixed per optimizer rather than searched.
BIAS_LR = {"eg": 0.05, "adam_eg": 1e-3, "madam": 0.01, "lns_madam": 0.01}
# Plain updates: no momentum for gd/eg, so the pair differs only in the update's form.
COMMON = ["optim.momentum=0", "optim.nesterov=false", "optim.schedule=onecycle",
          "data.batch_size=128", "data.val_fraction=0.1", "train.threads=1"]
SMOKE = ["data.train_subset=2000", "data.test_subset=1000", "train.epochs=2"]


@dataclass(frozen=True)
class CellSpace:
    """The define-by-run space of one optimizer's cell: lr in its own range, weight decay;
    the bias lr is a constant of the optimizer (returned, not searched). A class rather
    than a closure because Tune pickles the searcher, space included, with its state."""

    optimizer: str

    def __call__(self, trial: Any) -> dict[str, Any]:
        low, high = LR_RANGE[self.optimizer]
        trial.suggest_float("optim.lr", low, high, log=True)
        trial.suggest_float("optim.weight_decay", *WEIGHT_DECAY_RANGE, log=True)
        if self.optimizer in BIAS_LR:
            return {"optim.bias_lr": BIAS_LR[self.optimizer]}
        return {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__.splitlines()[0], num_samples=8, max_concurrent=2, epochs=3)
    parser.add_argument("--datasets", nargs="+", default=None, choices=DATASETS,
                        help=f"default: {' '.join(DATASETS)} (smoke test: mnist)")
    parser.add_argument("--models", nargs="+", default=None, choices=tuple(MODELS),
                        help=f"default: {' '.join(MODELS)} (smoke test: mlp)")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                        choices=OPTIMIZERS)
    parser.add_argument("--seeds", type=int, default=3,
                        help="re-runs of each cell's best config, with seeds seed+1..seed+N")
    parser.add_argument("--report-from", default=None, metavar="RUN_ID",
                        help="train nothing: rebuild the table and plots of this finished "
                             "study run from its MLflow runs and Tune folders")
    args = parser.parse_args(argv)
    args.datasets = args.datasets or (["mnist"] if args.smoke_test else list(DATASETS))
    args.models = args.models or (["mlp"] if args.smoke_test else list(MODELS))
    if args.smoke_test:
        args.num_samples, args.seeds = min(args.num_samples, 2), min(args.seeds, 2)
    for name, low in (("--num-samples", 1), ("--seeds", 1), ("--max-concurrent", 1)):
        value = getattr(args, name[2:].replace("-", "_"))
        if value < low:
            raise ConfigError(f"{name}={value} is invalid: allowed >= {low}")
    return args


def plan(args: argparse.Namespace) -> dict[tuple[str, str, str], TrialConfig]:
    """Every cell's base config, validated with its space before any Ray work starts."""
    cells = {}
    for dataset, model, optimizer in itertools.product(args.datasets, args.models,
                                                       args.optimizers):
        defaults = [f"data.name={dataset}", *MODELS[model], f"optim.name={optimizer}",
                    *COMMON]
        base = base_config(args, defaults, SMOKE)
        validate_space(base, CellSpace(optimizer))
        cells[(dataset, model, optimizer)] = base
    return cells


def search_cells(args: argparse.Namespace, bases: dict[tuple[str, str, str], TrialConfig],
                 parent: str, stamp: str) -> list[CellResult]:
    cells = []
    for (dataset, model, optimizer), base in bases.items():
        print(f"\n=== search {dataset} / {model} / {optimizer} ===", flush=True)
        try:
            outcome = run_sweep(Sweep(
                name=STUDY, base=base, space=CellSpace(optimizer),
                num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                metric=SEARCH_METRIC, mode=MODE, seed=args.seed,
                tracking_uri=tracking_uri(args),
                storage_path=args.storage_path, address=args.address, parent_run_id=parent,
                run_name=f"{STUDY}-{stamp}-search-{dataset}-{model}-{optimizer}"))
        except RuntimeError as exc:  # every trial failed: record it, go on with the rest
            print(f"cell {dataset}/{model}/{optimizer} failed: {exc}", flush=True)
            continue
        cells.append(CellResult(dataset, model, optimizer, outcome.rows, outcome.best_config))
    return cells


def rerun_seeds(args: argparse.Namespace, cells: list[CellResult], parent: str,
                stamp: str) -> None:
    """All cells' best configs x seeds in one run, each trial to the last epoch."""
    seeds = [args.seed + i for i in range(1, args.seeds + 1)]
    points = tuple({**cell.best_config, "train.seed": s} for cell in cells for s in seeds)
    print(f"\n=== best configs x seeds {seeds}: {len(points)} trials ===", flush=True)
    outcome = run_sweep(Sweep(
        name=STUDY, base=TrialConfig.from_flat(cells[0].best_config), points=points,
        max_concurrent=args.max_concurrent, metric=METRIC, mode=MODE,
        tracking_uri=tracking_uri(args), storage_path=args.storage_path,
        address=args.address, parent_run_id=parent, run_name=f"{STUDY}-{stamp}-seeds"))
    add_seed_results(cells, outcome.results)


def _model_label(model_name: str) -> str:
    """The study's name of a model (lenet -> cnn)."""
    return {MODELS[m][0].split("=")[1]: m for m in MODELS}[model_name]


def add_seed_results(cells: list[CellResult], results: Any) -> None:
    """Histories, final weights and weight-rounding accuracies of the seed re-runs."""
    from trainables.evaluate import LNS_PTQ_FORMATS, weight_rounding_accuracy
    from trainables.sessions import load_state_file

    by_key = {(c.dataset, c.model, c.optimizer): c for c in cells}
    for result in results:
        if result.error or result.metrics_dataframe is None:
            continue
        cfg = result.config
        cell = by_key[(cfg["data.name"], _model_label(cfg["model.name"]), cfg["optim.name"])]
        history = result.metrics_dataframe.to_dict("records")
        weights, rounded = None, None
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as folder:
                model_state = load_state_file(Path(folder))["model"]
            weights = weight_vector(model_state)
            # Which optimizer's weights survive log-domain rounding (weight-only PTQ).
            rounded = weight_rounding_accuracy(TrialConfig.from_flat(cfg), model_state,
                                               LNS_PTQ_FORMATS)
        cell.add_seed_run(cfg["train.seed"], history, weights, rounded)


def restore_cells(args: argparse.Namespace, tracker: SweepTracker,
                  study_run: str) -> list[CellResult]:
    """Rebuild the cells of a study that has run (its report failed or is to be redrawn)
    from its nested MLflow runs and their Tune folders under --storage-path."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    children = tracker.client.search_runs(
        [tracker.experiment_id], f"tags.mlflow.parentRunId = '{study_run}'")
    if not children:
        raise ConfigError(f"--report-from={study_run} is invalid: allowed the run id of an "
                          f"{STUDY} study run with nested search runs")
    storage = Path(args.storage_path).resolve()
    cells, seeds = [], None
    for run in children:
        grid = ResultGrid(ExperimentAnalysis(str(storage / run.info.run_name)))
        if run.data.tags.get("kind") == "points":
            seeds = grid
            continue
        params = run.data.params
        rows = _search_rows(grid, int(params["train.epochs"]))
        best = max(rows, key=lambda r: r[SEARCH_METRIC])
        best_config = next(r.config for r in grid
                           if r.metrics and r.metrics.get("trial_id") == best["trial_id"])
        cells.append(CellResult(params["data.name"], _model_label(params["model.name"]),
                                params["optim.name"], rows, best_config))
    order = {k: i for i, k in enumerate((*DATASETS, *MODELS, *OPTIMIZERS))}
    cells.sort(key=lambda c: (order[c.dataset], order[c.model], order[c.optimizer]))
    if seeds is not None:
        add_seed_results(cells, seeds)
    return cells


def _search_rows(grid: Any, epochs: int) -> list[dict[str, Any]]:
    # A trial that stopped before the last epoch was stopped by ASHA.
    rows = []
    for result in grid:
        if not result.metrics or SEARCH_METRIC not in result.metrics:
            continue
        m = result.metrics
        rows.append({"trial_id": m["trial_id"],
                     "status": "FINISHED" if m.get("epoch") == epochs else "KILLED",
                     "optim.lr": result.config["optim.lr"],
                     "optim.weight_decay": result.config["optim.weight_decay"],
                     **{k: m[k] for k in ("epoch", "train_loss", SEARCH_METRIC, METRIC)
                        if k in m}})
    return rows


def report(tracker: SweepTracker, parent: str, cells: list[CellResult]) -> str:
    rows = table_rows(cells, METRIC, SEARCH_METRIC)
    tracker.log_text(parent, rows_to_csv(rows), "comparison.csv")
    table = rows_to_markdown(rows)
    tracker.log_text(parent, table, "comparison.md")
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(parent, plot_curves(cells, Path(tmp) / "curves.png"))
        tracker.log_artifact(parent, plot_sensitivity(cells, Path(tmp) / "sensitivity.png",
                                                      SEARCH_METRIC))
        tracker.log_artifact(parent, plot_weights(cells, Path(tmp) / "weights.png"))
    metrics = {}
    for row in rows:
        key = f"{row['dataset']}.{row['model']}.{row['optimizer']}"
        if not math.isnan(row[f"{METRIC}_mean"]):
            metrics[f"{key}.{METRIC}_mean"] = row[f"{METRIC}_mean"]
            metrics[f"{key}.{METRIC}_std"] = row[f"{METRIC}_std"]
    tracker.log_metrics(parent, metrics, step=0)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_from:
        tracker = SweepTracker(tracking_uri(args), STUDY)
        with tracker.ending(args.report_from):
            table = report(tracker, args.report_from,
                           restore_cells(args, tracker, args.report_from))
        print(f"\n=== {STUDY}: {METRIC} over seeds per cell ===\n{table}")
        return 0
    bases = plan(args)
    for data in {base.data for base in bases.values()}:
        prepare_data(data)  # a missing dataset fails here, before any Ray work
    tracker = SweepTracker(tracking_uri(args), STUDY)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = tracker.start_sweep(
        f"{STUDY}-{stamp}",
        params={"study.datasets": ",".join(args.datasets), "study.models": ",".join(args.models),
                "study.optimizers": ",".join(args.optimizers), "study.seeds": args.seeds,
                "study.num_samples": args.num_samples, "study.epochs": args.epochs,
                "study.smoke_test": args.smoke_test,
                **{f"study.lr_range.{k}": f"{v[0]}..{v[1]}" for k, v in LR_RANGE.items()
                   if k in args.optimizers}},
        tags={"sweep": STUDY, "kind": "study"})
    with tracker.ending(parent):
        cells = search_cells(args, bases, parent, stamp)
        if not cells:
            raise RuntimeError("no cell produced a result; see the FAILED runs in MLflow")
        rerun_seeds(args, cells, parent, stamp)
        table = report(tracker, parent, cells)
    print(f"\n=== {STUDY}: {METRIC} over seeds per cell ===\n{table}")
    print(f"MLflow experiment {STUDY!r}, parent run {parent}")
    print(f"See the results:  {mlflow_ui_command(tracking_uri(args))}")
    return 0


if __name__ == "__main__":
    main_guard(main)
