"""Pruning: the training overhead of masks and their schedule, and what unstructured
sparsity does to inference speed on this CPU.

1. Epoch time, pruned / plain FP32, interleaved (FP32, pruned, FP32, ...) in one process
   through qsweep's own loop: polynomial schedule to 80% with the masks updated every 100
   steps (the default) and every 10 (a stress case), and constant 80% (masks fixed).
2. Inference of the dense model against the same model 90% pruned (masks baked into plain
   weights) and against it with half the channels cut out (``prune.granularity=channel``
   at 0.5: the smaller dense model): batch 1 p50 latency and batch 64 throughput,
   interleaved, with parameters and MACs. Dense kernels multiply the zeros like any
   other value: expect a ratio of about 1 for unstructured sparsity (it pays in bytes,
   the packed file, not in speed, without a sparse kernel); the channel-pruned model does
   less work.

    QSWEEP_DATA=../shared/data python bench/prune.py                 # LeNet, MNIST
    QSWEEP_DATA=../shared/data python bench/prune.py --case resnet20  # CIFAR-10 JPEG
Goal (issue 19): pruned / FP32 epoch time <= 1.15.
"""

from __future__ import annotations

import argparse
import statistics

import _util
from qat_overhead import CASES, COMMON  # the same cases as the QAT overhead

PRUNED = {"channels50": ["prune.schedule=polynomial", "prune.granularity=channel",
                         "prune.final_sparsity=0.5", "prune.frequency=100"],
          "polynomial80_f100": ["prune.schedule=polynomial", "prune.final_sparsity=0.8",
                                "prune.frequency=100"],
          "polynomial80_f10": ["prune.schedule=polynomial", "prune.final_sparsity=0.8",
                               "prune.frequency=10"],
          "constant80": ["prune.schedule=constant", "prune.final_sparsity=0.8"]}


def _latency(model, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    import torch

    from deploy.measure import time_calls

    x = torch.randn(batch, *shape)
    return statistics.median(time_calls(model, x, repeats, warmup=3))


def inference(base, repeats: int) -> dict[str, dict[str, float]]:
    import copy

    import torch

    import compress
    from trainables.data import load_splits
    from trainables.models import macs_of, model_for_trial

    splits = load_splits(base.data, seed=0)
    shape = (splits.in_channels, splits.image_size, splits.image_size)
    torch.manual_seed(0)
    dense = model_for_trial(base, (splits.in_channels, splits.image_size,
                                   splits.num_classes)).eval()
    pruned = compress.attach_masks_(copy.deepcopy(dense))
    compress.prune_to_(pruned, 0.9)
    pruned = compress.bake_masks_(pruned).eval()
    models = {"dense": dense, "pruned90": pruned,
              "channels50": channel_pruned(dense, torch.zeros(1, *shape), 0.5)}
    rows = {name: {"b1": [], "b64": []} for name in models}
    for _ in range(repeats):  # interleaved
        for name, model in models.items():
            rows[name]["b1"].append(_latency(model, shape, 1, 50))
            rows[name]["b64"].append(64 / _latency(model, shape, 64, 10))
    return {name: {"p50_ms_b1": 1000 * statistics.median(v["b1"]),
                   "images_per_s_b64": statistics.median(v["b64"]),
                   "params": sum(p.numel() for p in models[name].parameters()),
                   "macs": macs_of(models[name], torch.zeros(1, *shape))}
            for name, v in rows.items()}


def channel_pruned(dense, example, sparsity: float):
    """A copy of ``dense`` with ``sparsity`` of each prunable group's channels (lowest L2
    norms) cut out, as a channel-pruned trial's final model is."""
    import copy

    import compress
    from compress import channels

    model = copy.deepcopy(dense)
    groups, _ = channels.channel_groups(model, example)
    compress.attach_masks_(model, lambda m, fqn: fqn in {g.root for g in groups})
    channels.prune_channels_(model, groups, sparsity)
    channels.zero_followers_(model, groups)
    channels.cut_pruned_channels_(model, groups, example)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=tuple(CASES), default="lenet")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = _util.header(f"prune[{args.case}]")

    import torch

    from trainables import TrialConfig

    torch.set_num_threads(args.threads)
    base = TrialConfig().with_overrides([*CASES[args.case], *COMMON,
                                         f"train.threads={args.threads}"])
    training = _util.ratio_rows(_util.interleaved_train_seconds(base, PRUNED, args.repeats),
                                prefix="train ")
    speed = inference(base, args.repeats)
    for name, values in speed.items():
        _util.row(f"infer {name}", **values,
                  ratio_b64=values["images_per_s_b64"] / speed["dense"]["images_per_s_b64"])
    _util.finish(env, {"case": args.case, "training": training, "inference": speed})


if __name__ == "__main__":
    main()
