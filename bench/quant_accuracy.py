"""Accuracy and size of quantized models on real data: FP32, PTQ in every format, QAT,
and mixed precision, each with its packed bytes and compression ratio, side by side.

FP32 trains once through qsweep's loop; every PTQ row quantizes that same trained model
(``quant.quantize_``, weights only, then ``save_packed`` and evaluation of the packed
model reloaded into a fresh one); every QAT row is its own trial (``quant.mode=qat``)
with the same recipe and seed.

    QSWEEP_DATA=../shared/data python bench/quant_accuracy.py                   # LeNet-5, MNIST
    QSWEEP_DATA=../shared/data python bench/quant_accuracy.py --dataset fashion_mnist
    QSWEEP_DATA=../shared/data python bench/quant_accuracy.py --dataset cifar10_jpeg \\
        --model resnet20 --epochs 4
    # QAT as fine-tuning (the usual recipe): each QAT row starts from the FP32 model
    # (train.init_from) for --fine-tune epochs at --fine-tune-lr; so does an FP32 row, the
    # matched baseline ("fp32 +N").
    QSWEEP_DATA=../shared/data python bench/quant_accuracy.py --dataset cifar10_jpeg \\
        --model resnet20 --epochs 8 --fine-tune 2 --skip-ptq --qat "w4a4 (first/last 8)"
Targets (issue 9, LeNet MNIST): INT8 PTQ within 0.1 point of FP32, INT4 QAT within 0.3,
LNS-4 QAT within 0.5, codebook k=4 within 0.3.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import _util
import torch

MODELS = {"lenet5": ["model.name=lenet", "model.channels=[6,16]", "model.hidden=[120,84]",
                     "model.kernel_size=5"],
          "resnet20": ["model.name=resnet20"]}
PTQ = {"int8": "IntFormat(8, True, True)", "int4": "IntFormat(4, True, True)",
       "lns8": "LNSFormat(8, 3)", "lns4": "LNSFormat(4, 0)",
       "lns4 per-channel": "LNSFormat(4, 0, per_channel=True)", "k2": "CodebookFormat(2)",
       "k4": "CodebookFormat(4)", "k16": "CodebookFormat(16)", "bf16": "FloatFormat('bf16')"}
QAT = {"int4": ["quant.format=int", "quant.bits=4", "quant.per_channel=true"],
       "lns4": ["quant.format=lns", "quant.bits=4"],
       "lns4 per-channel": ["quant.format=lns", "quant.bits=4", "quant.per_channel=true"],
       "lns8": ["quant.format=lns", "quant.bits=8", "quant.lns_frac_bits=3"],
       "int4 (first/last int8)": ["quant.format=int", "quant.bits=4", "quant.per_channel=true",
                                  "quant.first_last_bits=8"],
       "int4 w, int8 a": ["quant.format=int", "quant.bits=4", "quant.per_channel=true",
                          "quant.activation_bits=8"]}
# LSQ: learned step sizes against min-max steps, at 4 and 2 bits.
QAT["int4 lsq"] = [*QAT["int4"], "quant.lsq=true"]
QAT["int2"] = ["quant.format=int", "quant.bits=2", "quant.per_channel=true"]
QAT["int2 lsq"] = [*QAT["int2"], "quant.lsq=true"]
# W4A4 with first/last layers at 8 bits (ResNet-20's target row), min-max steps vs LSQ.
QAT["w4a4 (first/last 8)"] = [*QAT["int4 (first/last int8)"], "quant.activation_bits=4"]
QAT["w4a4 lsq (first/last 8)"] = [*QAT["w4a4 (first/last 8)"], "quant.lsq=true"]
# All in LNS (LNS-Madam's setting): LNS-8 weights, layer inputs and gradients.
ALL_LNS8 = ["quant.format=lns", "quant.bits=8", "quant.lns_frac_bits=3",
            "quant.activation_bits=8", "quant.activation_format=lns", "quant.gradient_bits=8"]
QAT["lns8 w+a+g"] = ALL_LNS8
QAT["lns8 w+a+g, lns_madam"] = [*ALL_LNS8, "optim.name=lns_madam", "optim.lr=0.03125",
                                "optim.schedule=constant"]


@torch.no_grad()
def accuracy(model, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", choices=tuple(MODELS), default="lenet5")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-qat", action="store_true")
    parser.add_argument("--fine-tune", type=int, default=0, metavar="EPOCHS",
                        help="QAT rows fine-tune the FP32 model for EPOCHS (0: QAT from "
                             "scratch, as long as FP32)")
    parser.add_argument("--fine-tune-lr", type=float, default=0.01)
    parser.add_argument("--skip-ptq", action="store_true")
    parser.add_argument("--qat", nargs="+", choices=tuple(QAT), default=tuple(QAT),
                        metavar="ROW", help=f"QAT rows to run (default all: {', '.join(QAT)})")
    args = parser.parse_args()
    env = _util.header(f"quant_accuracy[{args.dataset}/{args.model}]")

    import quant
    from quant import CodebookFormat, FloatFormat, IntFormat, LNSFormat  # noqa: F401
    from trainables import LocalSession, TrialConfig, run_trial
    from trainables.data import load_splits
    from trainables.models import build_model

    cfg = TrialConfig().with_overrides([
        f"data.name={args.dataset}", *MODELS[args.model], "optim.name=sgd", "optim.lr=0.1",
        "optim.schedule=onecycle", "data.batch_size=128", f"train.epochs={args.epochs}",
        f"train.threads={args.threads}"])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        history = run_trial(cfg, LocalSession(checkpoint_dir=tmp / "fp32"))
        fp32_acc = history[-1]["test_acc"]
        splits = load_splits(cfg.data, seed=cfg.train.seed)

        def fresh():
            return build_model(cfg.model, splits.in_channels, splits.image_size,
                               splits.num_classes)

        trained = fresh()
        from trainables.sessions import load_state_file

        trained.load_state_dict(load_state_file(tmp / "fp32")["model"])
        loader = splits.loader("test", 1000, torch.device("cpu"), seed=0)
        fp32_bytes = quant.state_dict_bytes(trained, tmp / "fp32.pt")
        results["fp32"] = {"acc": fp32_acc, "bytes": fp32_bytes, "ratio": 1.0}
        _util.row("fp32", acc=fp32_acc, bytes=fp32_bytes)
        for name, fmt_code in ({} if args.skip_ptq else PTQ).items():
            model = quant.quantize_(copy.deepcopy(trained),
                                    quant.QuantConfig(weights=eval(fmt_code)))
            nbytes = quant.save_packed(model, tmp / f"{name}.qsw")
            acc = accuracy(quant.load_packed(tmp / f"{name}.qsw", fresh()), loader)
            results[f"ptq {name}"] = {"acc": acc, "bytes": nbytes, "ratio": fp32_bytes / nbytes}
            _util.row(f"ptq {name}", acc=acc, delta_points=100 * (acc - fp32_acc), bytes=nbytes,
                      ratio=fp32_bytes / nbytes)
        qat_base = cfg
        if args.fine_tune:
            qat_base = cfg.with_overrides([f"train.init_from={tmp / 'fp32'}",
                                           f"train.epochs={args.fine_tune}",
                                           f"optim.lr={args.fine_tune_lr}",
                                           "optim.schedule=cosine"])
            tuned = run_trial(qat_base, LocalSession())[-1]["test_acc"]
            results[f"fp32 +{args.fine_tune}"] = {"acc": tuned, "bytes": fp32_bytes,
                                                  "ratio": 1.0}
            _util.row(f"fp32 +{args.fine_tune} (fine-tuned as QAT)", acc=tuned,
                      delta_points=100 * (tuned - fp32_acc), bytes=fp32_bytes)
        if not args.skip_qat:
            for name in args.qat:
                overrides = QAT[name]
                final = run_trial(qat_base.with_overrides(["quant.mode=qat", *overrides]),
                                  LocalSession())[-1]
                acc, nbytes = final["test_acc_q"], final["packed_bytes"]
                results[f"qat {name}"] = {"acc": acc, "bytes": nbytes,
                                          "ratio": final["compression_ratio"]}
                _util.row(f"qat {name}", acc=acc, delta_points=100 * (acc - fp32_acc),
                          bytes=nbytes, ratio=final["compression_ratio"])
    _util.finish(env, {"dataset": args.dataset, "model": args.model, "epochs": args.epochs,
                       "fine_tune": args.fine_tune, "results": results})


if __name__ == "__main__":
    main()
