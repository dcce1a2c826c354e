"""LC against train-then-compress on real MNIST: seed 003's rows (LeNet-300-100 and LeNet-5,
each pure compression and seed 003's mixes per layer type).

One reference model per architecture is trained first (qsweep's loop, SGD, one-cycle lr).
Then each row compresses that same reference two ways, to the same compression:

- **direct** (train, then compress: PTQ to a codebook / one-shot magnitude pruning /
  truncated SVD): the first C step alone, no retraining;
- **LC**: ``--steps`` L steps of ``--epochs-per-step`` epochs from the reference
  (``train.init_from``), ``mu_k = mu0 growth^k``, each followed by a C step.

A low-rank row with ``alpha`` lets LC pick each layer's rank; its direct row truncates the
reference's SVD to the ranks LC picked (the same ratio). Test error is of the model the
packed file holds (it reloads and scores the same); compression = FP32 state_dict bytes
/ packed bytes, both on disk.

    QSWEEP_DATA=../shared/data python bench/lc_mnist.py --models lenet300
    QSWEEP_DATA=../shared/data python bench/lc_mnist.py --models lenet5 --steps 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _util

MODELS = {"lenet300": ["model.name=mlp", "model.widths=[300,100]", "data.name=mnist"],
          # The LC toolkit's LeNet-5 widths (conv 20, conv 50, fc 500, fc 10), but qsweep's
          # LeNet pads its 5x5 convs ("same"): fc1 reads 50x7x7, 2450x500 weights, so the
          # net holds 1.26M parameters, not Caffe's 431k.
          "lenet5": ["model.name=lenet", "model.channels=[20,50]", "model.hidden=[500]",
                     "model.kernel_size=5", "data.name=mnist"]}
REFERENCE = ["optim.name=sgd", "optim.lr=0.1", "optim.schedule=onecycle",
             "data.batch_size=128"]
# LC's L steps: SGD with Nesterov momentum, constant lr within a step decaying per step
# (the LC toolkit's recipe: lr 0.98^k), the penalty growing from mu0.
LC_RECIPE = ["optim.name=sgd", "optim.schedule=constant", "lc.lr_decay=0.98"]
ROWS = {
    "lenet300": {
        "codebook k=2": ["lc.linear=codebook:2"],
        "pruned to 5%": ["lc.linear=prune:keep=0.05"],
        "low-rank alpha=1e-6": ["lc.linear=lowrank:alpha=1e-6"],
        "low-rank alpha=1e-7": ["lc.linear=lowrank:alpha=1e-7"],
        "low-rank alpha=1e-8": ["lc.linear=lowrank:alpha=1e-8"],
    },
    "lenet5": {
        "codebook k=2": ["lc.linear=codebook:2", "lc.conv=codebook:2"],
        "pruned to 5%": ["lc.linear=prune:keep=0.05", "lc.conv=prune:keep=0.05"],
        "low-rank alpha=1e-6": ["lc.linear=lowrank:alpha=1e-6"],
        "linear k=2 + conv pruned 10%": ["lc.linear=codebook:2", "lc.conv=prune:keep=0.1"],
        "linear low-rank + conv pruned 10%": ["lc.linear=lowrank:alpha=1e-6",
                                              "lc.conv=prune:keep=0.1"],
    },
}


def train_reference(base, folder: Path, epochs: int) -> dict:
    from trainables import LocalSession, run_trial

    cfg = base.with_overrides([*REFERENCE, f"train.epochs={epochs}"])
    return run_trial(cfg, LocalSession(checkpoint_dir=folder))[-1]


def direct(cfg, shape, reference: Path, ranks: dict[str, int], mu: float) -> dict:
    """The reference compressed once (the first C step), packed and scored."""
    import torch

    import quant
    from compress.lc import LC
    from trainables.data import load_splits
    from trainables.initial_weights import load_initial_weights
    from trainables.models import model_for_trial
    from trainables.stages.lc import encode_compressed_, lc_tasks

    if ranks:  # the ranks LC chose, not its alpha rule at another mu
        layers = "; ".join(f"{n}=lowrank:rank={r}" if r else f"{n}=none"
                           for n, r in ranks.items())
        cfg = cfg.with_overrides([f"lc.layers={layers}"])
    model = model_for_trial(cfg, shape)
    load_initial_weights(model, str(reference))
    lc = LC(lc_tasks(cfg, model), mu, 2.0)
    lc.c_step(model, -1)
    model = encode_compressed_(model, lc).eval()
    splits = load_splits(cfg.data, seed=0)
    correct = total = 0
    with torch.no_grad():
        for x, y in splits.loader("test", 1000, torch.device("cpu"), seed=0):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = quant.save_packed(model, Path(tmp) / "model.qsw")
    return {"acc": correct / total, "bytes": nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=("lenet300",))
    parser.add_argument("--rows", nargs="+", help="default: every row of each model")
    parser.add_argument("--reference-epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=15, help="LC steps")
    parser.add_argument("--epochs-per-step", type=int, default=1)
    parser.add_argument("--mu0", type=float, default=9e-5)
    parser.add_argument("--growth", type=float, default=1.5)
    parser.add_argument("--lr", type=float, default=0.05, help="L steps' first lr")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = _util.header("lc_mnist")

    import quant
    from trainables import LocalSession, TrialConfig, run_trial
    from trainables.models import data_shape_of, model_for_trial

    results = {}
    for name in args.models:
        base = TrialConfig().with_overrides([*MODELS[name], f"train.threads={args.threads}",
                                             "data.batch_size=128"])
        shape = data_shape_of(base)
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = quant.state_dict_bytes(model_for_trial(base, shape), f"{tmp}/fp32.pt")
            start = time.perf_counter()
            ref = train_reference(base, Path(tmp) / "ref", args.reference_epochs)
            _util.row(f"{name} reference", error_pct=100 * (1 - ref["test_acc"]),
                      bytes=fp32, seconds=time.perf_counter() - start)
            results[f"{name} reference"] = {"test_error_pct": 100 * (1 - ref["test_acc"]),
                                            "packed_bytes": fp32, "compression": 1.0}
            for row, overrides in ROWS[name].items():
                if args.rows and row not in args.rows:
                    continue
                lc_cfg = base.with_overrides([
                    *LC_RECIPE, *overrides, f"optim.lr={args.lr}",
                    f"train.init_from={Path(tmp) / 'ref'}",
                    f"train.epochs={args.steps * args.epochs_per_step}",
                    f"lc.steps={args.steps}", f"lc.epochs_per_step={args.epochs_per_step}",
                    f"lc.mu0={args.mu0}", f"lc.growth={args.growth}",
                    "train.checkpoint=false"])
                start = time.perf_counter()
                out = Path(tmp) / row.replace(" ", "_")
                final = run_trial(lc_cfg, LocalSession(checkpoint_dir=out))[-1]
                layers = json.loads((out / "artifacts" / "lc.json").read_text())["layers"]
                ranks = {n: v["rank"] for n, v in layers.items() if "rank" in v}
                seconds = time.perf_counter() - start
                dc = direct(lc_cfg, shape, Path(tmp) / "ref", ranks, args.mu0)
                entry = {"lc_error_pct": 100 * (1 - final["test_acc_lc"]),
                         "lc_bytes": final["packed_bytes"],
                         "lc_compression": fp32 / final["packed_bytes"],
                         "direct_error_pct": 100 * (1 - dc["acc"]),
                         "direct_bytes": dc["bytes"], "direct_compression": fp32 / dc["bytes"],
                         "lc_distance": final.get("lc_distance", float("nan")),
                         "ranks": ranks, "lc_seconds": seconds}
                results[f"{name} {row}"] = entry
                _util.row(f"{name} {row}", **{k: v for k, v in entry.items()
                                               if k != "ranks"})
                if ranks:
                    print(f"    ranks: {ranks}")
    _util.finish(env, {"reference_epochs": args.reference_epochs, "steps": args.steps,
                       "epochs_per_step": args.epochs_per_step, "mu0": args.mu0,
                       "growth": args.growth, "lr": args.lr, "results": results})


if __name__ == "__main__":
    main()
