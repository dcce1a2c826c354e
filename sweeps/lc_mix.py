"""Which compression on which layer type: the LC algorithm over per-layer-type mixes
(seed 003: LeNet-5 on MNIST).

Every trial trains the reference model (``train.epochs - lc.steps x lc.epochs_per_step``
epochs; with ``--set train.init_from=...`` and ``--epochs`` = ``lc.steps x
lc.epochs_per_step``, none: LC starts from that model), then runs LC: L steps pulling the
weights towards their compressed form, C steps compressing them (:mod:`compress.lc`).
Optuna proposes per trial (define-by-run), for the convolutions and for the linear layers
each, the compression (``none``, ``codebook``, ``prune``, ``lowrank``, ``int``; the
linear layers, nearly all of LeNet-5's weights, always get one) and its parameter: k in
2..16, the kept fraction 0.005..0.3, LC's rank-selection alpha 1e-9..1e-5, bits 2..8.
Every trial reports the compressed model's validation accuracy (``val_acc_lc``) each
epoch, and at the end its test accuracy (``test_acc_lc``) and packed bytes. NSGA-II ranks
(val_acc_lc max, packed_bytes min); the study's run holds the Pareto front
(pareto.md / .table.csv / .png: test error against compression ratio) and every
trial's compression, test error and ratio (compressions.md / .table.csv).

- ``--preset seed003``: seed 003's table as explicit points: each pure compression on
  every layer at two strengths, then seed 003's mixes by layer type (linear k=2 + conv
  pruned; linear low-rank + conv pruned).

    python sweeps/lc_mix.py --smoke-test
    python sweeps/lc_mix.py --num-samples 16       # 6 reference epochs + 12 L steps each
    python sweeps/lc_mix.py --num-samples 8 --epochs 10 --set lc.steps=6 \
        --set data.train_subset=20000              # a quicker look
    python sweeps/lc_mix.py --preset seed003
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sweeps.cli import (
    base_config,
    common_parser,
    main_guard,
    print_summary,
    resume_run_id,
    sweep_options,
)
from sweeps.quant_bits import fp32_bytes, pareto_front
from sweeps.runner import run_sweep
from sweeps.spec import Sweep
from sweeps.tracking import SweepTracker, rows_to_markdown
from trainables.config import TrialConfig
from trainables.plots import pyplot, save_figure

NAME = "lc_mix"
# LeNet-5 at the LC toolkit's widths (conv 20, conv 50, fc 500, fc 10; qsweep's convs are
# padded, so fc1 is 2450x500 and fc layers hold 97% of the weights); SGD with Nesterov
# momentum; each L step's lr one-cycle afresh from lr x 0.98^k; mu from 1e-3 x 1.8^k to
# 0.64 (bench/lc_mnist.py's LeNet-5 schedule: w meets Delta(theta) by the last step).
DEFAULTS = ["data.name=mnist", "model.name=lenet", "model.channels=[20,50]",
            "model.hidden=[500]", "model.kernel_size=5", "optim.name=sgd", "optim.lr=0.05",
            "optim.schedule=onecycle", "data.batch_size=128", "data.val_fraction=0.1",
            "train.epochs=18", "lc.steps=12", "lc.epochs_per_step=1", "lc.mu0=1e-3",
            "lc.growth=1.8", "lc.lr_decay=0.98", "lc.linear=codebook:2"]
SMOKE = ["data.train_subset=2000", "data.test_subset=1000", "train.epochs=2", "lc.steps=1"]
KINDS = ("none", "codebook", "prune", "lowrank", "int")
# seed 003's table: each compression alone on every layer, two strengths, then the mixes.
SEED003 = {
    "codebook k=2": {"lc.conv": "codebook:2", "lc.linear": "codebook:2"},
    "codebook k=4": {"lc.conv": "codebook:4", "lc.linear": "codebook:4"},
    "pruned to 10%": {"lc.conv": "prune:keep=0.1", "lc.linear": "prune:keep=0.1"},
    "pruned to 5%": {"lc.conv": "prune:keep=0.05", "lc.linear": "prune:keep=0.05"},
    "low-rank alpha=1e-7": {"lc.conv": "none", "lc.linear": "lowrank:alpha=1e-7"},
    "low-rank alpha=1e-6": {"lc.conv": "none", "lc.linear": "lowrank:alpha=1e-6"},
    "linear k=2 + conv pruned to 10%": {"lc.conv": "prune:keep=0.1",
                                        "lc.linear": "codebook:2"},
    "linear low-rank + conv pruned to 10%": {"lc.conv": "prune:keep=0.1",
                                             "lc.linear": "lowrank:alpha=1e-6"},
}


def has_conv(base: TrialConfig) -> bool:
    from trainables.models import data_shape_of, model_for_trial

    model = model_for_trial(base, data_shape_of(base))
    return any(type(m) is torch.nn.Conv2d for m in model.modules())


@dataclass(frozen=True)
class MixSpace:
    """The define-by-run space (a class: Tune pickles the searcher, space included). Each
    group's kind is ``space.<group>``, its parameter ``space.<group>_<field>``; the config
    gets the compression text (``lc.conv=prune:keep=0.05``)."""

    conv: bool = True  # the model has convolutions (an MLP has none)

    def __call__(self, trial: Any) -> dict[str, Any]:
        built = {"lc.conv": self._group(trial, "conv", KINDS) if self.conv else "none"}
        built["lc.linear"] = self._group(trial, "linear", KINDS[1:])
        return built

    @staticmethod
    def _group(trial: Any, group: str, kinds: tuple[str, ...]) -> str:
        kind = trial.suggest_categorical(f"space.{group}", list(kinds))
        if kind == "codebook":
            return f"codebook:k={trial.suggest_int(f'space.{group}_k', 2, 16, log=True)}"
        if kind == "prune":
            keep = trial.suggest_float(f"space.{group}_keep", 0.005, 0.3, log=True)
            return f"prune:keep={keep:.4g}"
        if kind == "lowrank":
            alpha = trial.suggest_float(f"space.{group}_alpha", 1e-9, 1e-5, log=True)
            return f"lowrank:alpha={alpha:.3g}"
        if kind == "int":
            return f"int:bits={trial.suggest_int(f'space.{group}_bits', 2, 8)}"
        return "none"


def describe(config: dict[str, Any]) -> str:
    """``conv prune:keep=0.1, linear codebook:k=2 (6 LC steps)``."""
    lc = TrialConfig.from_stored(config).lc
    layers = f", {lc.layers}" if lc.layers else ""
    return f"conv {lc.conv}, linear {lc.linear}{layers} ({lc.steps} LC steps)"


def plot_front(rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Path,
               fp32: int) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    done = [r for r in rows if "packed_bytes" in r and "test_acc_lc" in r]
    for kind, colour in zip(KINDS[1:], ("tab:red", "tab:blue", "tab:green", "tab:purple"),
                            strict=True):
        chosen = [r for r in done if str(r.get("lc.linear", "")).startswith(kind)]
        ax.scatter([fp32 / r["packed_bytes"] for r in chosen],
                   [100 * (1 - r["test_acc_lc"]) for r in chosen], c=colour, alpha=0.8,
                   label=f"linear {kind}")
    ax.plot([fp32 / r["packed_bytes"] for r in front],
            [100 * (1 - r["test_acc_lc"]) for r in front], "k--", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (FP32 bytes / packed bytes)")
    ax.set_ylabel("test error % of the compressed model")
    return save_figure(fig, ax, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__.splitlines()[0], num_samples=16, max_concurrent=2,
                           epochs=None)
    parser.add_argument("--preset", choices=("seed003",), default=None,
                        help="seed003: each pure compression at two strengths, then seed "
                             "003's per-layer-type mixes (explicit points, no search)")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.num_samples = min(args.num_samples, 4)
    return args


def _sweep(args: argparse.Namespace, base: TrialConfig) -> Sweep:
    common = dict(base=base, **sweep_options(args, NAME))
    if args.preset == "seed003":
        return Sweep(points=tuple(SEED003.values()), metric="val_acc_lc", mode="max",
                     resume_run_id=resume_run_id(args, NAME, "points"), **common)
    return Sweep(space=MixSpace(conv=has_conv(base)), num_samples=args.num_samples,
                 metric="val_acc_lc", mode="max",
                 objectives=(("val_acc_lc", "max"), ("packed_bytes", "min")),
                 resume_run_id=resume_run_id(args, NAME, "search"), **common)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = base_config(args, DEFAULTS, SMOKE)
    fp32 = fp32_bytes(base)
    outcome = run_sweep(_sweep(args, base))
    print_summary(outcome)
    configs = {r.metrics.get("trial_id"): r.config for r in outcome.results if r.metrics}
    finals = {r.metrics.get("trial_id"): r.metrics for r in outcome.results if r.metrics}
    rows = [{**r, "lc.linear": configs.get(r.get("trial_id"), {}).get("lc.linear", ""),
             "test_acc_lc": finals.get(r.get("trial_id"), {}).get("test_acc_lc", math.nan)}
            for r in outcome.rows]
    front = pareto_front(rows, acc="val_acc_lc")
    if not front:
        return 0
    tracker = SweepTracker(outcome.tracking_uri, NAME)

    def line(r: dict[str, Any]) -> dict[str, Any]:
        return {"setting": describe(configs[r["trial_id"]]), "val_acc_lc": r["val_acc_lc"],
                "test_error_pct": 100 * (1 - r["test_acc_lc"]),
                "packed_bytes": r["packed_bytes"], "compression_ratio": fp32 / r["packed_bytes"],
                "mlflow_run_id": r["mlflow_run_id"]}

    table = [line(r) for r in front]
    tracker.log_table(outcome.parent_run_id, table, "pareto",
                      describe=f"Pareto front: LC-compressed val_acc_lc against packed bytes "
                               f"(FP32 {fp32} bytes)")
    everything = sorted((line(r) for r in rows if r.get("trial_id") in configs and
                         "packed_bytes" in r and "val_acc_lc" in r),
                        key=lambda r: -r["compression_ratio"])
    tracker.log_table(outcome.parent_run_id, everything, "compressions",
                      describe="every finished trial's compression, by compression ratio")
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(outcome.parent_run_id,
                             plot_front(rows, front, Path(tmp) / "pareto.png", fp32))
    print(f"\n=== every trial (FP32 {fp32} bytes) ===")
    print(rows_to_markdown(everything))
    print("\n=== Pareto front (val_acc_lc vs packed bytes) ===")
    print(rows_to_markdown(table))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    main_guard(main)
