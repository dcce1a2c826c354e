"""Memory layout of the EG-vs-GD study's LeNet (16-32 channels, 128 hidden) on 1 thread:
the default (NCHW) against channels-last (``train.channels_last=true``), training and
evaluation through qsweep's own loop, interleaved repeats in one run, ratio to NCHW.

    QSWEEP_DATA=../shared/data python bench/layout.py [--repeats 3] [--train-subset 20000]

The default layout's max-pooling is the slow part on this CPU (a third of a training
step in the profiler); evaluation also compares test batch sizes (accuracy does not
depend on them). Last, the order of each conv block's ReLU and pool: qsweep's LeNet pools
first (the same numbers; tests/test_models.py), timed against the textbook order
(ReLU on the full map, then pool) in the same training steps, channels-last.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import _util

LENET = ["model.name=lenet", "model.channels=[16,32]", "model.hidden=[128]",
         "data.name=mnist", "data.batch_size=128", "optim.schedule=onecycle",
         "train.threads=1", "train.epochs=1"]
VARIANTS = {"nchw": [], "channels_last": ["train.channels_last=true"]}


def eval_images_per_s(cfg, batch_size: int) -> float:
    """Forward passes over the test split, as the loop evaluates (no gradient)."""
    import torch

    from trainables.data import load_splits
    from trainables.models import model_for_trial

    torch.set_num_threads(1)
    splits = load_splits(cfg.data, seed=0)
    model = model_for_trial(cfg, (splits.in_channels, splits.image_size, splits.num_classes))
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    loader = splits.loader("test", batch_size, torch.device("cpu"), seed=0,
                           channels_last=cfg.train.channels_last)
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    return len(splits.test.y) / (time.perf_counter() - start)


def textbook_order(model):
    """``model`` with each ReLU moved back before its pool (the same weights)."""
    import torch

    layers = []
    for module in model.features:
        if isinstance(module, torch.nn.ReLU):
            layers.insert(len(layers) - 1, module)
        else:
            layers.append(module)
    model.features = torch.nn.Sequential(*layers)
    return model


def step_seconds(cfg, textbook: bool, steps: int = 100) -> float:
    """Seconds per training step (batch of cfg.data.batch_size, plain SGD)."""
    import torch

    from trainables.data import load_splits
    from trainables.models import model_for_trial

    torch.set_num_threads(1)
    torch.manual_seed(0)
    splits = load_splits(cfg.data, seed=0)
    model = model_for_trial(cfg, (splits.in_channels, splits.image_size, splits.num_classes))
    model = (textbook_order(model) if textbook else model).to(
        memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = splits.loader("train", cfg.data.batch_size, torch.device("cpu"), seed=0,
                           channels_last=True)
    batches = list(itertools.islice(loader, steps))
    start = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=20000)
    args = parser.parse_args()
    env = _util.header("layout")
    from trainables import TrialConfig
    from trainables.data import data_root

    root = data_root(TrialConfig().data).resolve()
    base = TrialConfig().with_overrides([*LENET, f"data.root={root}",
                                         f"data.train_subset={args.train_subset}"])
    seconds = _util.interleaved_train_seconds(
        base, {"channels_last": VARIANTS["channels_last"]}, args.repeats)
    seconds["nchw"] = seconds.pop("fp32")
    print(f"  training, {args.train_subset} images, 1 thread (median of {args.repeats}):")
    train = {}
    for name in ("nchw", "channels_last"):
        median = statistics.median(seconds[name])
        train[name] = {"train_s": median,
                       "ratio_to_nchw": median / statistics.median(seconds["nchw"])}
        _util.row(name, train_s=median, speedup=1 / train[name]["ratio_to_nchw"],
                  runs=" ".join(f"{v:.2f}" for v in seconds[name]))
    print("  evaluation, test split (images/s, best of the repeats):")
    evaluation = {}
    for batch in (256, 1000):
        for name, extra in VARIANTS.items():
            cfg = base.with_overrides(extra)
            rate = max(eval_images_per_s(cfg, batch) for _ in range(args.repeats))
            evaluation[f"{name}_batch{batch}"] = round(rate)
            _util.row(f"{name} batch {batch}", images_per_s=round(rate))
    print("  conv block order, channels-last training steps (ms, median of the repeats):")
    order: dict[str, list[float]] = {"relu_then_pool": [], "pool_then_relu": []}
    for _ in range(args.repeats):  # interleaved
        for name in order:
            order[name].append(step_seconds(base, textbook=name == "relu_then_pool"))
    step_s = {name: statistics.median(values) for name, values in order.items()}
    for name, seconds in step_s.items():
        _util.row(name, step_ms=1e3 * seconds, speedup=step_s["relu_then_pool"] / seconds)
    _util.finish(env, {"train": train, "eval_images_per_s": evaluation,
                       "train_speedup_channels_last": round(
                           1 / train["channels_last"]["ratio_to_nchw"], 3),
                       "step_ms": {k: round(1e3 * v, 3) for k, v in step_s.items()},
                       "step_speedup_pool_first": round(
                           step_s["relu_then_pool"] / step_s["pool_then_relu"], 3)})


if __name__ == "__main__":
    main()
