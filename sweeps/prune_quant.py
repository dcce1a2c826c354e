"""Pruning schedule x bit width: which sparsity schedule, number format and training give
the most accurate model for its packed size? (The card's "sparsity schedule" search.)

Optuna proposes, per trial (define-by-run): the schedule (``prune.schedule`` polynomial
or oneshot, ``prune.granularity`` element or channel, ``prune.initial_sparsity`` and
``final_sparsity``, ``prune.start`` and its length to ``prune.end`` as fractions of
training, ``prune.frequency`` in steps), the
format (int or lns, bits 2..8, per channel or not), PTQ or QAT, and the learning rate.
Every trial prunes as it trains, quantizes, and reports the quantized model's validation
accuracy (``val_acc_q``), its packed bytes (pruned weights stored sparse) and
``sparsity`` every epoch. NSGA-II ranks (val_acc_q max, packed_bytes min), every trial to
its last epoch; the sweep's run holds the Pareto front (pareto.md, .table.csv, .png).

- ``--schedule-only``: search only the schedule (and lr) for the format the config fixes
  (default INT8 per-channel PTQ; e.g. ``--set quant.bits=4 --set quant.mode=qat``).
- ``--cost bitops|latency``: a third objective to minimize (as in sweeps/quant_bits.py):
  bit operations, or the trial's model deployed as INT8 (PT2E) and timed inside the
  trial relative to a reference net. Cutting channels (``prune.granularity=channel``)
  is what makes either fall; element sparsity runs dense kernels at the same speed.
- ``--preset seed004``: seed 004's recipe as explicit points: ResNet-20 on the CIFAR-10
  copy, polynomial sparsity to 0.6 and to 0.7, then INT8 (PTQ), 2 data-parallel workers.

    python sweeps/prune_quant.py --smoke-test
    python sweeps/prune_quant.py --num-samples 24 --epochs 3
    python sweeps/prune_quant.py --schedule-only --set quant.bits=4
    python sweeps/prune_quant.py --cost latency --num-samples 24    # accuracy, bytes, speed
    python sweeps/prune_quant.py --preset seed004 --epochs 30
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import compress
from sweeps import quant_bits
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
from trainables.config import ConfigError, TrialConfig
from trainables.plots import pyplot, save_figure

NAME = "prune_quant"
# quant_bits' model, data and PTQ default, pruned, INT8 per-channel unless searched.
DEFAULTS = [*quant_bits.DEFAULTS, "prune.schedule=polynomial", "quant.bits=8",
            "quant.per_channel=true"]
SMOKE = quant_bits.SMOKE
SEED004 = ["data.name=cifar10_jpeg", "model.name=resnet20", "optim.lr=0.1",
           "data.val_fraction=0.1", "prune.schedule=polynomial", "prune.start=0.0",
           "prune.end=0.8", "prune.frequency=100", "quant.mode=ptq", "quant.bits=8",
           "quant.per_channel=true"]
LR = (0.01, 0.3)
CHANNEL_MIN, CHANNEL_MAX = 0.3, 0.75  # whole-channel sparsity searched


def channel_limit(base: TrialConfig) -> float:
    """The largest searched channel sparsity that keeps a channel in every layer of the
    base config's model (CHANNEL_MAX, or less for narrow layers: 2 channels, 0.5)."""
    from compress import channels
    from trainables.models import data_shape_of, example_input, model_for_trial

    shape = data_shape_of(base)
    model = model_for_trial(base, shape)
    layers = compress.prunable_layers(model, base.prune.exclude_first_last)
    groups, _ = channels.channel_groups(model, example_input(shape), layers)
    limit = CHANNEL_MAX
    for g in groups:  # largest s on a 0.01 grid with round(s x n) < n
        while limit > 0 and channels.channels_to_prune(g, limit) >= g.channels:
            limit = round(limit - 0.01, 2)
    return limit if groups else 0.0


@dataclass(frozen=True)
class ScheduleSpace:
    """The define-by-run space (a class: Tune pickles the searcher, space included). The
    schedule's end is built from ``space.length`` (the fraction of what follows its start)
    so that end > start always holds."""

    search_format: bool = True
    # The most channel sparsity that leaves every layer a channel (channel_limit); below
    # CHANNEL_MIN, whole channels are not searched.
    channel_max: float = CHANNEL_MAX

    def __call__(self, trial: Any) -> dict[str, Any]:
        schedule = trial.suggest_categorical("prune.schedule", ["polynomial", "oneshot"])
        built = {}
        granularities = ["element", "channel"] if self.channel_max >= CHANNEL_MIN \
            else ["element"]
        if trial.suggest_categorical("prune.granularity", granularities) == "channel":
            # Whole channels, ranked within each layer: a narrower range.
            built["prune.final_sparsity"] = trial.suggest_float(
                "space.channel_sparsity", CHANNEL_MIN, self.channel_max)
            built["prune.scope"] = "layer"
        else:
            trial.suggest_float("prune.final_sparsity", 0.3, 0.95)
            trial.suggest_categorical("prune.scope", ["layer", "global"])
        start = trial.suggest_float("prune.start", 0.0, 0.5)
        if schedule == "polynomial":
            trial.suggest_float("prune.initial_sparsity", 0.0, 0.3)
            length = trial.suggest_float("space.length", 0.2, 1.0)
            built["prune.end"] = round(start + length * (1.0 - start), 6)
            trial.suggest_categorical("prune.frequency", [10, 50, 100, 200])
        trial.suggest_float("optim.lr", *LR, log=True)
        if self.search_format:
            trial.suggest_categorical("quant.format", ["int", "lns"])
            trial.suggest_int("quant.bits", 2, 8)
            trial.suggest_categorical("quant.per_channel", [True, False])
            trial.suggest_categorical("quant.mode", ["ptq", "qat"])
        return built


def describe(config: dict[str, Any]) -> str:
    """``polynomial 0.1->0.8 [0.2, 0.9] global + ptq int4-sym-pc lr=0.05``."""
    cfg = TrialConfig.from_stored(config)
    p, q = cfg.prune, cfg.quant
    window = f"[{p.start:.2f}, {p.end:.2f}]" if p.schedule == "polynomial" else \
        f"at {p.start:.2f}"
    start = f"{p.initial_sparsity:.2f}->" if p.schedule == "polynomial" else ""
    scope = "channels" if p.granularity == "channel" else p.scope
    return (f"{p.schedule} {start}{p.final_sparsity:.2f} {window} {scope} + {q.mode} "
            f"{q.weight_format().name} lr={cfg.optim.lr:.3g}")


def plot_front(rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Path,
               fp32: int) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    done = [r for r in rows if "packed_bytes" in r and "val_acc_q" in r]
    points = ax.scatter([r["packed_bytes"] for r in done], [r["val_acc_q"] for r in done],
                        c=[r.get("sparsity", 0.0) for r in done], cmap="viridis", alpha=0.8)
    fig.colorbar(points, ax=ax, label="sparsity")
    ax.plot([r["packed_bytes"] for r in front], [r["val_acc_q"] for r in front], "k--",
            label="Pareto front")
    ax.axvline(fp32, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("packed bytes")
    ax.set_ylabel("validation accuracy, pruned + quantized")
    return save_figure(fig, ax, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__.splitlines()[0], num_samples=16, max_concurrent=2, epochs=2)
    parser.add_argument("--schedule-only", action="store_true",
                        help="search the sparsity schedule (and lr) for the config's format")
    parser.add_argument("--preset", choices=("seed004",), default=None,
                        help="seed004: ResNet-20, CIFAR-10 copy, polynomial to 0.6 and 0.7, "
                             "INT8, 2 workers (explicit points, no search)")
    parser.add_argument("--cost", choices=("none", *quant_bits.COSTS), default="none",
                        help="a third objective to minimize: bitops, or latency measured "
                             "inside each trial (INT8 PT2E, relative to a reference net)")
    args = parser.parse_args(argv)
    if args.cost != "none" and args.preset:
        raise ConfigError(f"--cost={args.cost} is invalid with --preset {args.preset}: "
                          "allowed with the search (no --preset)")
    if args.smoke_test:
        args.num_samples = min(args.num_samples, 4)
    if args.preset == "seed004" and args.num_workers == 1:
        args.num_workers = 2  # seed 004 trained data-parallel
    return args


def _sweep(args: argparse.Namespace, base: TrialConfig) -> Sweep:
    common = dict(base=base, **sweep_options(args, NAME))
    if args.preset == "seed004":
        points = tuple({"prune.final_sparsity": s} for s in (0.6, 0.7))
        return Sweep(points=points, metric="val_acc_q", mode="max",
                     resume_run_id=resume_run_id(args, NAME, "points"), **common)
    cost, overrides = quant_bits.COSTS.get(args.cost, (None, []))
    if overrides:
        common["base"] = base.with_overrides(overrides)
    objectives = (("val_acc_q", "max"), ("packed_bytes", "min"))
    return Sweep(space=ScheduleSpace(search_format=not args.schedule_only,
                                     channel_max=channel_limit(base)),
                 num_samples=args.num_samples, metric="val_acc_q", mode="max",
                 objectives=objectives + (((cost, "min"),) if cost else ()),
                 resume_run_id=resume_run_id(args, NAME, "search"), **common)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    defaults = DEFAULTS + (SEED004 if args.preset == "seed004" else [])
    base = base_config(args, defaults, SMOKE)
    fp32 = fp32_bytes(base)
    outcome = run_sweep(_sweep(args, base))
    print_summary(outcome)
    cost = quant_bits.COSTS[args.cost][0] if args.cost != "none" else None
    front = pareto_front(outcome.rows, cost=cost)
    if not front:
        return 0
    tracker = SweepTracker(outcome.tracking_uri, NAME)
    configs = {r.metrics.get("trial_id"): r.config for r in outcome.results if r.metrics}
    sparsity = {r.metrics.get("trial_id"): r.metrics.get("sparsity")
                for r in outcome.results if r.metrics}
    table = [{"setting": describe(configs[r["trial_id"]]), "val_acc_q": r["val_acc_q"],
              "test_acc_q": r.get("test_acc_q", ""),
              "sparsity": sparsity.get(r["trial_id"], ""), "packed_bytes": r["packed_bytes"],
              "compression_ratio": fp32 / r["packed_bytes"],
              **({cost: r[cost]} if cost else {}),
              "mlflow_run_id": r["mlflow_run_id"]} for r in front]
    tracker.log_table(outcome.parent_run_id, table, "pareto",
                      describe=f"Pareto front: pruned + quantized val_acc_q against packed "
                               f"bytes{' and ' + cost if cost else ''} (FP32 {fp32} bytes; the "
                               "plot shows accuracy and bytes only)")
    rows = [{**r, "sparsity": sparsity.get(r["trial_id"], 0.0)} for r in outcome.rows]
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(outcome.parent_run_id,
                             plot_front(rows, front, Path(tmp) / "pareto.png", fp32))
    print(f"\n=== Pareto front (val_acc_q vs packed bytes{' vs ' + cost if cost else ''}; "
          f"FP32 {fp32} bytes) ===")
    print(rows_to_markdown(table))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    main_guard(main)
