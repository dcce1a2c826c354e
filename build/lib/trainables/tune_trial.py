"""A qsweep trial as a Ray Tune trainable.

One worker (``train.num_workers == 1``): the Tune function trial trains in-process, so a
small trial costs seconds. Several workers: the trial function builds and fits a Ray
Train V2 ``TorchTrainer`` (DDP; gloo on CPU, NCCL on GPU) whose reports reach Tune through
``TuneReportCallback`` (Ray 2.60 no longer accepts a trainer inside ``tune.Tuner``).

Example::

    tuner = tune.Tuner(trainable(), param_space=TrialConfig().to_flat())
"""

from __future__ import annotations

from typing import Any

from ray import tune

from trainables.config import TrialConfig
from trainables.loop import run_trial, train_loop_per_worker
from trainables.sessions import TuneSession, quiet_checkpoint_logs

__all__ = ["qsweep_trial", "trial_resources", "trainable"]


def qsweep_trial(config: dict[str, Any]) -> None:
    """The Tune function: rebuild the config, train in-process or through a TorchTrainer."""
    quiet_checkpoint_logs()
    cfg = TrialConfig.from_flat(config)
    if cfg.train.num_workers == 1:
        run_trial(cfg, TuneSession())
    else:
        _fit_torch_trainer(cfg)


def _fit_torch_trainer(cfg: TrialConfig) -> None:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    context = tune.get_context()
    t = cfg.train
    per_worker = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        per_worker["GPU"] = t.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_flat(),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            # Same name and storage on a Tune restart: Train resumes from its checkpoint.
            name=f"train-{context.get_trial_id()}",
            storage_path=context.get_trial_dir(),
            callbacks=[TuneReportCallback()],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()


def trial_resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """In-process trials hold their worker's CPUs/GPUs. A DDP trial's function holds no CPU:
    its TorchTrainer asks for the workers' resources itself (a trial that held one of two
    CPUs while its trainer asked for two more would never schedule). Ray refuses an empty
    bundle, so the function's bundle asks for one byte of memory."""
    t = TrialConfig.from_flat(config).train
    if t.num_workers > 1:
        return tune.PlacementGroupFactory([{"memory": 1}])
    bundle = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        bundle["GPU"] = t.gpus_per_worker
    return tune.PlacementGroupFactory([bundle])


def trainable():
    """The trial function with its per-config resources, ready for ``tune.Tuner``."""
    return tune.with_resources(qsweep_trial, trial_resources)
