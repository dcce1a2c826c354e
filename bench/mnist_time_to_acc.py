"""Seconds of training for MNIST to reach 99.0% test accuracy: the project's recipes (run
through qsweep's own loop) side by side with a plain PyTorch recipe, in the same run.

The plain recipe is the one in ../shared/STACK_NOTES.md: conv16-conv32-fc128 (3x3), SGD
nesterov, one-cycle, batch 128, tensors in memory, no qsweep code.

    QSWEEP_DATA=../shared/data python bench/mnist_time_to_acc.py [--seeds 0 1 2]
Goals (issue 3): 99.0% in <= 20 s; >= 99.3% for a longer run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import _util
import torch
from torch import nn

FAST = ["model.name=lenet", "model.channels=[16,32]", "model.hidden=[128]",
        "optim.lr=0.1", "optim.schedule=onecycle", "optim.weight_decay=5e-4",
        "data.batch_size=128", "train.epochs=2"]
LONG = ["model.name=lenet", "model.channels=[32,64]", "model.hidden=[256]",
        "model.batch_norm=true", "optim.lr=0.1", "optim.schedule=onecycle",
        "optim.weight_decay=5e-4", "data.batch_size=128", "train.epochs=6"]
TARGET = 0.99


def plain_recipe(splits, epochs: int, seed: int, lr: float = 0.1) -> list[tuple[float, float]]:
    """(cumulative training seconds, test accuracy) after each epoch."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
    mean, std = splits.mean[0], splits.std[0]
    x_train = (splits.train.x.float() / 255 - mean) / std
    x_test = (splits.test.x.float() / 255 - mean) / std
    y_train, y_test = splits.train.y, splits.test.y
    steps = -(-len(y_train) // 128)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    loss_fn, out, trained = nn.CrossEntropyLoss(), [], 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(y_train)).split(128):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            sched.step()
        trained += time.perf_counter() - start
        model.eval()
        with torch.no_grad():
            correct = sum((model(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum().item()
                          for i in range(0, len(y_test), 1000))
        out.append((trained, correct / len(y_test)))
    return out


def qsweep_recipe(overrides: list[str], seed: int) -> list[tuple[float, float]]:
    from trainables import LocalSession, TrialConfig, run_trial

    cfg = TrialConfig().with_overrides([*overrides, f"train.seed={seed}", "train.threads=2",
                                        "train.checkpoint=false"])
    history = run_trial(cfg, LocalSession())
    trained, out = 0.0, []
    for metrics in history:
        trained += metrics["train_seconds"]
        out.append((trained, metrics["test_acc"]))
    return out


def seconds_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((s for s, acc in curve if acc >= target), None)


def summary(values: list[float]) -> str:
    """mean +- std (n) of the values that exist; NaN marks a target never reached."""
    reached = [v for v in values if not math.isnan(v)]
    missing = f", {len(values) - len(reached)} of {len(values)} never reached" \
        if len(reached) < len(values) else ""
    if len(reached) < 2:
        return f"{reached[0]:.4g} (n=1{missing})" if reached else f"none ({missing[2:]})"
    return (f"{statistics.mean(reached):.4g} +- {statistics.stdev(reached):.2g} "
            f"(n={len(reached)}{missing})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--skip-long", action="store_true")
    args = parser.parse_args()
    env = _util.header("mnist_time_to_acc")
    torch.set_num_threads(2)

    from trainables.config import DataConfig
    from trainables.data import load_splits

    splits = load_splits(DataConfig(name="mnist"), seed=0)
    recipes = {"plain pytorch (2 epochs)": lambda s: plain_recipe(splits, 2, s),
               "qsweep fast (lenet16-32, 2 epochs)": lambda s: qsweep_recipe(FAST, s)}
    if not args.skip_long:
        recipes["qsweep long (lenet32-64 BN, 6 ep)"] = lambda s: qsweep_recipe(LONG, s)
    results: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:  # interleaved per seed: machine noise hits all recipes alike
        for name, recipe in recipes.items():
            curve = recipe(seed)
            r = results.setdefault(name, {"seconds_to_99": [], "final_acc": [],
                                          "train_seconds": []})
            hit = seconds_to(curve, TARGET)
            r["seconds_to_99"].append(hit if hit is not None else float("nan"))
            r["final_acc"].append(curve[-1][1])
            r["train_seconds"].append(curve[-1][0])
            _util.row(f"{name} seed {seed}", seconds_to_99=hit if hit else "not reached",
                      final_acc=curve[-1][1], train_s=curve[-1][0])
    print("  summary (mean +- std over seeds):")
    plain = statistics.mean(results["plain pytorch (2 epochs)"]["train_seconds"])
    for name, r in results.items():
        ratio = statistics.mean(r["train_seconds"]) / plain
        print(f"  {name:<36} s_to_99.0={summary(r['seconds_to_99'])}  "
              f"final_acc={summary(r['final_acc'])}  train_s={summary(r['train_seconds'])}  "
              f"train_time_ratio_vs_plain={ratio:.2f}")
    _util.finish(env, {name: {k: [round(v, 4) for v in vals] for k, vals in r.items()}
                       for name, r in results.items()})


if __name__ == "__main__":
    main()
