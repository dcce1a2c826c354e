"""Bit-width search: which number format, bit width and training (PTQ or QAT) gives the
most accurate model for its packed size?

Optuna proposes, per trial (define-by-run): ``quant.format`` (int: bits 2..8, symmetric
or affine, per tensor or per channel; lns: bits 2..8, 0..3 fractional exponent bits;
codebook: k = 2..64, PTQ only), ``quant.mode`` (ptq, qat) and QAT's learning rate; with
``--per-layer``, a bit width per layer instead of one (mixed precision, int or lns), and
the sweep's run gets which layers the Pareto front gave fewer bits (layer_bits.md). Every trial
trains (QAT through fake-quantized weights), quantizes, and reports the quantized model's
validation accuracy (``val_acc_q``) and packed bytes every epoch; the packed model is an
artifact of its MLflow run.

Two modes:
- ``--objective pareto`` (default): Optuna NSGA-II on (val_acc_q max, packed_bytes min),
  generations of num_samples / 4 trials; conditional parameters (bits of one format, k of
  another) are sampled at random by NSGA-II. ASHA cannot rank two objectives and nothing
  stops trials early: every trial runs its (short) epochs. The sweep's run holds the
  Pareto front (pareto.md/.table.csv, pareto.png, and as its description).
- ``--cost bitops|latency`` (pareto): a third objective to minimize, ``bitops`` (MACs x
  weight bits x input bits) or the latency measured inside each trial (its model as
  INT8 PT2E, batch 1, over a reference net timed alternately with it).
- ``--objective budget``: Optuna TPE + ASHA on ``budget_score`` = val_acc_q minus the
  relative overshoot of ``--byte-budget`` (default: 1/8 of the FP32 state_dict, i.e. what
  4-bit weights take).

    python sweeps/quant_bits.py --smoke-test
    python sweeps/quant_bits.py --num-samples 24 --epochs 2
    python sweeps/quant_bits.py --objective budget --byte-budget 30000
    python sweeps/quant_bits.py --per-layer --num-samples 24     # mixed precision
    python sweeps/quant_bits.py --per-layer --cost bitops        # accuracy, bytes, BOPs
    python sweeps/quant_bits.py --set data.name=cifar10_jpeg --set model.name=resnet20
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
from sweeps.runner import run_sweep
from sweeps.spec import Sweep
from sweeps.tracking import SweepTracker, rows_to_markdown
from trainables.config import ConfigError, TrialConfig
from trainables.plots import pyplot, save_figure

NAME = "quant_bits"
DEFAULTS = ["data.name=mnist", "model.name=lenet", "model.channels=[16,32]",
            "model.hidden=[128]", "optim.name=sgd", "optim.schedule=onecycle",
            "data.batch_size=128", "data.val_fraction=0.1", "quant.mode=ptq"]
SMOKE = ["data.train_subset=2000", "data.test_subset=1000", "train.epochs=1"]
QAT_LR = (0.01, 0.2)


@dataclass(frozen=True)
class BitSpace:
    """The define-by-run space (a class: Tune pickles the searcher, space included)."""

    formats: tuple[str, ...] = ("int", "lns", "codebook")
    modes: tuple[str, ...] = ("ptq", "qat")

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        fmt = trial.suggest_categorical("quant.format", list(self.formats))
        if fmt == "codebook":
            # PTQ only: QAT would refit every layer's k-means in every forward pass.
            trial.suggest_categorical("quant.k", [2, 4, 8, 16, 32, 64])
            return {"quant.mode": "ptq"}
        mode = trial.suggest_categorical("quant.mode", list(self.modes))
        if fmt == "int":
            trial.suggest_int("quant.bits", 2, 8)
            trial.suggest_categorical("quant.symmetric", [True, False])
            trial.suggest_categorical("quant.per_channel", [True, False])
        elif fmt == "lns":
            trial.suggest_int("quant.bits", 2, 8)
            trial.suggest_int("quant.lns_frac_bits", 0, 3)
            trial.suggest_categorical("quant.per_channel", [True, False])
        if mode == "qat":
            trial.suggest_float("optim.lr", *QAT_LR, log=True)
        return None


@dataclass(frozen=True)
class LayerBitSpace:
    """``--per-layer``: a bit width per quantized layer (2..8, mixed precision), the
    format (int or lns, the same for every layer), PTQ or QAT (and QAT's lr). Each
    layer's bits is Optuna's parameter ``space.bits.<layer>``; the config gets them as
    ``quant.layer_bits``."""

    layers: tuple[str, ...]
    formats: tuple[str, ...] = ("int", "lns")
    modes: tuple[str, ...] = ("ptq", "qat")

    def __call__(self, trial: Any) -> dict[str, Any]:
        trial.suggest_categorical("quant.format", list(self.formats))
        mode = trial.suggest_categorical("quant.mode", list(self.modes))
        bits = [trial.suggest_int(f"space.bits.{name}", 2, 8) for name in self.layers]
        trial.suggest_categorical("quant.per_channel", [True, False])  # int and lns
        if mode == "qat":
            trial.suggest_float("optim.lr", *QAT_LR, log=True)
        return {"quant.layer_bits": bits}


def _model(cfg: TrialConfig) -> torch.nn.Module:
    from trainables.models import model_for_trial

    return model_for_trial(cfg)


def fp32_bytes(cfg: TrialConfig, model: torch.nn.Module | None = None) -> int:
    """The FP32 state_dict size of the config's model on disk (the budget's reference)."""
    import quant

    with tempfile.TemporaryDirectory() as tmp:
        return quant.state_dict_bytes(model or _model(cfg), Path(tmp) / "fp32.pt")


def layer_bits_table(front: list[dict[str, Any]], configs: dict[str, dict[str, Any]],
                     layers: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per layer, the bits the Pareto front's trials gave it (mean, min, max), fewest
    first: which layers tolerate fewer bits."""
    bits = [TrialConfig.from_stored(configs[r["trial_id"]]).quant.layer_bits for r in front]
    rows = []
    for i, name in enumerate(layers):
        got = [b[i] for b in bits if len(b) == len(layers)]
        if got:
            rows.append({"layer": name, "mean_bits": sum(got) / len(got), "min_bits": min(got),
                         "max_bits": max(got), "front_trials": len(got)})
    return sorted(rows, key=lambda r: r["mean_bits"])


def pareto_front(rows: list[dict[str, Any]], acc: str = "val_acc_q",
                 size: str = "packed_bytes", cost: str | None = None
                 ) -> list[dict[str, Any]]:
    """Finished rows no other row beats on accuracy (higher), size (lower) and, when
    given, ``cost`` (lower) at once, by size ascending. Rows without a finite value of
    each (a trial whose INT8 lowering failed has no latency) are left out."""
    lower = (size,) if cost is None else (size, cost)
    done = [r for r in rows if r.get("status") == "FINISHED" and
            isinstance(r.get(acc), float) and math.isfinite(r[acc]) and
            all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in lower)]

    def beats(o: dict[str, Any], r: dict[str, Any]) -> bool:
        no_worse = o[acc] >= r[acc] and all(o[k] <= r[k] for k in lower)
        return no_worse and (o[acc] > r[acc] or any(o[k] < r[k] for k in lower))

    front = [r for r in done if not any(beats(o, r) for o in done)]
    return sorted(front, key=lambda r: (r[size], -r[acc]))


# --cost: a third objective. bitops: MACs x weight bits x input bits (deterministic);
# latency: the trial's model deployed as INT8 (PT2E) and timed at batch 1 (its threads),
# alternating with a fixed reference net: the ratio (deploy_rel_int8_pt2e) is comparable
# across trials on a shared machine, milliseconds are not (deploy/measure.py).
COSTS = {"bitops": ("bitops", []),
         "latency": ("deploy_rel_int8_pt2e",
                     ["export.formats=[int8_pt2e]", "export.latency=true"])}


def plot_pareto(rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Path,
                fp32: int) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for fmt, colour in (("int", "tab:blue"), ("lns", "tab:green"), ("codebook", "tab:red")):
        for mode, marker in (("ptq", "o"), ("qat", "^")):
            chosen = [r for r in rows if r.get("quant.format") == fmt and
                      r.get("quant.mode") == mode and "packed_bytes" in r and
                      "val_acc_q" in r]
            ax.scatter([r["packed_bytes"] for r in chosen], [r["val_acc_q"] for r in chosen],
                       c=colour, marker=marker, alpha=0.7, label=f"{fmt} {mode}")
    ax.plot([r["packed_bytes"] for r in front], [r["val_acc_q"] for r in front], "k--",
            label="Pareto front")
    ax.axvline(fp32, color="grey", lw=0.8)
    ax.text(fp32, ax.get_ylim()[0], " FP32", color="grey", va="bottom")
    ax.set_xscale("log")
    ax.set_xlabel("packed bytes")
    ax.set_ylabel("validation accuracy, quantized")
    return save_figure(fig, ax, path)


def describe(config: dict[str, Any]) -> str:
    """A trial's quantization in a few words: ``qat int4-sym-pc``, ``ptq kmeans16``, with
    ``lr`` for QAT (only the fields its format reads)."""
    q = TrialConfig.from_stored(config).quant
    text = f"{q.mode} {q.weight_format().name}"
    if q.layer_bits:  # the format with its bits per layer instead of one width
        kind = q.format + ("-pc" if q.per_channel else "")
        text = f"{q.mode} {kind} bits={'/'.join(map(str, q.layer_bits))}"
    return text + (f" lr={config['optim.lr']:.3g}" if q.mode == "qat" else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__.splitlines()[0], num_samples=16, max_concurrent=2, epochs=2)
    parser.add_argument("--objective", choices=("pareto", "budget"), default="pareto")
    parser.add_argument("--byte-budget", type=int, default=0,
                        help="packed bytes for --objective budget (default: FP32 size / 8)")
    parser.add_argument("--formats", nargs="+", default=None, choices=BitSpace.formats,
                        help="default: int lns codebook (--per-layer: int lns)")
    parser.add_argument("--cost", choices=("none", *COSTS), default="none",
                        help="a third objective to minimize (pareto): bitops, or latency "
                             "measured inside each trial (INT8 PT2E, relative to a "
                             "reference net); on CPU every <= 8-bit format runs the same "
                             "INT8 kernels, so latency separates trials less than bitops")
    parser.add_argument("--per-layer", action="store_true",
                        help="search each layer's bits (mixed precision; int/lns formats)")
    args = parser.parse_args(argv)
    if args.formats is None:
        args.formats = list(LayerBitSpace.formats if args.per_layer else BitSpace.formats)
    if args.per_layer and "codebook" in args.formats:
        raise ConfigError(f"--formats {' '.join(args.formats)} is invalid with --per-layer: "
                          "allowed int and/or lns (bit widths per layer)")
    if args.smoke_test:
        args.num_samples = min(args.num_samples, 4)
    if args.cost != "none" and args.objective != "pareto":
        raise ConfigError(f"--cost={args.cost} is invalid with --objective "
                          f"{args.objective}: allowed with --objective pareto")
    if args.byte_budget < 0:
        raise ConfigError(f"--byte-budget={args.byte_budget} is invalid: allowed >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = base_config(args, DEFAULTS, SMOKE)
    from trainables.stages.quant import quantizable_layers

    model = _model(base)
    fp32 = fp32_bytes(base, model)
    layers: tuple[str, ...] = tuple(quantizable_layers(model))
    if base.quant.layer_bits and len(base.quant.layer_bits) != len(layers):
        raise ConfigError(f"quant.layer_bits={list(base.quant.layer_bits)} is invalid for "
                          f"this model: allowed {len(layers)} bit widths, one per layer "
                          f"({', '.join(layers)})")
    if args.per_layer:
        space = LayerBitSpace(layers=layers, formats=tuple(args.formats))
    else:
        space = BitSpace(formats=tuple(args.formats))
    resume = resume_run_id(args, NAME, "search")
    if args.objective == "budget":
        budget = args.byte_budget or fp32 // 8
        base = base.replace({"quant.byte_budget": budget})
        sweep = Sweep(base=base, space=space, num_samples=args.num_samples,
                      metric="budget_score", mode="max", resume_run_id=resume,
                      **sweep_options(args, NAME))
    else:
        cost, overrides = COSTS.get(args.cost, (None, []))
        base = base.with_overrides(overrides) if overrides else base
        objectives = (("val_acc_q", "max"), ("packed_bytes", "min"))
        sweep = Sweep(base=base, space=space, num_samples=args.num_samples,
                      metric="val_acc_q", mode="max",
                      objectives=objectives + (((cost, "min"),) if cost else ()),
                      resume_run_id=resume, **sweep_options(args, NAME))
    outcome = run_sweep(sweep)
    print_summary(outcome)
    cost = COSTS[args.cost][0] if args.cost != "none" else None
    front = pareto_front(outcome.rows, cost=cost)
    if front:
        tracker = SweepTracker(outcome.tracking_uri, NAME)
        configs = {r.metrics.get("trial_id"): r.config for r in outcome.results if r.metrics}
        table = [{"setting": describe(configs[r["trial_id"]]), "val_acc_q": r["val_acc_q"],
                  "test_acc_q": r.get("test_acc_q", ""), "packed_bytes": r["packed_bytes"],
                  "compression_ratio": fp32 / r["packed_bytes"],
                  **({cost: r[cost]} if cost else {}),
                  "mlflow_run_id": r["mlflow_run_id"]} for r in front]
        tracker.log_table(outcome.parent_run_id, table, "pareto",
                          describe=f"Pareto front: val_acc_q against packed bytes"
                                   f"{' and ' + cost if cost else ''} (FP32 {fp32} bytes; "
                                   "the plot shows accuracy and bytes only)")
        with tempfile.TemporaryDirectory() as tmp:
            tracker.log_artifact(outcome.parent_run_id, plot_pareto(
                outcome.rows, front, Path(tmp) / "pareto.png", fp32))
        print(f"\n=== Pareto front (val_acc_q vs packed bytes{' vs ' + cost if cost else ''}"
              f"; FP32 {fp32} bytes) ===")
        print(rows_to_markdown(table))
        if args.per_layer:
            per_layer = layer_bits_table(front, configs, layers)
            tracker.log_table(outcome.parent_run_id, per_layer, "layer_bits",
                              describe="Bits per layer on the Pareto front, fewest first")
            print("\n=== Bits per layer on the Pareto front (fewest first) ===")
            print(rows_to_markdown(per_layer))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    main_guard(main)
