"""Seed 002: which deployed version of a model keeps its accuracy, and what does it cost?
AlexNet, ResNet-18 and MobileNetV3-Small on cats vs dogs, each trained in FP32 and with
8-bit QAT, then deployed as FP32 (eager, ONNX), FP16, BF16, INT16 (simulated: weights
rounded to per-channel INT16, no INT16 kernels exist on CPU) and INT8 (PTQ: PT2E and
onnxruntime static QDQ from the FP32 model; QAT: the same lowerings of the QAT model).

The recipe (no pretrained weights can be downloaded here): trained from scratch at 64 px
on the 400 cats-vs-dogs training photos plus the CIFAR-10 copy's 10,000 cat and dog
training images (upscaled; ``--no-cifar`` leaves them out), crop-and-flip augmentation,
SGD + Nesterov with a one-cycle schedule; test = the 100 held-out cats-vs-dogs photos.
The models keep their ImageNet stems (stride 2/4) at 64 px, so the same trained
weights run at 224 px: the latency rows time the trained models at ``--latency-size``
(224) on this CPU (``deploy/speed.py``: batch-1 p50/p95, batch-64 throughput, memory).

Each cell (model, training) searches its learning rate (``--num-samples`` points, the
study module's paired design), and the pick is re-run with ``--seeds`` seeds; every
trial's export stage deploys its model in the cell's formats and logs them as MLflow
models (``onnx_int8/``, ``pytorch/``...). The study run holds the study table
(comparison.md) and ``deploy.md``: model x training x format -> accuracy (mean over
seeds), bytes on disk, and the latency/throughput/memory rows.

    python sweeps/deploy_study.py --smoke-test                 # tiny: MobileNetV3, 2 formats
    python sweeps/deploy_study.py                              # the study (2 cores: hours)
    python sweeps/deploy_study.py --models resnet18 --num-samples 1 --seeds 1 --epochs 4
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
from pathlib import Path
from typing import Any

from sweeps.cli import base_config, common_parser, main_guard, resume_run_id, tracking_uri
from sweeps.runner import mlflow_ui_command
from sweeps.study import Cell, SearchSpace, Study, report_from, run_study
from trainables.config import ConfigError

STUDY = "deploy"
MODELS = ("alexnet", "resnet18", "mobilenet_v3_small")
TRAINING = ("fp32", "qat8")
# What every trial deploys (export.formats) and rounds to (evaluate.weight_rounding): the
# same lists in every cell (the seed re-runs share one Tune run, which lays each point's
# lists over its base element by element). A QAT model's FP32/FP16 rows are its rounded
# weights run in float.
DEPLOYED = ("fp32", "fp16", "bf16", "int8_pt2e", "onnx_fp32", "onnx_int8")
FORMATS = {"fp32": DEPLOYED, "qat8": DEPLOYED}
TRAIN = {"fp32": [],
         # The project's QAT: per-channel INT8 weights, 8-bit activations (moving average).
         "qat8": ["quant.mode=qat", "quant.bits=8", "quant.per_channel=true",
                  "quant.activation_bits=8"]}
LR_RANGE = (0.005, 0.1)
COMMON = ["data.name=image_folder", "data.image_size=64", "data.batch_size=64",
          "data.val_fraction=0.1", "data.test_batch_size=100", "data.augment=crop_flip",
          "optim.name=sgd", "optim.schedule=onecycle", "optim.weight_decay=5e-4",
          "train.threads=1", "export.latency=true", "evaluate.weight_rounding=[int16]"]
SMOKE = ["data.image_size=32", "data.train_subset=64", "train.epochs=1",
         "data.batch_size=16"]
# The accuracies tabled per cell (comparison.md) beside test_acc (FP32 or QAT float).
ACCURACIES = ("test_acc_q", "test_acc_int16",
              *sorted({f"deploy_acc_{f}" for fs in FORMATS.values() for f in fs}))


def training_folder(root: Path, out: Path, cifar: bool) -> Path:
    """An image folder (symlinks, train/{cat,dog}, test/{cat,dog}) holding the
    cats-vs-dogs photos and, with ``cifar``, the CIFAR-10 copy's cat and dog training
    images: what the trials read (``data.folder``)."""
    photos = root / "cats_vs_dogs"
    if not (photos / "train").is_dir():
        raise ConfigError(f"--data-root {root} has no cats_vs_dogs/train: allowed a data "
                          "root holding cats_vs_dogs/{train,test}/<class>/ (../shared/data)")
    classes = sorted(p.name for p in (photos / "train").iterdir() if p.is_dir())
    sources = {"train": [photos / "train"], "test": [photos / "test"]}
    extra = root / "cifar10-jpeg" / "train"
    if cifar and all((extra / c).is_dir() for c in classes):
        sources["train"].append(extra)
    for split, folders in sources.items():
        for cls in classes:
            target = out / split / cls
            target.mkdir(parents=True, exist_ok=True)
            for i, folder in enumerate(folders):
                for image in sorted((folder / cls).iterdir()):
                    link = target / f"{i}-{image.name}"
                    if not link.is_symlink():
                        link.symlink_to(image.resolve())
    return out


def data_folder(args: argparse.Namespace) -> Path:
    """Where the training folder of this data root lives: in qsweep's cache (each data
    root its own), so trials on this machine read it and the decoded-tensor cache keys
    on it."""
    import hashlib

    from trainables.config import DataConfig
    from trainables.datasets import cache_dir, data_root

    data = DataConfig(root=args.data_root or "")
    root = data_root(data).resolve()  # --data-root, else $QSWEEP_DATA, else ./data
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    variant = "photos" if args.no_cifar else "photos+cifar"
    return training_folder(root, cache_dir(data) / "deploy_study" / digest / variant,
                           cifar=not args.no_cifar)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common_parser(__doc__.splitlines()[0], num_samples=3, max_concurrent=2, epochs=6)
    parser.add_argument("--models", nargs="+", default=None, choices=MODELS,
                        help=f"default: {' '.join(MODELS)} (smoke test: mobilenet_v3_small)")
    parser.add_argument("--training", nargs="+", default=list(TRAINING), choices=TRAINING)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--no-cifar", action="store_true",
                        help="train on the 400 cats-vs-dogs photos alone")
    parser.add_argument("--latency-size", type=int, default=224,
                        help="image size of the latency rows (0: none)")
    parser.add_argument("--report-from", default=None, metavar="RUN_ID",
                        help="train nothing: rebuild the tables of this finished study run")
    args = parser.parse_args(argv)
    args.models = args.models or (["mobilenet_v3_small"] if args.smoke_test else list(MODELS))
    if args.smoke_test:
        args.num_samples, args.seeds = 1, 1
        args.latency_size = min(args.latency_size, 32)
    for name, low in (("--num-samples", 1), ("--seeds", 1), ("--latency-size", 0)):
        value = getattr(args, name[2:].replace("-", "_"))
        if value < low:
            raise ConfigError(f"{name}={value} is invalid: allowed >= {low}")
    return args


def study(args: argparse.Namespace, folder: Path) -> Study:
    cells = []
    for model, training in itertools.product(args.models, args.training):
        formats = FORMATS[training] if not args.smoke_test else ("fp32", "int8_pt2e")
        # Unless --set export.formats=[...] chose for every cell (it wins: applied last).
        defaults = [*COMMON, f"data.folder={folder}", f"model.name={model}",
                    *TRAIN[training], f"export.formats=[{','.join(formats)}]"]
        base = base_config(args, defaults, SMOKE)
        cells.append(Cell((model, training), base, SearchSpace(
            ranges=(("optim.lr", *LR_RANGE, True),))))
    return Study(
        name=STUDY, cells=tuple(cells), key_names=("model", "training"),
        num_samples=args.num_samples, seeds=args.seeds, seed=args.seed,
        extra_metrics=ACCURACIES, max_concurrent=args.max_concurrent, rungs=(),
        tracking_uri=tracking_uri(args), storage_path=args.storage_path, address=args.address,
        resume_run_id=resume_run_id(args, STUDY, "study"),
        auto_gpus=args.gpus_per_trial == "auto", max_failures=args.max_failures,
        params={"study.epochs": args.epochs, "study.smoke_test": args.smoke_test,
                "study.models": ",".join(args.models),
                "study.training": ",".join(args.training),
                "study.cifar_extra": not args.no_cifar,
                "study.latency_size": args.latency_size})


def _mean(values: list[float]) -> float | None:
    """Mean of the finite values (a format that failed in a seed reports NaN), or None."""
    import statistics

    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def deploy_rows(outcome: Any) -> list[dict[str, Any]]:
    """Model x training x format -> mean accuracy, bytes and in-trial latency over the
    cell's seed runs (a format that failed in every seed: its error count, no numbers)."""
    rows = []
    for cell in outcome.cells:
        finals = [h[-1] for h in cell.histories if h]
        model, training = cell.key
        for fmt in FORMATS.get(training, ()):
            accs = [f[f"deploy_acc_{fmt}"] for f in finals if f"deploy_acc_{fmt}" in f]
            if not accs:
                continue
            acc = _mean(accs)
            row: dict[str, Any] = {"model": model, "training": training, "format": fmt,
                                   "test_acc": round(acc, 4) if acc is not None else "failed",
                                   "seeds": sum(math.isfinite(a) for a in accs)}
            nbytes = _mean([f.get(f"deploy_bytes_{fmt}", math.nan) for f in finals])
            rel = _mean([f.get(f"deploy_rel_{fmt}", math.nan) for f in finals])
            if nbytes is not None:
                row["bytes"] = int(nbytes)
            if rel is not None:
                row["rel_latency_train_px"] = round(rel, 3)
            rows.append(row)
        simulated = (("test_acc", "as trained"), ("test_acc_int16", "int16 (simulated)"),
                     ("test_acc_q", "int8 fake-quant (qsweep QAT)"))
        for name, label in simulated:
            value = _mean([f[name] for f in finals if name in f])
            if value is not None:
                rows.append({"model": model, "training": training, "format": label,
                             "test_acc": round(value, 4),
                             "seeds": sum(1 for f in finals if name in f)})
    return rows


def seed_trial_runs(tracker: Any, study_run: str) -> dict[tuple[str, str], str]:
    """(model, training) -> the run id of its first seed re-run (lowest train.seed): the
    trial runs nested under the study's ``kind=points`` run."""
    client = tracker.client
    experiments = [tracker.experiment_id]
    points = client.search_runs(experiments, f"tags.mlflow.parentRunId = '{study_run}' "
                                             "and tags.kind = 'points'")
    found: dict[tuple[str, str], tuple[int, str]] = {}
    for parent in points:
        for run in client.search_runs(
                experiments, f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
            params = run.data.params
            training = "qat8" if params.get("quant.mode") == "qat" else "fp32"
            key = (params.get("model.name", ""), training)
            seed = int(params.get("train.seed", 0))
            if key not in found or seed < found[key][0]:
                found[key] = (seed, run.info.run_id)
    return {key: run_id for key, (_, run_id) in found.items()}


def latency_rows(tracker: Any, study_run: str, size: int, smoke: bool
                 ) -> list[dict[str, Any]]:
    """The trained models (each cell's first seed run's ``pytorch`` MLflow model) timed
    at ``size`` px in their cell's formats, interleaved (deploy/speed.py), on 64 real
    test-size inputs (noise: speed does not depend on the values; agreement is with the
    model's own FP32 predictions)."""
    import mlflow.pytorch
    import torch

    from deploy.speed import int8_ratios, speed_rows

    rows = []
    torch.manual_seed(0)
    x = torch.rand(64 if not smoke else 8, 3, size, size)
    for (model_name, training), run_id in sorted(seed_trial_runs(tracker, study_run).items()):
        mlflow.set_tracking_uri(tracker.tracking_uri)
        model = mlflow.pytorch.load_model(f"runs:/{run_id}/pytorch").eval()
        formats = ("fp32", "fp32_compiled", "onnx_fp32", "fp16", "bf16", "int8_pt2e",
                   "onnx_int8") if training == "fp32" else ("int8_pt2e", "onnx_int8")
        if smoke:
            formats = ("fp32", "int8_pt2e")
        with tempfile.TemporaryDirectory() as tmp:
            measured = speed_rows(model, x, formats, Path(tmp), model_name, rounds=2,
                                  batch1_repeats=10, batch_repeats=2)
        for fmt, values in measured.items():
            rows.append({"model": model_name, "training": training, "format": fmt,
                         "size_px": size, **{k: (round(v, 3) if isinstance(v, float) else v)
                                             for k, v in values.items()}})
        ratios = int8_ratios(measured)
        if ratios:
            print(f"  {model_name} ({training}) at {size} px: " + "  ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in ratios.items()))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = study(args, data_folder(args))
    outcome = report_from(plan, args.report_from) if args.report_from else run_study(plan)
    print(f"\n=== {STUDY}: test_acc over seeds per cell ===\n{outcome.table}")
    from sweeps.tracking import SweepTracker

    tracker = SweepTracker(plan.tracking_uri, STUDY)
    rows = deploy_rows(outcome)
    table = tracker.log_table(outcome.run_id, rows, "deploy") if rows else ""
    print(f"=== {STUDY}: model x training x format ===\n{table}")
    if args.latency_size:
        speed = latency_rows(tracker, outcome.run_id, args.latency_size, args.smoke_test)
        if speed:
            text = tracker.log_table(outcome.run_id, speed, "latency")
            print(f"=== {STUDY}: latency at {args.latency_size} px ===\n{text}")
    print(f"MLflow experiment {STUDY!r}, study run {outcome.run_id}")
    print(f"See the results:  {mlflow_ui_command(tracking_uri(args))}")
    return 0


if __name__ == "__main__":
    main_guard(main)
