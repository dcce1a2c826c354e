"""QAT epoch time against FP32 epoch time: same model, same data, same optimizer, run
interleaved (FP32, QAT, FP32, QAT, ...) in one process, through qsweep's own loop
(``run_trial`` with ``quant.mode=qat``), so machine noise hits both alike.

    QSWEEP_DATA=../shared/data python bench/qat_overhead.py                 # LeNet, MNIST
    QSWEEP_DATA=../shared/data python bench/qat_overhead.py --case resnet20  # CIFAR-10 JPEG
Goal (issue 9): QAT / FP32 <= 1.3.
"""

from __future__ import annotations

import argparse
import statistics

import _util

CASES = {
    "lenet": ["data.name=mnist", "model.name=lenet", "model.channels=[16,32]",
              "model.hidden=[128]", "data.train_subset=20000"],
    "resnet20": ["data.name=cifar10_jpeg", "model.name=resnet20", "data.train_subset=5000",
                 "data.augment=none"],
}
COMMON = ["optim.lr=0.05", "data.batch_size=128", "train.epochs=1", "train.checkpoint=false",
          "data.test_subset=1000"]
QAT = {"int4": ["quant.mode=qat", "quant.format=int", "quant.bits=4", "quant.per_channel=true"],
       "int8": ["quant.mode=qat", "quant.format=int", "quant.bits=8"],
       "lns4": ["quant.mode=qat", "quant.format=lns", "quant.bits=4"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=tuple(CASES), default="lenet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = _util.header(f"qat_overhead[{args.case}]")

    from trainables import LocalSession, TrialConfig, run_trial

    base = TrialConfig().with_overrides([*CASES[args.case], *COMMON,
                                         f"train.threads={args.threads}"])
    variants = {"fp32": base, **{k: base.with_overrides(v) for k, v in QAT.items()}}
    run_trial(base.with_overrides(["data.train_subset=512"]), LocalSession())  # warm-up
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved
        for name, cfg in variants.items():
            seconds[name].append(run_trial(cfg, LocalSession())[-1]["train_seconds"])
    fp32 = statistics.median(seconds["fp32"])
    results = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        # Noise on this VM only adds time: the ratio of the fastest runs is the steadier
        # figure; the median ratio is printed beside it.
        fastest = min(values) / min(seconds["fp32"])
        results[name] = {"train_seconds_median": median, "ratio_to_fp32": median / fp32,
                         "ratio_of_fastest": fastest}
        _util.row(name, train_s=median, ratio=median / fp32, ratio_fastest=fastest,
                  runs=" ".join(f"{v:.2f}" for v in values))
    _util.finish(env, {"case": args.case, "results": results})


if __name__ == "__main__":
    main()
