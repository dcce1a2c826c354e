"""Images/s of the project's in-memory batch loader vs torchvision DataLoader + ToTensor
(+ Normalize) on real MNIST, one full training epoch at batch 128, in the same run.

    QSWEEP_DATA=../shared/data python bench/data_path.py [--repeats 3]
Goal (issue 3): >= 10x.
"""

from __future__ import annotations

import argparse
import time

import _util
import torch


def epoch_rate(batches, consume) -> float:
    start, n = time.perf_counter(), 0
    for x, y in batches:
        consume(x, y)
        n += len(y)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    env = _util.header("data_path")
    torch.set_num_threads(2)

    from torchvision import datasets, transforms

    from trainables.config import DataConfig
    from trainables.data import data_root, load_splits

    cfg = DataConfig(name="mnist")
    start = time.perf_counter()
    splits = load_splits(cfg, seed=0)
    load_s = time.perf_counter() - start
    ours = splits.loader("train", args.batch_size, torch.device("cpu"), seed=0)
    tv_set = datasets.MNIST(str(data_root(cfg)), train=True, download=False,
                            transform=transforms.Compose([
                                transforms.ToTensor(),
                                transforms.Normalize(splits.mean, splits.std)]))
    loaders = {
        "qsweep BatchLoader": lambda epoch: (ours.set_epoch(epoch), ours)[1],
        "torchvision DataLoader workers=0": lambda epoch: torch.utils.data.DataLoader(
            tv_set, batch_size=args.batch_size, shuffle=True, num_workers=0),
        "torchvision DataLoader workers=2": lambda epoch: torch.utils.data.DataLoader(
            tv_set, batch_size=args.batch_size, shuffle=True, num_workers=2),
    }
    checksum = torch.zeros(())

    def consume(x: torch.Tensor, y: torch.Tensor) -> None:
        checksum.add_(x[0, 0, 0, 0])  # touch the batch, as a training step would

    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for repeat in range(args.repeats):  # interleaved: noise hits every loader alike
        for name, make in loaders.items():
            rates[name].append(epoch_rate(make(repeat), consume))
    best = {name: max(r) for name, r in rates.items()}
    baseline = best["torchvision DataLoader workers=0"]
    best_tv = max(best["torchvision DataLoader workers=0"],
                  best["torchvision DataLoader workers=2"])
    print(f"  cached load of MNIST into memory: {load_s:.2f} s")
    for name, value in best.items():
        _util.row(name, images_per_s=round(value), ratio_vs_tv_workers0=value / baseline)
    ratio = best["qsweep BatchLoader"] / best_tv
    print(f"  qsweep / best torchvision = {ratio:.1f}x  (goal >= 10x)")
    _util.finish(env, {"images_per_s": {k: round(v) for k, v in best.items()},
                       "ratio_vs_best_torchvision": round(ratio, 2), "load_s": round(load_s, 2),
                       "goal_met": ratio >= 10})


if __name__ == "__main__":
    main()
