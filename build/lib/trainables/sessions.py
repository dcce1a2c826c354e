"""Where a trial's per-epoch reports and checkpoints go.

- :class:`LocalSession`: no Ray; keeps reports in a list and the newest checkpoint in a
  folder. Tests and plain scripts use it; it can resume from a checkpoint folder.
- :class:`TuneSession`: a Ray Tune function trial (one worker, no worker group).
- :class:`RayTrainSession`: a Ray Train worker; every rank reports every epoch (Ray Train
  requires it), rank 0 with the checkpoint.

Ray is imported lazily so ``LocalSession`` works without a Ray runtime.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["Session", "LocalSession", "TuneSession", "RayTrainSession", "STATE_FILE",
           "ARTIFACTS_DIR", "load_state_file", "quiet_checkpoint_logs"]

STATE_FILE = "state.pt"
# Files a trial's stages wrote at its end, inside the last reported checkpoint folder:
# the MLflow callback logs them as the trial run's own artifacts.
ARTIFACTS_DIR = "artifacts"


def quiet_checkpoint_logs() -> None:
    """Ray logs "Checkpoint successfully created" per epoch and worker, burying the
    progress; call in every Ray worker process that reports checkpoints."""
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)


def load_state_file(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The training state saved in a checkpoint folder (tensors and plain values only);
    None for a folder without one (the last report of a trial that keeps no checkpoints
    carries only its stages' files)."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        return None
    return torch.load(path, weights_only=True, map_location="cpu")


class Session(Protocol):
    world_rank: int
    local_rank: int
    world_size: int

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...

    def load_state(self) -> dict[str, Any] | None: ...


class LocalSession:
    """Reports to ``self.reports``; keeps the newest checkpoint in ``checkpoint_dir``.

    ``resume_from`` is a checkpoint folder to start from. ``stop_after`` ends the run
    (raising :class:`InterruptedError`) after that many reports: a stand-in for a killed
    worker in resume tests.
    """

    world_rank = local_rank = 0
    world_size = 1

    def __init__(self, checkpoint_dir: str | os.PathLike[str] | None = None,
                 resume_from: str | os.PathLike[str] | None = None,
                 stop_after: int | None = None) -> None:
        self.reports: list[dict[str, Any]] = []
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resume_from = Path(resume_from) if resume_from else None
        self.stop_after = stop_after

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and self.checkpoint_dir:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            shutil.copytree(checkpoint_dir, self.checkpoint_dir)
        if self.stop_after is not None and len(self.reports) >= self.stop_after:
            raise InterruptedError(f"stopped after {self.stop_after} reports")

    def load_state(self) -> dict[str, Any] | None:
        return load_state_file(self.resume_from) if self.resume_from else None


class TuneSession:
    """Inside a Ray Tune function trial: ``ray.tune.report`` with a ``ray.tune.Checkpoint``."""

    world_rank = local_rank = 0
    world_size = 1

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def load_state(self) -> dict[str, Any] | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_state_file(directory)


FAULT_ENV = "QSWEEP_FAULT_KILL_WORKER"


def _injected_worker_kill(rank: int, epoch: int) -> None:
    """Fault injection for the failure tests (as Ray's own RAY_testing_* variables):
    ``QSWEEP_FAULT_KILL_WORKER=RANK:EPOCH:MARKER`` SIGKILLs that DDP rank's process after
    it reported that epoch, once (the marker file remembers). Unset: nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want_rank, want_epoch, marker = spec.split(":", 2)
    if (rank, epoch) == (int(want_rank), int(want_epoch)) and not os.path.exists(marker):
        Path(marker).write_text(f"killed rank {rank} after epoch {epoch}")
        os.kill(os.getpid(), signal.SIGKILL)


class RayTrainSession:
    """Inside a Ray Train worker (Train V2): ``ray.train.report`` on every rank."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.local_rank = context.get_local_rank()
        self.world_size = context.get_world_size()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        _injected_worker_kill(self.world_rank, int(metrics.get("epoch", 0)))

    def load_state(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return load_state_file(directory)
