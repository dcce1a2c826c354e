"""Compare the configs two study runs picked, cell by cell, from their MLflow runs alone;
and, for a study whose search ran every point to the end, what synchronous successive
halving would have picked from the same per-epoch metrics (its decisions depend only on
them, and a paused trial resumes to the same numbers, so this is what a halving run
with the same numerics picks).

    python bench/study_picks.py --tracking-uri sqlite:///mlflow.db RUN_A [RUN_B] \\
        [--tracking-uri-b URI] [--rungs 1,2] [--reduction 2]

Prints one row per cell (picked lr and weight decay of A, of B, and of halving over A's
metrics) and one JSON line with the counts of cells that agree.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import _util

from sweeps.halving import point_index, survivors
from sweeps.study_results import pick_config


def search_cells(client: Any, study_id: str) -> dict[str, dict[str, Any]]:
    """cell label -> {picked trial id, trials: trial id -> (lr, wd, status, val_acc per
    epoch)} of a study run."""
    exp = client.get_run(study_id).info.experiment_id
    cells = {}
    for search in client.search_runs([exp], f"tags.mlflow.parentRunId = '{study_id}' and "
                                            "tags.kind = 'search'"):
        trials = {}
        for trial in client.search_runs([exp], "tags.mlflow.parentRunId = "
                                               f"'{search.info.run_id}'"):
            history = client.get_metric_history(trial.info.run_id, "val_acc")
            curve = [m.value for m in sorted(history, key=lambda m: m.step)]
            trials[trial.data.tags["trial_id"]] = {
                "lr": float(trial.data.params["optim.lr"]),
                "wd": float(trial.data.params.get("optim.weight_decay", "nan")),
                "status": trial.info.status, "curve": curve,
                "diverged": trial.data.tags.get("diverged") == "true"}
        cells[search.data.tags["cell"]] = {"picked": search.data.tags.get("picked_trial_id"),
                                           "trials": trials}
    return cells


def halving_pick(trials: dict[str, dict[str, Any]], rungs: tuple[int, ...], reduction: int,
                 within: float, margin: float) -> tuple[str | None, int]:
    """The trial synchronous halving keeps to the end and the study's rule picks, and
    the epochs halving trains (a diverged trial's up to where it diverged)."""
    epochs = max(len(t["curve"]) for t in trials.values())
    alive = {point_index(_Id(tid)): tid for tid in trials}
    trained, done = 0, 0
    for rung in rungs:
        trained += sum(min(len(trials[t]["curve"]), rung) - done for t in alive.values()
                       if len(trials[t]["curve"]) > done)
        done = rung
        scores = {}
        for i, tid in alive.items():
            curve = trials[tid]["curve"]
            ok = len(curve) >= rung and not (trials[tid]["diverged"] and len(curve) == rung)
            scores[i] = curve[rung - 1] if ok else math.nan
        kept = survivors(scores, len(alive), reduction, "max", margin)
        alive = {i: alive[i] for i in kept}
    rows = [{"trial_id": tid, "status": trials[tid]["status"], "diverged": trials[tid]["diverged"],
             "optim.lr": trials[tid]["lr"], "val_acc": trials[tid]["curve"][-1]}
            for tid in alive.values() if len(trials[tid]["curve"]) == epochs]
    trained += sum(len(trials[t]["curve"]) - done for t in alive.values()
                   if len(trials[t]["curve"]) > done)
    picked = pick_config(rows, "val_acc", within, "optim.lr")
    return (picked["trial_id"] if picked else None), trained


class _Id:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def _config(cell: dict[str, Any], trial_id: str | None) -> str:
    if trial_id is None or trial_id not in cell["trials"]:
        return "-"
    t = cell["trials"][trial_id]
    return f"lr {t['lr']:.4g} wd {t['wd']:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_ID", help="one or two study runs")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--tracking-uri-b", default=None,
                        help="the second run's store (default: --tracking-uri)")
    parser.add_argument("--rungs", default="1,2")
    parser.add_argument("--reduction", type=int, default=2)
    parser.add_argument("--pick-within", type=float, default=0.003)
    parser.add_argument("--margin", type=float, default=None,
                        help="halving keeps points within this of a rung's cut "
                             "(default: --pick-within, as a study does)")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    env = _util.header("study_picks")
    client = MlflowClient(args.tracking_uri)
    rungs = tuple(int(r) for r in args.rungs.split(","))
    a = search_cells(client, args.runs[0])
    b = search_cells(MlflowClient(args.tracking_uri_b or args.tracking_uri), args.runs[1]) \
        if len(args.runs) > 1 else {}
    counts = {"cells": 0, "a_equals_b": 0, "a_equals_halving_of_a": 0,
              "epochs_a": 0, "epochs_halving_of_a": 0}
    for label in sorted(a):
        cell = a[label]
        every_point = all(len(t["curve"]) == max(len(u["curve"]) for u in
                                                 cell["trials"].values()) or t["diverged"]
                          for t in cell["trials"].values())
        margin = args.pick_within if args.margin is None else args.margin
        simulated, epochs = halving_pick(cell["trials"], rungs, args.reduction,
                                         args.pick_within, margin) \
            if every_point else (None, 0)
        counts["epochs_a"] += sum(len(t["curve"]) for t in cell["trials"].values())
        counts["epochs_halving_of_a"] += epochs
        other = b.get(label)
        columns = {"a": _config(cell, cell["picked"]),
                   "b": _config(other, other["picked"]) if other else "-",
                   "halving_of_a": _config(cell, simulated) if every_point else "(a halved)"}
        counts["cells"] += 1
        counts["a_equals_b"] += other is not None and columns["a"] == columns["b"]
        counts["a_equals_halving_of_a"] += simulated is not None and simulated == cell["picked"]
        _util.row(label, **columns)
    _util.finish(env, {"runs": args.runs, "rungs": list(rungs), **counts})


if __name__ == "__main__":
    main()
