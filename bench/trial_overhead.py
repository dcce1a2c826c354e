"""What running a training as a qsweep trial costs: the same MNIST training (same model,
batch, steps, 2 threads) as (a) a plain PyTorch loop, (b) a qsweep trial through Ray Tune
with MLflow logging, (c) Ray Train TorchTrainer with 1 and 2 workers. Per path: seconds
from start to the first report, and steady-state images/s between reports.

    QSWEEP_DATA=../shared/data python bench/trial_overhead.py [--train-subset 30000]
Goals: b/a >= 0.95 steady state; fixed cost of (b) <= 5 s (its first trial starts a
process; a sweep's later trials reuse it: their fixed cost is printed too).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import _util
import torch

MODEL = ["model.name=lenet", "model.channels=[16,32]", "model.hidden=[128]",
         "optim.lr=0.1", "data.batch_size=128", "data.name=mnist"]


def config(args: argparse.Namespace, *extra: str):
    from trainables import TrialConfig
    from trainables.data import data_root

    root = data_root(TrialConfig().data).resolve()
    return TrialConfig().with_overrides([*MODEL, f"data.root={root}",
                                         f"data.train_subset={args.train_subset}",
                                         f"train.epochs={args.epochs}", *extra])


def rates(start: float, times: list[float], images: int) -> tuple[float, float]:
    """(seconds to first report, steady images/s between the first and last report)."""
    steady = images * (len(times) - 1) / (times[-1] - times[0])
    return times[0] - start, steady


def plain_loop(args: argparse.Namespace) -> tuple[float, float]:
    """(a) The same model, data, batches and schedule in a loop with no qsweep or Ray."""
    from trainables.data import load_splits
    from trainables.loop import build_schedule
    from trainables.models import build_model

    start = time.time()
    cfg = config(args)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    splits = load_splits(cfg.data, seed=0)
    model = build_model(cfg.model, 1, 28, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    loader = splits.loader("train", 128, torch.device("cpu"), seed=0)
    test = splits.loader("test", 1000, torch.device("cpu"), seed=0)
    sched = build_schedule(opt, cfg.optim, args.epochs, len(loader))
    loss_fn, times = torch.nn.CrossEntropyLoss(), []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        model.train()
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            sum((model(x).argmax(1) == y).sum().item() for x, y in test)
        times.append(time.time())
    return rates(start, times, len(splits.train.y))


def tune_trial(args: argparse.Namespace, tmp: Path) -> tuple[float, list[float], float]:
    """(b) run_sweep of ``--trials`` identical trials one at a time (points, as a study's
    search runs them): Tune function trials in reused processes + driver-side MLflow.
    Returns (ray.init seconds, per trial seconds from its start to its first report,
    steady images/s of the fastest trial)."""
    import ray
    from ray import tune

    import sweeps.runner as runner
    from sweeps.spec import Sweep

    t0 = time.time()
    if not ray.is_initialized():
        ray.init(num_cpus=2, logging_level="WARNING")
    ray_init_s = time.time() - t0
    starts: dict[str, float] = {}
    reports: dict[str, list[float]] = {}

    class Clock(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            starts.setdefault(trial.trial_id, time.time())

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            reports.setdefault(trial.trial_id, []).append(time.time())

    cfg = config(args, "train.cpus_per_worker=2", "train.threads=2")
    fit = time.time()
    runner.run_sweep(Sweep(
        name="bench-overhead", base=cfg, points=({"optim.lr": 0.1},) * args.trials,
        max_concurrent=1, tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
        storage_path=str(tmp / "ray"), callbacks=(Clock(),)))
    order = sorted(reports, key=lambda t: reports[t][0])
    # The first trial's clock starts at fit (its process starts after on_trial_start).
    firsts = [reports[t][0] - (fit if i == 0 else starts[t]) for i, t in enumerate(order)]
    steady = max(rates(0.0, reports[t], args.train_subset)[1] for t in order)
    return ray_init_s, firsts, steady


def torch_trainer(args: argparse.Namespace, tmp: Path, workers: int) -> tuple[float, float]:
    """(c) TorchTrainer (Ray Train V2) running the project's loop on N workers."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = config(args, f"train.num_workers={workers}", "train.threads=2" if workers == 1
                 else "train.threads=1", f"train.cpus_per_worker={2 / workers}")
    start = time.time()
    trainer = TorchTrainer(
        _timed_loop, train_loop_config=cfg.to_flat(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=f"bench-{workers}w", storage_path=str(tmp)))
    result = trainer.fit()
    times = list(result.metrics_dataframe["wall_time"])
    return rates(start, times, args.train_subset)


def _timed_loop(config: dict[str, Any]) -> None:
    from trainables import TrialConfig, run_trial
    from trainables.sessions import RayTrainSession

    class Timed(RayTrainSession):
        def report(self, metrics, checkpoint_dir):
            super().report({**metrics, "wall_time": time.time()}, checkpoint_dir)

    run_trial(TrialConfig.from_flat(config), Timed())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-subset", type=int, default=30000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="of (a) and (b); best kept")
    parser.add_argument("--trials", type=int, default=3,
                        help="trials in (b)'s sweep, one at a time in a reused process")
    args = parser.parse_args()
    env = _util.header("trial_overhead")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        from trainables.data import prepare_data

        prepare_data(config(args).data)  # the decoded cache exists for every path
        a_runs, b_runs = [], []
        for _ in range(args.repeats):  # (a) and (b) interleaved: noise hits both alike
            a_runs.append(plain_loop(args))
            b_runs.append(tune_trial(args, tmp))
        ray_init_s = b_runs[0][0]
        a_first, a_rate = min(r[0] for r in a_runs), max(r[1] for r in a_runs)
        b_first, b_rate = min(r[1][0] for r in b_runs), max(r[2] for r in b_runs)
        # A later trial of the sweep: its process (and imports) reused.
        b_next = min(min(r[1][1:], default=math.nan) for r in b_runs)
        c1_first, c1_rate = torch_trainer(args, tmp, 1)
        c2_first, c2_rate = torch_trainer(args, tmp, 2)
    print(f"  ray.init (once per sweep): {ray_init_s:.1f} s; (a), (b): best of {args.repeats}")
    _util.row("(a) plain loop", first_report_s=a_first, images_per_s=round(a_rate))
    _util.row("(b) qsweep trial (Tune + MLflow)", first_report_s=b_first,
              images_per_s=round(b_rate), rate_ratio_b_over_a=b_rate / a_rate,
              fixed_cost_s=b_first - a_first)
    _util.row("(b) a later trial, process reused", first_report_s=b_next,
              fixed_cost_s=b_next - a_first)
    _util.row("(c) TorchTrainer 1 worker", first_report_s=c1_first,
              images_per_s=round(c1_rate), rate_ratio_over_a=c1_rate / a_rate)
    _util.row("(c) TorchTrainer 2 workers", first_report_s=c2_first,
              images_per_s=round(c2_rate), rate_ratio_over_a=c2_rate / a_rate)
    _util.finish(env, {
        "ray_init_s": round(ray_init_s, 2),
        "first_report_s": {"a": round(a_first, 2), "b": round(b_first, 2),
                           "c1": round(c1_first, 2), "c2": round(c2_first, 2)},
        "images_per_s": {"a": round(a_rate), "b": round(b_rate), "c1": round(c1_rate),
                         "c2": round(c2_rate)},
        "ratio_b_over_a": round(b_rate / a_rate, 3),
        "fixed_cost_b_s": round(b_first - a_first, 2),
        "fixed_cost_b_later_trial_s": round(b_next - a_first, 2),
        "goals_met": {"ratio": b_rate / a_rate >= 0.95, "fixed_cost": b_first - a_first <= 5},
    })


if __name__ == "__main__":
    main()
