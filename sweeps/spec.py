"""What a sweep is: the :class:`Sweep` record (base config, search space or points, metric,
where to record it), what a finished sweep returns, and the interruption a sweep can be
resumed from. No Ray import: scripts and studies build these before any cluster work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from sweeps.tracking import default_tracking_uri
from trainables.config import ConfigError, TrialConfig

__all__ = ["Sweep", "SweepOutcome", "SweepInterrupted", "SPACE_PREFIX", "SpaceFn",
           "SUMMARY_METRICS"]


# A search space's own parameters (``trial.suggest_int("space.bits.fc1", ...)``): the
# searcher learns from them, the space folds them into a config field it returns.
SPACE_PREFIX = "space."


SpaceFn = Callable[[Any], "dict[str, Any] | None"]


# The metrics a sweep's table, console summary and parent run show (every metric a trial
# reports reaches its own MLflow run regardless).
SUMMARY_METRICS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "val_acc",
                   "test_acc_q", "images_per_s")


@dataclass(frozen=True)
class Sweep:
    """What to search, how long, and where to record it."""

    name: str
    base: TrialConfig
    # Either a define-by-run search space (Optuna proposes num_samples configs, ASHA stops
    # the poor ones) or explicit points: flat config overrides run exactly as given, each
    # to the end (re-running the best configs with new seeds, grids).
    space: SpaceFn | None = None
    points: tuple[Mapping[str, Any], ...] = ()
    num_samples: int = 8
    max_concurrent: int = 2
    metric: str = "test_acc"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: float = 2.0
    seed: int = 0
    tracking_uri: str = field(default_factory=default_tracking_uri)
    storage_path: str = "ray_results"
    address: str | None = None
    max_failures: int = 0  # Tune restarts of a failed trial, from its last checkpoint
    # Decode (or download) the dataset on the driver first: a missing dataset fails before
    # any trial starts, and concurrent trials then share one cache instead of racing to
    # decode. Turn off where the data exists only on worker nodes.
    prepare_data: bool = True
    callbacks: tuple[Any, ...] = ()  # extra ray.tune.Callback objects (loggers, clocks)
    # Nest this sweep's MLflow run under another run (a study of several sweeps).
    parent_run_id: str | None = None
    run_name: str = ""  # default: <name>-<timestamp>
    kind: str = ""  # the run's kind tag; default: search (space) or points
    # Multi-objective search: (metric, mode) pairs that Optuna's NSGA-II ranks together.
    # ASHA cannot rank several objectives, so such a sweep runs every trial to the end;
    # ``metric`` stays the column the table and the best_* summary use.
    objectives: tuple[tuple[str, str], ...] = ()
    early_stopping: bool = True  # ASHA for a space search; False: every trial to the end
    # Points only: synchronous successive halving (sweeps.halving) at these epochs, the
    # best 1/reduction_factor going on at each; (): every point to its last epoch.
    rungs: tuple[int, ...] = ()
    rung_margin: float = 0.0  # halving also keeps points within this of a rung's cut
    tags: Mapping[str, str] = field(default_factory=dict)  # more tags on the sweep's run
    params: Mapping[str, Any] = field(default_factory=dict)  # more params on the sweep's run
    # The sweep run's name in MLflow (default: run_name, which also names the Tune folder;
    # the run's tag tune_folder keeps that), e.g. "search mnist/cnn/eg".
    title: str = ""
    # best_* metrics on the sweep run: only where "best" means something (one cell).
    log_best: bool = True
    # Size GPU use from the cluster once Ray is up: each worker gets an equal share of its
    # GPUs (--gpus-per-trial auto; nothing where the base config already asks for GPUs).
    auto_gpus: bool = False
    # Copy each trial's final checkpoint into its MLflow run. A study's search trials
    # skip it (their picked configs are re-run with seeds; Tune keeps best + last).
    log_checkpoints: bool = True
    # Resume this sweep run (an interrupted or killed one, see find_resumable): its Tune
    # folder is restored (finished trials are not re-run, the searcher keeps its
    # history) and its MLflow runs are reused.
    resume_run_id: str | None = None

    def _check_rungs(self) -> None:
        epochs = self.base.train.epochs
        if not self.points:
            raise ConfigError("rungs is invalid for a searched space: allowed with points "
                              "(a space search stops early through ASHA)")
        if self.resume_run_id:
            raise ConfigError("rungs is invalid with resume_run_id: Tune does not save the "
                              "halving decisions; allowed a fresh run (a study restarts "
                              "such a cell)")
        if not all(isinstance(r, int) for r in self.rungs) or \
                list(self.rungs) != sorted(set(self.rungs)) or not 1 <= self.rungs[0] or \
                self.rungs[-1] >= epochs:
            raise ConfigError(f"rungs={list(self.rungs)} is invalid: allowed increasing "
                              f"epochs from 1 to train.epochs - 1 ({epochs - 1})")
        if self.reduction_factor != int(self.reduction_factor):
            raise ConfigError(f"reduction_factor={self.reduction_factor} is invalid with "
                              "rungs: allowed a whole number >= 2")

    @property
    def phase(self) -> str:
        """``search`` (trials that choose a config) or ``final`` (re-runs of chosen ones)."""
        return "search" if self.space is not None or self.kind == "search" else "final"

    def __post_init__(self) -> None:
        if (self.space is None) == (not self.points):
            raise ConfigError("a Sweep needs exactly one of space (a define-by-run search) "
                              "or points (explicit configs)")
        for name, low in (("num_samples", 1), ("max_concurrent", 1), ("grace_period", 1),
                          ("max_failures", -1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: allowed >= {low}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode={self.mode!r} is invalid: allowed max or min")
        if self.grace_period > self.base.train.epochs:
            raise ConfigError(f"grace_period={self.grace_period} is invalid: allowed <= "
                              f"train.epochs ({self.base.train.epochs})")
        if self.reduction_factor <= 1:
            raise ConfigError(f"reduction_factor={self.reduction_factor} is invalid: "
                              "allowed > 1")
        if self.rungs:
            self._check_rungs()
        if self.metric.startswith("test_") and not self.base.evaluate.test_each_epoch:
            raise ConfigError(f"evaluate.test_each_epoch=false is invalid with the sweep "
                              f"metric {self.metric}: allowed true (or a val_* metric)")
        for metric, mode in self.objectives:
            if mode not in ("max", "min"):
                raise ConfigError(f"objective {metric} mode={mode!r} is invalid: allowed max "
                                  "or min")
        if len(self.objectives) == 1:
            raise ConfigError("objectives is invalid with one entry: allowed two or more "
                              "(one objective is metric and mode)")


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before its end and can be resumed: Ctrl-C (SIGINT), or, with
    ``cause`` set, a condition no trial gets past (a full disk). Tune's saved state is
    kept, the unfinished runs ended KILLED. A KeyboardInterrupt, so that every level that
    ends runs on Ctrl-C (a study, its cell) does the same here."""

    def __init__(self, run_id: str, cause: str | None = None) -> None:
        super().__init__(run_id)
        self.run_id = run_id
        self.cause = cause


@dataclass
class SweepOutcome:
    best: dict[str, Any]
    best_config: dict[str, Any]
    rows: list[dict[str, Any]]
    parent_run_id: str
    tracking_uri: str
    experiment: str
    results: Any = None  # the ray.tune.ResultGrid: per-epoch histories and checkpoints
