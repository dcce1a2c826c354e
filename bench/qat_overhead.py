"""QAT epoch time against FP32 epoch time: same model, same data, same optimizer, run
interleaved (FP32, QAT, FP32, QAT, ...) in one process, through qsweep's own loop
(``run_trial`` with ``quant.mode=qat``), so machine noise hits both alike.

    QSWEEP_DATA=../shared/data python bench/qat_overhead.py                 # LeNet, MNIST
    QSWEEP_DATA=../shared/data python bench/qat_overhead.py --case resnet20  # CIFAR-10 JPEG
Goal (issue 9): QAT / FP32 <= 1.3.
"""

from __future__ import annotations

import argparse

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

    from trainables import TrialConfig

    base = TrialConfig().with_overrides([*CASES[args.case], *COMMON,
                                         f"train.threads={args.threads}"])
    results = _util.ratio_rows(_util.interleaved_train_seconds(base, QAT, args.repeats))
    _util.finish(env, {"case": args.case, "results": results})


if __name__ == "__main__":
    main()
