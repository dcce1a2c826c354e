"""Train one tracked trial, no search: a config (defaults, ``--config FILE.yaml``,
``--set key=value``) runs through the same runner as a sweep's trials (in-process, or
``--num-workers N`` DDP through Ray Train, ``--address`` to join a cluster), tracked in
MLflow like one (its own experiment, ``train`` by default); prints the final metrics and
the trial's MLflow run id.

    python -m sweeps.train --set data.root=../shared/data --set optim.lr=0.05
    python -m sweeps.train --set quant.mode=qat --set quant.bits=4 --epochs 3
    python -m sweeps.train --config my_trial.yaml --num-workers 2 --experiment qat-runs
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from sweeps.cli import add_trial_flags, base_config, main_guard, resume_run_id, tracking_uri
from sweeps.runner import mlflow_ui_command, run_sweep
from sweeps.spec import SUMMARY_METRICS, Sweep
from sweeps.tracking import trial_metrics

__all__ = ["main", "parse_args", "final_metrics"]

KIND = "train"  # the tag of a one-trial run (what --resume looks for)
SMOKE = ["data.train_subset=2000", "data.test_subset=500", "train.epochs=1"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sweeps.train",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_trial_flags(parser, None, "train.epochs (default: the config's)")
    parser.add_argument("--experiment", default="train",
                        help="MLflow experiment the run goes to")
    parser.add_argument("--smoke-test", action="store_true",
                        help=f"a small subset, one epoch ({' '.join(SMOKE)})")
    return parser.parse_args(argv)


def final_metrics(result: Any) -> dict[str, float]:
    """The trial's last report: every numeric metric, epoch and stage metrics alike."""
    return trial_metrics(result.metrics or {})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = base_config(args, [], SMOKE)
    sweep = Sweep(name=args.experiment, base=base, points=({},), kind=KIND,
                  seed=args.seed, tracking_uri=tracking_uri(args),
                  storage_path=args.storage_path, address=args.address,
                  resume_run_id=resume_run_id(args, args.experiment, KIND),
                  auto_gpus=args.gpus_per_trial == "auto", max_failures=args.max_failures,
                  log_best=False)
    outcome = run_sweep(sweep)
    (row,) = outcome.rows
    metrics = final_metrics(next(iter(outcome.results)))
    print(f"\n=== trial {row['status'].lower()} ===")
    shown = [k for k in SUMMARY_METRICS if k in metrics] + \
        sorted(k for k in metrics if k not in SUMMARY_METRICS)
    for key in shown:
        value = metrics[key]
        text = f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) \
            else str(value)
        print(f"  {key:>24} = {text}")
    print(f"\nMLflow experiment {args.experiment!r}, trial run {row['mlflow_run_id']}")
    print(f"See it:  {mlflow_ui_command(outcome.tracking_uri)}")
    return 0 if row["status"] == "FINISHED" else 1


if __name__ == "__main__":
    main_guard(main)
