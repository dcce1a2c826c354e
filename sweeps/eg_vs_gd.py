"""EG vs GD: do multiplicative (exponentiated-gradient) updates train as well as additive
ones, and what do their weights look like? Optimizers x datasets x models on real data.

Every cell (dataset, model, optimizer) searches its learning rate (a log range per
optimizer) and weight decay with the same 8 quasi-random points, choosing on a
validation split (10% of the training set); the picked config of every cell is re-run
with fresh seeds and its test accuracy reported as mean +- std, also with the final
weights quantized to LNS-8, LNS-4, INT8 and INT4 (per channel) inside each trial
(weight-only post-training quantization). The design and the MLflow layout are
sweeps/study.py's. ``--set quant.mode=qat --set quant.bits=4`` runs the whole study under
4-bit QAT (``test_acc_q`` is then the quantized model's accuracy).

    python sweeps/eg_vs_gd.py --smoke-test            # MNIST + MLP, tiny subset, minutes
    python sweeps/eg_vs_gd.py                         # everything, full data (~1.5 h, 2 cores)
    python sweeps/eg_vs_gd.py --datasets mnist --optimizers gd eg --models cnn
    ray submit cluster/gpu.yaml sweeps/eg_vs_gd.py -- --gpus-per-trial 0.25 --max-concurrent 16
"""

from __future__ import annotations

import argparse
import itertools

from sweeps.cli import base_config, common_parser, main_guard, tracking_uri
from sweeps.runner import mlflow_ui_command
from sweeps.study import Cell, SearchSpace, Study, report_from, run_study
from trainables.config import ConfigError

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
# Plain updates (gd and eg take no momentum by default), so a pair differs only in the
# update's form; every trial rounds its final weights to two log formats.
COMMON = ["optim.schedule=onecycle", "data.batch_size=128", "data.val_fraction=0.1",
          "train.threads=1", "evaluate.weight_rounding=[lns8,lns4,int8,int4]"]
ROUNDED = ("test_acc_lns8", "test_acc_lns4", "test_acc_int8", "test_acc_int4", "test_acc_q")
AXES = {"data.name": "--datasets", "model.name": "--models", "optim.name": "--optimizers"}
SMOKE = ["data.train_subset=2000", "data.test_subset=1000", "train.epochs=2"]


def space(optimizer: str) -> SearchSpace:
    return SearchSpace(
        ranges=(("optim.lr", *LR_RANGE[optimizer], True),
                ("optim.weight_decay", *WEIGHT_DECAY_RANGE, True)),
        constants=(("optim.bias_lr", BIAS_LR[optimizer]),) if optimizer in BIAS_LR else ())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__.splitlines()[0], num_samples=8, max_concurrent=2, epochs=3)
    parser.add_argument("--datasets", nargs="+", default=None, choices=DATASETS,
                        help=f"default: {' '.join(DATASETS)} (smoke test: mnist)")
    parser.add_argument("--models", nargs="+", default=None, choices=tuple(MODELS),
                        help=f"default: {' '.join(MODELS)} (smoke test: mlp)")
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                        choices=OPTIMIZERS)
    parser.add_argument("--seeds", type=int, default=3,
                        help="re-runs of each cell's picked config, with seeds seed+1..seed+N")
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


def study(args: argparse.Namespace) -> Study:
    """Every cell's base config (validated here) and space (validated by run_study)."""
    cells = []
    for dataset, model, optimizer in itertools.product(args.datasets, args.models,
                                                       args.optimizers):
        defaults = [f"data.name={dataset}", *MODELS[model], f"optim.name={optimizer}",
                    *COMMON]
        cells.append(Cell((dataset, model, optimizer), base_config(args, defaults, SMOKE),
                          space(optimizer)))
    for text in args.overrides:  # the cells' own axes come from their flags
        key = text.partition("=")[0].strip()
        if key in AXES:
            raise ConfigError(f"--set {key} is invalid here: the study's cells set it; "
                              f"allowed {AXES[key]}")
    return Study(
        name=STUDY, cells=tuple(cells), key_names=("dataset", "model", "optimizer"),
        num_samples=args.num_samples, seeds=args.seeds, seed=args.seed,
        extra_metrics=ROUNDED, max_concurrent=args.max_concurrent,
        tracking_uri=tracking_uri(args), storage_path=args.storage_path, address=args.address,
        params={"study.epochs": args.epochs, "study.smoke_test": args.smoke_test,
                "study.datasets": ",".join(args.datasets), "study.models": ",".join(args.models),
                "study.optimizers": ",".join(args.optimizers),
                **{f"study.lr_range.{k}": f"{v[0]}..{v[1]}" for k, v in LR_RANGE.items()
                   if k in args.optimizers}})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = study(args)
    if args.report_from:
        outcome = report_from(plan, args.report_from)
    else:
        outcome = run_study(plan)  # validates every config and dataset before Ray starts
    print(f"\n=== {STUDY}: test_acc over seeds per cell ===\n{outcome.table}")
    print(f"MLflow experiment {STUDY!r}, study run {outcome.run_id}")
    print(f"See the results:  {mlflow_ui_command(tracking_uri(args))}")
    return 0


if __name__ == "__main__":
    main_guard(main)
