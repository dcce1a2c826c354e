"""Test error against compression ratio on real MNIST, pruning alone and pruning with
quantization (Deep Compression's LeNet rows: LeNet-300-100 40x at 1.58% error, LeNet-5
39x at 0.74%). Each row is one trial of qsweep's own loop; the packed bytes are the file
that reloads and scores the accuracy shown; compression = FP32 state_dict bytes / packed
bytes, both on disk. The zlib / LZMA columns: the packed file through a general-purpose
entropy coder (does coding the stream still pay?).

    QSWEEP_DATA=../shared/data python bench/prune_accuracy.py                   # both models
    QSWEEP_DATA=../shared/data python bench/prune_accuracy.py --models lenet300 --epochs 4

ResNet-20 on the CIFAR-10 JPEG copy (seed 004 / Distiller's rows: dense, 70% sparse by
polynomial decay, 70% sparse + INT8), each row the same schedule (SGD, one-cycle lr 0.1):

    QSWEEP_DATA=../shared/data python bench/prune_accuracy.py --models resnet20 \
        --rows fp32 "pruned 70%" "pruned 70% + QAT int8" --epochs 5
"""

from __future__ import annotations

import argparse
import lzma
import tempfile
import zlib
from pathlib import Path

import _util

MODELS = {"lenet300": ["model.name=mlp", "model.widths=[300,100]", "data.name=mnist"],
          "lenet5": ["model.name=lenet", "model.channels=[6,16]", "model.hidden=[120,84]",
                     "model.kernel_size=5", "data.name=mnist"],
          "resnet20": ["model.name=resnet20", "data.name=cifar10_jpeg"]}
COMMON = ["optim.name=sgd", "optim.lr=0.1", "optim.schedule=onecycle",
          "data.batch_size=128", "train.checkpoint=false"]
PRUNE = ["prune.schedule=polynomial", "prune.scope=global", "prune.start=0.1",
         "prune.end=0.7", "prune.frequency=100"]
ROWS = {
    "fp32": [],
    "pruned 92%": [*PRUNE, "prune.final_sparsity=0.92"],
    "pruned 92% + QAT int4": [*PRUNE, "prune.final_sparsity=0.92", "quant.mode=qat",
                              "quant.bits=4", "quant.per_channel=true"],
    "pruned 92% + QAT int4 (first/last int8)": [
        *PRUNE, "prune.final_sparsity=0.92", "quant.mode=qat", "quant.bits=4",
        "quant.per_channel=true", "quant.first_last_bits=8"],
    "pruned 70%": [*PRUNE, "prune.final_sparsity=0.7"],
    "pruned 70% + QAT int8": [*PRUNE, "prune.final_sparsity=0.7", "quant.mode=qat",
                              "quant.bits=8", "quant.per_channel=true"],
    "channels 50%": [*PRUNE, "prune.granularity=channel", "prune.scope=layer",
                     "prune.final_sparsity=0.5"],
    "channels 50% + QAT int8": [*PRUNE, "prune.granularity=channel", "prune.scope=layer",
                                "prune.final_sparsity=0.5", "quant.mode=qat", "quant.bits=8",
                                "quant.per_channel=true"],
    "pruned 95% + QAT int4": [*PRUNE, "prune.final_sparsity=0.95", "quant.mode=qat",
                              "quant.bits=4", "quant.per_channel=true"],
}

MNIST_ROWS = ("fp32", "pruned 92%", "pruned 92% + QAT int4",
              "pruned 92% + QAT int4 (first/last int8)", "pruned 95% + QAT int4")
DEFAULT_ROWS = {"lenet300": MNIST_ROWS, "lenet5": MNIST_ROWS,
                "resnet20": ("fp32", "pruned 70%", "pruned 70% + QAT int8")}


def entropy_coded(path: Path) -> dict[str, int]:
    """Bytes of the packed file after a general-purpose entropy coder (zlib level 9,
    LZMA preset 9): what coding the packed stream would still save (Deep Compression's
    last step is Huffman coding). Nothing when the trial wrote no packed file (FP32)."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    return {"zlib_bytes": len(zlib.compress(data, 9)), "lzma_bytes": len(lzma.compress(
        data, preset=9))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS),
                        default=("lenet300", "lenet5"))
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS),
                        help="default: each model's rows (DEFAULT_ROWS)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = _util.header("prune_accuracy")

    import quant
    from trainables import LocalSession, TrialConfig, run_trial
    from trainables.models import model_for_trial

    results = {}
    for model in args.models:
        base = TrialConfig().with_overrides([*MODELS[model], *COMMON,
                                             f"train.epochs={args.epochs}",
                                             f"train.threads={args.threads}"])
        with tempfile.TemporaryDirectory() as tmp:
            fp32_bytes = quant.state_dict_bytes(model_for_trial(base), f"{tmp}/fp32.pt")
        for row in args.rows or DEFAULT_ROWS[model]:
            cfg = base.with_overrides(ROWS[row])
            with tempfile.TemporaryDirectory() as tmp:
                final = run_trial(cfg, LocalSession(checkpoint_dir=tmp))[-1]
                deflated = entropy_coded(Path(tmp) / "artifacts" / "model.qsw")
            acc = final.get("test_acc_q", final["test_acc"])
            packed = final.get("packed_bytes", fp32_bytes)
            results[f"{model} {row}"] = {"test_error_pct": 100 * (1 - acc),
                                         "sparsity": final.get("sparsity", 0.0),
                                         "packed_bytes": packed,
                                         "compression": fp32_bytes / packed, **deflated}
            _util.row(f"{model} {row}", error_pct=100 * (1 - acc),
                      sparsity=final.get("sparsity", 0.0), bytes=packed,
                      compression=fp32_bytes / packed, **deflated)
    _util.finish(env, {"epochs": args.epochs, "results": results})


if __name__ == "__main__":
    main()
