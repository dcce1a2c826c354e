"""Paths a trial reads, made absolute for Tune's trial folders, and the checks that need
the model built on the driver before Ray: ``train.init_from`` (every initial checkpoint
loaded once: a missing file or another architecture fails before Ray; ``runs:/RUN_ID``
fetched from MLflow into the storage), and a prune schedule that has layers to prune.
"""
from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from sweeps.spec import Sweep
from sweeps.tracking import SweepTracker
from trainables.config import ConfigError, TrialConfig
from trainables.data import cache_dir, data_root

__all__ = ["absolute_paths", "RUN_CHECKPOINT", "check_initial_weights",
           "resolve_run_checkpoints", "check_prunable_models"]


def absolute_paths(base: TrialConfig) -> TrialConfig:
    # Tune runs trials inside their trial folders: relative paths must be made absolute.
    paths = {"data.root": str(data_root(base.data).resolve()),
             "data.cache_dir": str(cache_dir(base.data).resolve())}
    for key, value in (("data.extra_test", base.data.extra_test),
                       ("train.init_from", base.train.init_from)):
        if value and not value.startswith(RUN_CHECKPOINT):  # "": unset; runs:/ID: MLflow's
            paths[key] = str(Path(value).expanduser().resolve())
    return base.replace(paths)


RUN_CHECKPOINT = "runs:/"  # train.init_from=runs:/RUN_ID: that MLflow run's checkpoint


def check_initial_weights(base: TrialConfig, points: tuple[Mapping[str, Any], ...],
                          build: bool = True) -> None:
    """Every ``train.init_from`` the trials will load, loaded once into its model here
    (``build=False``, where the data is not on the driver: the file only): a missing file
    or another architecture stops the sweep before Ray starts. A ``runs:/`` value is
    checked once :func:`resolve_run_checkpoints` fetched it."""
    from trainables.initial_weights import load_initial_weights, read_initial_weights
    from trainables.models import model_for_trial

    configs = [base.replace(p) for p in points] if points else [base]
    seen = set()
    for cfg in configs:
        key = (cfg.data, cfg.model, cfg.train.init_from)
        if not cfg.train.init_from or cfg.train.init_from.startswith(RUN_CHECKPOINT) or \
                key in seen:
            continue
        seen.add(key)
        if not build:
            read_initial_weights(cfg.train.init_from)
            continue
        load_initial_weights(model_for_trial(cfg), cfg.train.init_from)


def check_prunable_models(base: TrialConfig, points: tuple[Mapping[str, Any], ...]) -> None:
    """Every pruned config's model has layers to prune, and every LC config's compression
    map names layers of its model that each compression fits (built once per data, model
    and section here on the driver): such a config stops before Ray."""
    from trainables.models import data_shape_of, example_input, model_for_trial
    from trainables.stages.lc import lc_tasks
    from trainables.stages.prune import check_prunable

    seen = set()
    for cfg in ([base.replace(p) for p in points] if points else [base]):
        key = (cfg.data, cfg.model, cfg.prune, cfg.lc)
        if key in seen or (cfg.prune.schedule == "none" and not cfg.lc.enabled):
            continue
        seen.add(key)
        shape = data_shape_of(cfg)
        model = model_for_trial(cfg, shape)
        if cfg.prune.schedule != "none":
            check_prunable(cfg.prune, model, example_input(shape))
        if cfg.lc.enabled:
            lc_tasks(cfg, model)


def resolve_run_checkpoints(sweep: Sweep, base: TrialConfig, tracker: SweepTracker
                            ) -> tuple[Sweep, TrialConfig]:
    """``train.init_from=runs:/RUN_ID`` (in the base config or a point): the final
    checkpoint that run logged (``checkpoint/state.pt``), downloaded once into the sweep's
    storage (``<storage_path>/init_from/RUN_ID/``, shared by the nodes of a cluster), so
    a QAT sweep fine-tunes an FP32 trial by its run id. Errors name the field."""
    def local(value: str) -> str:
        if not value.startswith(RUN_CHECKPOINT):
            return value
        run_id = value[len(RUN_CHECKPOINT):].strip("/")
        if not re.fullmatch(r"[0-9A-Za-z_-]+", run_id):
            raise ConfigError(f"train.init_from={value!r} is invalid: allowed runs:/RUN_ID "
                              "(an MLflow run id: letters, digits, - and _)")
        folder = Path(sweep.storage_path).resolve() / "init_from" / run_id
        if not (folder / "state.pt").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # whole file, or none
                try:
                    got = tracker.client.download_artifacts(run_id, "checkpoint/state.pt",
                                                            tmp)
                except Exception as exc:  # MLflow raises several kinds: say what is missing
                    raise ConfigError(
                        f"train.init_from={value!r} is invalid: run {run_id} of "
                        f"{tracker.tracking_uri} has no checkpoint/state.pt artifact ({exc}); "
                        "allowed runs:/ID of a trial run that logged its checkpoint"
                    ) from None
                Path(got).replace(folder / "state.pt")
        return str(folder)

    points = tuple({**p, "train.init_from": local(p["train.init_from"])}
                   if "train.init_from" in p else p for p in sweep.points)
    base = base.replace({"train.init_from": local(base.train.init_from)})
    return dataclasses.replace(sweep, points=points), base
