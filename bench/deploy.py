"""Deployment speed on this CPU: every model x format of deploy/formats.py, interleaved.

Per model and format: batch-1 latency (p50, p95), batch-64 throughput (images/s, from the
median batch time), peak memory (RSS growth while the format is built and runs its
first batch of 64: compilation included; a lower bound, see deploy/speed.py), bytes on
disk (ONNX external data included), and top-1 agreement with FP32 eager on the same
inputs (the fidelity of the lowering; meaningless where random weights give nearly
equal logits, as MobileNetV3's do at init: accuracy on real data is the study's,
sweeps/deploy_study.py). Rounds are interleaved (each round times every format once)
so the machine's noise hits all alike; the thread count is fixed (--threads) and
printed. Each model's INT8 rows close with the ratios the issue's goals read: INT8 PT2E
over FP32 eager and over the fastest FP32 path, at batch 64.

Weights are seeded random (speed and bytes do not depend on their values); inputs are
real images where the data root has them (CIFAR-10 JPEG, cats vs dogs, MNIST), resized
to the model's input, else noise. INT8 calibrates on 4 batches of them.

    QSWEEP_DATA=../shared/data python bench/deploy.py --models lenet
    QSWEEP_DATA=../shared/data python bench/deploy.py            # every model (~15 min)

--profile prints the 8 most expensive kernels of FP32 compiled and INT8 PT2E (batch 64)
per model: where INT8 falls short, which ops the time went to.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _util
from prune import channel_pruned

# name -> (model, input channels, image size, classes)
MODELS = {"lenet": ("lenet", 1, 28, 10), "resnet20": ("resnet20", 3, 32, 10),
          "resnet18": ("resnet18", 3, 224, 2),
          "mobilenet_v3_small": ("mobilenet_v3_small", 3, 224, 2),
          "alexnet": ("alexnet", 3, 224, 2)}
DEFAULT_FORMATS = ("fp32", "fp32_compiled", "onnx_fp32", "fp16", "bf16", "int8_pt2e",
                   "onnx_int8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch1-repeats", type=int, default=20)
    p.add_argument("--batch64-repeats", type=int, default=3)
    p.add_argument("--pruned", type=float, default=0.5,
                   help="also the model with this share of channels cut (0: no such row)")
    p.add_argument("--profile", action="store_true")
    return p.parse_args(argv)


def inputs(channels: int, size: int, n: int):
    """n real images (N x C x size x size, [0, 1]) from the data root, else noise."""
    import os

    import torch
    import torch.nn.functional as F

    root = Path(os.environ.get("QSWEEP_DATA", "data"))
    folder = root / ("cats_vs_dogs/test" if size > 64 else "cifar10-jpeg/test")
    files = sorted(folder.glob("*/*.jpg"))[:: max(1, len(list(folder.glob("*/*.jpg"))) // n
                                               or 1)][:n] if folder.exists() else []
    if channels == 1 or len(files) < n:
        return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0))
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files]
    return torch.stack([F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None],
                                      size=(size, size), mode="bilinear")[0] for a in arrays])


def build(name: str, pruned: float):
    import torch

    from trainables.config import ModelConfig
    from trainables.models import build_model

    arch, channels, size, classes = MODELS[name]
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=arch), channels, size, classes).eval()
    models = {name: model}
    if pruned:
        example = torch.zeros(1, channels, size, size)
        models[f"{name}-ch{int(pruned * 100)}"] = channel_pruned(model, example, pruned)
    return models, channels, size


def bench_model(label, model, x, formats, args, out: Path) -> dict:
    from deploy.speed import int8_ratios, speed_rows

    rows = speed_rows(model, x, formats, out, label, rounds=args.rounds,
                      batch1_repeats=args.batch1_repeats, batch_repeats=args.batch64_repeats)
    for fmt, values in rows.items():
        if "error" in values:
            print(f"  {label} {fmt}: {values['error']}")
        else:
            _util.row(f"{label} {fmt}", **values)
    ratios = int8_ratios(rows)
    if ratios:
        _util.row(f"{label} ratios (batch 64)", **ratios)
    if args.profile and "error" not in rows.get("int8_pt2e", {"error": ""}):
        from deploy.formats import deploy

        calibration = [x[i:i + 16] for i in range(0, 64, 16)]
        for fmt in ("fp32_compiled", "int8_pt2e"):
            profile(label, fmt, deploy(model, fmt, x[:1], calibration, out / "p" / fmt), x)
    return {"formats": rows, "ratios": ratios}


def profile(label, fmt, fn, x) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fn(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    top = ", ".join(f"{e.key}={e.self_cpu_time_total / 3e3:.1f}ms" for e in events[:8])
    print(f"  {label} {fmt} kernels (batch {len(x)}, per call): {top}")


def main(argv=None) -> int:
    import torch

    from deploy.formats import check_formats

    args = parse_args(argv)
    check_formats(args.formats)
    torch.set_num_threads(args.threads)
    env = _util.header("deploy")
    print(f"  threads={args.threads} rounds={args.rounds} (interleaved), batch 1 and 64")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            models, channels, size = build(name, args.pruned)
            x = inputs(channels, size, 64)
            for label, model in models.items():
                formats = args.formats if label == name else \
                    [f for f in args.formats if f in ("fp32", "fp32_compiled", "int8_pt2e")]
                results[label] = bench_model(label, model, x, formats, args, Path(tmp))
    _util.finish(env, {"threads": args.threads, "models": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
