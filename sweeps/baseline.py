"""Baseline sweep: FP32 LeNet on real MNIST, Optuna TPE over learning rate and weight
decay, ASHA on validation accuracy (10% of the training set held out; the test accuracy
is reported beside it), every trial tracked in MLflow.

    python sweeps/baseline.py                  # ~10 minutes on 2 cores, full MNIST
    python sweeps/baseline.py --smoke-test     # a small subset, under 3 minutes
    python sweeps/baseline.py --num-samples 32 --epochs 5 --max-concurrent 4
    ray submit cluster/gpu.yaml sweeps/baseline.py   # --gpus-per-trial auto (default)
"""

from __future__ import annotations

from typing import Any

from sweeps.cli import (
    base_config,
    common_parser,
    main_guard,
    print_summary,
    resume_run_id,
    sweep_options,
)
from sweeps.runner import run_sweep
from sweeps.spec import Sweep

# Chosen on a validation split, as the studies do: the test set only reports.
METRIC, MODE = "val_acc", "max"

DEFAULTS = ["data.name=mnist", "model.name=lenet", "model.channels=[16,32]",
            "model.hidden=[128]", "optim.name=sgd", "optim.momentum=0.9",
            "optim.nesterov=true", "optim.schedule=onecycle", "data.batch_size=128",
            "data.val_fraction=0.1"]
SMOKE = ["data.train_subset=10000", "data.test_subset=2000", "train.epochs=2"]


def space(trial: Any) -> None:
    """Define-by-run: no computation here, only suggestions (Ray's Optuna example)."""
    trial.suggest_float("optim.lr", 5e-3, 0.3, log=True)
    trial.suggest_float("optim.weight_decay", 1e-6, 1e-2, log=True)


def main() -> int:
    parser = common_parser(__doc__.splitlines()[0], num_samples=20, max_concurrent=2,
                           epochs=4)
    args = parser.parse_args()
    base = base_config(args, DEFAULTS, SMOKE)
    num_samples = min(args.num_samples, 4) if args.smoke_test else args.num_samples
    sweep = Sweep(base=base, space=space, num_samples=num_samples, metric=METRIC, mode=MODE,
                  resume_run_id=resume_run_id(args, "baseline", "search"),
                  **sweep_options(args, "baseline"))
    print_summary(run_sweep(sweep))
    return 0


if __name__ == "__main__":
    main_guard(main)
