"""EG vs GD: do multiplicative (exponentiated-gradient) updates train as well as additive
ones, and what do their weights look like? Optimizers x datasets x models on real data.

Every cell (dataset, model, optimizer) searches its learning rate (a log range per
optimizer) and weight decay with the same 8 quasi-random points, choosing on a
validation split (10% of the training set) with synchronous successive halving (all 8
train 1 epoch, the best 4 a second, the best 2 to the end; ``--rungs none``: all 8 to
the end); the picked config of every cell is re-run
with fresh seeds and its test accuracy reported as mean +- std and a 95% confidence
interval, every seed counted (ok, diverged, failed), also with the final weights
quantized to LNS-8, LNS-4, INT8 and INT4 (per channel) inside each trial (weight-only
post-training quantization). Matched pairs (EG vs GD, EG vs sign-frozen GD, AdamEG vs
AdamGD, LNS-Madam vs Madam, EG+- vs GD) are compared seed by seed in pairs.md. The
design and the MLflow layout are sweeps/study.py's. ``--set quant.mode=qat --set
quant.bits=4`` runs the whole study under 4-bit QAT (``test_acc_q`` is then the quantized
model's accuracy); ``--set optim.bias_mode=all`` applies each optimizer to every
parameter, biases included, as the research code (seed 000) did.

    python sweeps/eg_vs_gd.py --smoke-test            # MNIST + MLP, tiny subset, minutes
    python sweeps/eg_vs_gd.py                         # everything, full data (2 cores)
    python sweeps/eg_vs_gd.py --rungs none            # no early stopping: every point to the end
    python sweeps/eg_vs_gd.py --datasets mnist --optimizers gd eg --models cnn
    ray submit cluster/gpu.yaml sweeps/eg_vs_gd.py -- --max-concurrent 16  # GPUs: auto
"""

from __future__ import annotations

import argparse
import itertools

from sweeps.cli import base_config, common_parser, main_guard, resume_run_id, tracking_uri
from sweeps.runner import mlflow_ui_command
from sweeps.study import Cell, SearchSpace, Study, report_from, run_study
from trainables.config import ConfigError

STUDY = "eg_vs_gd"
OPTIMIZERS = ("gd", "gd_sign", "eg", "egpm", "adam_gd", "adam_eg", "madam", "lns_madam")
# (a, b): compared seed by seed. gd_sign is the additive baseline that keeps signs like eg.
PAIRS = (("eg", "gd"), ("eg", "gd_sign"), ("gd_sign", "gd"), ("egpm", "gd"),
         ("adam_eg", "adam_gd"), ("lns_madam", "madam"))
DATASETS = ("mnist", "fashion_mnist")
MODELS = {"mlp": ["model.name=mlp", "model.widths=[256,128]"],
          # Channels-last: a LeNet step is ~1.6x faster on this CPU (max-pooling in the
          # default layout takes a third of it; bench/layout.py).
          "cnn": ["model.name=lenet", "model.channels=[16,32]", "model.hidden=[128]",
                  "train.channels_last=true"]}
# Learning-rate ranges (log-uniform). Multiplicative lrs are relative changes per step,
# additive ones absolute: the ranges differ by orders of magnitude. Calibrated by one
# epoch on 20k MNIST images (closing note of the optimizers issue); lns_madam needs
# lr * 2**frac_bits * g_bound >= 0.5 to move at all. egpm (offset 0.01) trained best at
# lr 3 and diverged at 5-7 (MLP, LeNet); gd_sign as gd (it survived gd's diverging lr 1).
LR_RANGE = {"gd": (0.01, 1.0), "gd_sign": (0.01, 1.0), "eg": (0.1, 10.0),
            "egpm": (0.05, 5.0), "adam_gd": (1e-4, 0.05), "adam_eg": (3e-3, 1.0),
            "madam": (3e-3, 1.0), "lns_madam": (0.02, 1.0)}
WEIGHT_DECAY_RANGE = (1e-6, 1e-3)
# Biases and norm parameters of the multiplicative optimizers step additively (they start
# at 0); their learning rate is fixed per optimizer rather than searched. gd_sign's biases
# take its weights' lr (unset), so that it differs from gd only by the frozen signs.
BIAS_LR = {"eg": 0.05, "adam_eg": 1e-3, "madam": 0.01, "lns_madam": 0.01}
# Plain updates (gd and eg take no momentum by default), so a pair differs only in the
# update's form; every trial rounds its final weights to two log formats.
# Test batches of 256: a LeNet evaluates ~2x faster than in batches of 1000 here
# (bench/layout.py); accuracies do not depend on it.
COMMON = ["optim.schedule=onecycle", "data.batch_size=128", "data.val_fraction=0.1",
          "data.test_batch_size=256",
          "train.threads=1", "evaluate.weight_rounding=[lns8,lns4,int8,int4]"]
ROUNDED = ("test_acc_lns8", "test_acc_lns4", "test_acc_int8", "test_acc_int4", "test_acc_q")
# LNS-Madam's weights live on the LNS-8 grid (8 bits, 3 fractional: weight rounding's
# lns8, aligned to each tensor's max): rounding them is exact (tests/test_eg_vs_gd.py).
NO_OP = {"lns_madam": {"test_acc_lns8": "= test_acc (on its LNS-8 grid)"}}
AXES = {"data.name": "--datasets", "model.name": "--models", "optim.name": "--optimizers"}
SMOKE = ["data.train_subset=2000", "data.test_subset=1000", "train.epochs=2"]


def space(optimizer: str, bias_mode: str = "split") -> SearchSpace:
    """lr and weight decay searched; the bias group's lr fixed (bias_mode=all: none)."""
    bias = optimizer in BIAS_LR and bias_mode == "split"
    return SearchSpace(
        ranges=(("optim.lr", *LR_RANGE[optimizer], True),
                ("optim.weight_decay", *WEIGHT_DECAY_RANGE, True)),
        constants=(("optim.bias_lr", BIAS_LR[optimizer]),) if bias else ())


def _no_op(key: tuple[str, ...], args: argparse.Namespace) -> dict[str, str]:
    """The rounding columns known without measuring: lns_madam at its default 8-bit grid."""
    changed = any(o.partition("=")[0].strip() in ("optim.lns_bits", "optim.lns_frac_bits")
                  for o in args.overrides)
    return {} if changed else NO_OP.get(key[-1], {})


def _rungs(text: str) -> tuple[int, ...] | str:
    if text in ("auto", "none"):
        return "auto" if text == "auto" else ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--rungs={text!r} is invalid: allowed auto, none or epochs like 1,2") from None


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
    parser.add_argument("--rungs", default="auto", type=_rungs, metavar="auto|none|E,E",
                        help="each cell's search: synchronous successive halving, the "
                             "epochs at which its points are ranked and the better half go "
                             "on (auto: 1,2 for 8 points over 3 epochs); none: every point "
                             "to its last epoch")
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
        base = base_config(args, defaults, SMOKE)
        cells.append(Cell((dataset, model, optimizer), base,
                          space(optimizer, base.optim.bias_mode)))
    for text in args.overrides:  # the cells' own axes come from their flags
        key = text.partition("=")[0].strip()
        if key in AXES:
            raise ConfigError(f"--set {key} is invalid here: the study's cells set it; "
                              f"allowed {AXES[key]}")
    return Study(
        name=STUDY, cells=tuple(cells), key_names=("dataset", "model", "optimizer"),
        num_samples=args.num_samples, seeds=args.seeds, seed=args.seed,
        extra_metrics=ROUNDED, pairs=PAIRS, notes=lambda key: _no_op(key, args),
        max_concurrent=args.max_concurrent, rungs=args.rungs,
        tracking_uri=tracking_uri(args), storage_path=args.storage_path, address=args.address,
        resume_run_id=resume_run_id(args, STUDY, "study"),
        auto_gpus=args.gpus_per_trial == "auto", max_failures=args.max_failures,
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
    if outcome.pairs_table:
        print(f"=== {STUDY}: matched pairs, test_acc difference seed by seed ===\n"
              f"{outcome.pairs_table}")
    print(f"MLflow experiment {STUDY!r}, study run {outcome.run_id}")
    print(f"See the results:  {mlflow_ui_command(tracking_uri(args))}")
    return 0


if __name__ == "__main__":
    main_guard(main)
