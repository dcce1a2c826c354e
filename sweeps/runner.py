"""Run a sweep: Optuna (define-by-run, TPE) proposes, ASHA stops, MLflow records; or run
explicit points (a fixed design, seed re-runs), each trial to its last epoch.

Every sweep script describes a :class:`Sweep` (a base config, a search space function or
points, the metric) and calls :func:`run_sweep`; a study of many cells uses
:mod:`sweeps.study`, which runs one sweep per cell. Before any Ray work starts, the space is sampled
once and every proposed config validated, and the MLflow store is opened: bad input fails
in a second with the field's name, not minutes later inside a worker.

Example::

    def space(trial):
        trial.suggest_float("optim.lr", 1e-3, 0.5, log=True)

    outcome = run_sweep(Sweep(name="demo", base=TrialConfig(), space=space, num_samples=4))
    print(outcome.best["test_acc"])
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.search.optuna import OptunaSearch

from sweeps.outcome import diverged
from sweeps.tracking import (
    MLflowSweepCallback,
    SweepTracker,
    default_tracking_uri,
    format_value,
    last_error_line,
    plot_sweep,
    rows_to_csv,
    rows_to_markdown,
)
from trainables.config import ConfigError, TrialConfig
from trainables.data import cache_dir, data_root, prepare_data

__all__ = ["Sweep", "SweepOutcome", "SweepInterrupted", "run_sweep", "validate_space",
           "validate_points", "find_resumable",
           "rows_to_csv", "rows_to_markdown",
           "mlflow_ui_command"]

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


class NoSpaceLeft(Exception):
    """A trial failed writing (its checkpoint, its results) because the disk is full."""


class DiskFullWatch(Callback):
    """Stops the sweep at the first trial failure that is a full disk (errno 28 in its
    error): every later checkpoint would fail the same way, and Tune would go on starting
    and retrying trials, each failing (measured: all 4 trials of a smoke sweep, then a
    traceback from Tune reading a truncated error file). Raised from a callback, the
    error leaves ``tuner.fit()`` (wrapped in a TuneError: ``full`` says what it was);
    Tune's last saved state stays resumable. Called before the MLflow callback, and on
    the failure Tune would retry too (on_trial_recover): the trial is then unfinished,
    and --resume goes on with it from its last checkpoint."""

    def __init__(self) -> None:
        self.full: str | None = None  # the trial's error line, once the disk was full

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._check(trial)

    def _check(self, trial: Any) -> None:
        line = last_error_line(trial)
        if "[Errno 28]" in line or "No space left on device" in line:
            self.full = line
            raise NoSpaceLeft(line)


@dataclass
class SweepOutcome:
    best: dict[str, Any]
    best_config: dict[str, Any]
    rows: list[dict[str, Any]]
    parent_run_id: str
    tracking_uri: str
    experiment: str
    results: Any = None  # the ray.tune.ResultGrid: per-epoch histories and checkpoints


def validate_space(base: TrialConfig, space: SpaceFn, samples: int = 5) -> list[str]:
    """Sample the define-by-run space a few times; every config it proposes must be valid.

    Returns the keys the space searched (for the sweep's comparison table)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    keys: dict[str, None] = {}
    returned: dict[str, set[str]] = {}
    for _ in range(samples):
        trial = study.ask()
        constants = space(trial)
        if constants is None:
            constants = {}
        if not isinstance(constants, dict):
            raise ConfigError(f"the search space function returned {constants!r}: allowed "
                              "None or a dict of constant config keys (define-by-run)")
        params = {k: v for k, v in trial.params.items() if not k.startswith(SPACE_PREFIX)}
        try:
            base.replace({**params, **constants})
        except ConfigError as exc:
            raise ConfigError(f"the search space proposes an invalid config: {exc}") from None
        study.tell(trial, 0.0)
        keys.update(dict.fromkeys(params))
        for key, value in constants.items():
            returned.setdefault(key, set()).add(repr(value))
    # A returned field that varies is searched too (built from space.* parameters).
    keys.update(dict.fromkeys(k for k, values in returned.items() if len(values) > 1))
    return list(keys)


def validate_points(base: TrialConfig, points: tuple[Mapping[str, Any], ...]) -> list[str]:
    """Every explicit point must make a valid config; returns the keys that vary."""
    configs = []
    for i, point in enumerate(points):
        try:
            configs.append(base.replace(point).to_flat())
        except ConfigError as exc:
            raise ConfigError(f"point {i} of the sweep is an invalid config: {exc}") from None
    return [k for k in configs[0] if len({repr(c[k]) for c in configs}) > 1]


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
    from trainables.data import load_splits
    from trainables.loop import load_initial_weights, read_initial_weights
    from trainables.models import build_model

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
        splits = load_splits(cfg.data, seed=cfg.train.seed)
        model = build_model(cfg.model, splits.in_channels, splits.image_size,
                            splits.num_classes)
        load_initial_weights(model, cfg.train.init_from)


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


class ConsoleProgress(Callback):
    """One line per trial start, epoch report and ending. (Tune's own output prints every
    trial's whole config; this prints what a researcher watches.)"""

    def __init__(self, tracking: MLflowSweepCallback, searched: list[str], metric: str,
                 epochs: int) -> None:
        self.tracking = tracking  # it already knows how each trial ended
        self.searched, self.metric, self.epochs = searched, metric, epochs
        self.start = time.time()

    def _say(self, trial: Any, text: str) -> None:
        print(f"[{time.time() - self.start:6.0f}s] {trial} {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = " ".join(f"{k}={format_value(trial.config.get(k))}" for k in self.searched)
        self._say(trial, f"started: {params}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        self._say(trial, f"epoch {result.get('epoch')}/{self.epochs} "
                         f"{self.metric}={format_value(result.get(self.metric, float('nan')))} "
                         f"train_loss={format_value(result.get('train_loss', float('nan')))} "
                         f"{format_value(result.get('images_per_s', 0.0))} img/s")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.tracking.diverged(trial):
            ending = "diverged (non-finite training loss): stopped"
        elif self.tracking.status(trial) == "FINISHED":
            ending = "finished"
        else:
            ending = "stopped early by the scheduler"
        self._say(trial, ending)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trial, f"FAILED: see {trial.error_file}")


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runs need no token
    # Short trials checkpoint every few seconds, and Tune then warns at every snapshot of
    # the experiment state; the snapshots are cheap here (small state, local disk).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # What --resume restores after a killed driver: Tune's default saves it every 10 s or
    # more, so trials that ended in those seconds would run again (from their last
    # checkpoint; an ASHA-stopped one would train on). Every second costs milliseconds.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # With no address, ray.init joins a cluster already running on this node (as under
    # `ray submit`) and otherwise starts an embedded one; but it would also try, and fail,
    # to join a dead one whose address file a crash left behind.
    if address is None and not os.environ.get("RAY_ADDRESS") and \
            not ray_start_cluster_answers():
        address = "local"
    ray.init(address=address, configure_logging=True,
             logging_level="WARNING", log_to_driver=True, **_own_cluster_api(address))


def gpu_share(total_gpus: float, max_concurrent: int, num_workers: int) -> float:
    """GPUs per worker when ``max_concurrent`` trials of ``num_workers`` workers share
    ``total_gpus``: a whole GPU each where there are enough (DDP wants whole ones), else
    the largest 1/k that fits; 0 without GPUs."""
    if total_gpus < 1:
        return 0.0
    if num_workers > 1:  # NCCL refuses two ranks on one GPU: whole GPUs, else CPU (gloo)
        return 1.0 if total_gpus >= num_workers else 0.0
    share = total_gpus / (max_concurrent * num_workers)
    return 1.0 if share >= 1 else 1.0 / math.ceil(1 / share)


def autoscaler_gpus(config_path: Path) -> float:
    """The GPUs an autoscaling cluster can add: from the launcher's config (the head keeps
    it as ~/ray_bootstrap_config.yaml), each node type's declared GPUs x its max_workers,
    at most the cluster's max_workers nodes of the largest. 0 without such a file."""
    import yaml

    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return 0.0
    types = list((config.get("available_node_types") or {}).values())
    per_node = [float((t.get("resources") or {}).get("GPU", 0)) for t in types]
    total = sum(g * int(t.get("max_workers", 0)) for g, t in zip(per_node, types, strict=True))
    cap = int(config.get("max_workers", 0)) * max(per_node, default=0.0)
    return min(total, cap) if cap else total


def _with_cluster_gpus(sweep: Sweep, base: TrialConfig, tracker: SweepTracker,
                       parent: str) -> TrialConfig:
    import ray

    if not sweep.auto_gpus or base.train.use_gpu:
        return base
    # An autoscaling cluster (ray submit cluster/gpu.yaml) may have no GPU node yet.
    total = ray.cluster_resources().get("GPU", 0.0) or \
        autoscaler_gpus(Path.home() / "ray_bootstrap_config.yaml")
    share = gpu_share(total, sweep.max_concurrent, base.train.num_workers)
    tracker.log_params(parent, {"sweep.cluster_gpus": total, "sweep.gpus_per_worker": share})
    if share == 0:
        return base
    print(f"--gpus-per-trial auto: {share:g} GPU per worker ({total:g} GPUs in the cluster, "
          f"{sweep.max_concurrent} trials at once)", flush=True)
    return base.replace({"train.use_gpu": True, "train.gpus_per_worker": share})


def _own_cluster_api(address: str | None) -> dict[str, Any]:
    """An embedded cluster's dashboard port, told to every process it starts: Ray's state
    API (Train V2's PlacementGroupCleaner uses it) otherwise looks for "the" local Ray
    and, with a second sweep's embedded cluster on this machine, fails with "Found
    multiple active Ray instances". Nothing where ray.init joins a running cluster."""
    from ray._private.services import canonicalize_bootstrap_address

    if address and "://" in address or os.environ.get("RAY_ADDRESS") or \
            canonicalize_bootstrap_address(address) is not None:
        return {}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Through the job's runtime env (its actors, the cleaner among them), not os.environ:
    # nothing outlives this cluster.
    return {"dashboard_port": port, "runtime_env": {"env_vars": {
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}}


def ray_start_cluster_answers() -> bool:
    """A `ray start` cluster on this node that answers (the file it leaves behind stays
    after a crash or a killed node: its address must be checked, not just the file).
    Where Ray keeps the file: /tmp/ray, or $RAY_TMPDIR/ray (or $TMPDIR/ray) when set."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        host, port = path.read_text().strip().rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except (OSError, ValueError):
        return False


def _tuner(sweep: Sweep, base: TrialConfig, callback: MLflowSweepCallback, run_name: str,
           searched: list[str]):
    from ray import tune

    from trainables.tune_trial import trainable

    # Explicit points are whole configs: Tune warns, key by key, that each differs from
    # the base it is laid over (dozens of lines per cell); that is the point of them.
    logging.getLogger("ray.tune.search.variant_generator").setLevel(logging.ERROR)
    searcher, scheduler, num_samples = _search(sweep, base)
    callbacks = _callbacks(sweep, base, callback, searched)
    return tune.Tuner(
        trainable(),
        param_space=base.to_flat(),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                    num_samples=num_samples,
                                    max_concurrent_trials=None if sweep.points
                                    else sweep.max_concurrent,
                                    trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=str(Path(sweep.storage_path).resolve()),
            callbacks=callbacks,
            # Bounded disk: per trial the best checkpoint by the sweep's metric and the
            # latest (Tune never deletes the latest: restarts and --resume need it).
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=sweep.metric,
                checkpoint_score_order=sweep.mode),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            verbose=0,  # ConsoleProgress prints the progress
        ),
    )


def _callbacks(sweep: Sweep, base: TrialConfig, callback: MLflowSweepCallback,
               searched: list[str]) -> list[Any]:
    return [DiskFullWatch(), callback,
            ConsoleProgress(callback, searched, sweep.metric, base.train.epochs),
            *_finite_tensorboard_logger(), *sweep.callbacks]


class _FiniteTBXLogger(TBXLoggerCallback):
    """Tune's TensorBoard logger, minus non-finite values: a diverged epoch reports +inf
    losses, and tensorboardX prints "NaN or Inf found in input tensor" for each. (Given
    one, Tune adds no default TensorBoard logger of its own.)"""

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        finite = {k: v for k, v in result.items()
                  if not (isinstance(v, float) and not math.isfinite(v))}
        super().log_trial_result(iteration, trial, finite)


def _finite_tensorboard_logger() -> list[Any]:
    try:
        return [_FiniteTBXLogger()]
    except ImportError:  # no tensorboardX: Tune logs CSV and JSON only
        return []


class DivergenceAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, told the worst value for a diverged trial's non-finite
    objective (-inf to maximize, +inf to minimize): Optuna learns from it, where a NaN
    is refused ("The value nan is not acceptable") and the trial is lost to TPE/NSGA-II.
    A diverged trial's quantized or rounded metrics are NaN (its weights are)."""

    def suggest(self, trial_id: str) -> dict | None:
        """The config Optuna proposes, without the space's own parameters (``space.*``):
        a space that searches values no config field holds one by one (a bit width per
        layer) suggests them as ``space.NAME`` and returns the config field they make
        (``quant.layer_bits``); Optuna keeps learning from them."""
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        return {k: v for k, v in config.items() if not k.startswith(SPACE_PREFIX)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if result and result.get("diverged") == 1:
            result = worst_where_nonfinite(result, self._metric, self._mode)
        super().on_trial_complete(trial_id, result=result, error=error)


def worst_where_nonfinite(result: Mapping[str, Any], metric: str | list[str],
                          mode: str | list[str]) -> dict[str, Any]:
    metrics = [metric] if isinstance(metric, str) else list(metric)
    modes = [mode] * len(metrics) if isinstance(mode, str) else list(mode)
    out = dict(result)
    for key, direction in zip(metrics, modes, strict=True):
        value = out.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            out[key] = -math.inf if direction == "max" else math.inf
    return out


def _search(sweep: Sweep, base: TrialConfig) -> tuple[Any, Any, int]:
    """(searcher, scheduler, num_samples): Optuna TPE + ASHA for a space; the points in
    order, each run to the end, for explicit points."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sweep.points:
        points = [absolute_paths(base.replace(p)).to_flat() for p in sweep.points]
        # Its own limit: Tune ignores max_concurrent_trials for this search algorithm
        # ("max_concurrent_trials will be ignored") and would start every point at once.
        return (BasicVariantGenerator(points_to_evaluate=points,
                                      max_concurrent=sweep.max_concurrent),
                FIFOScheduler(), len(points))
    if sweep.objectives:
        metrics, modes = zip(*sweep.objectives, strict=True)
        searcher = DivergenceAwareOptunaSearch(
            space=sweep.space, metric=list(metrics), mode=list(modes),
            # Optuna's default population (50) would leave a sweep of tens of trials in
            # its random first generation.
            sampler=optuna.samplers.NSGAIISampler(
                seed=sweep.seed, population_size=max(2, min(50, sweep.num_samples // 4))))
        return searcher, FIFOScheduler(), sweep.num_samples
    searcher = DivergenceAwareOptunaSearch(
        space=sweep.space, metric=sweep.metric, mode=sweep.mode,
        sampler=optuna.samplers.TPESampler(seed=sweep.seed))
    if not sweep.early_stopping:
        return searcher, FIFOScheduler(), sweep.num_samples
    scheduler = ASHAScheduler(time_attr="training_iteration", metric=sweep.metric,
                              mode=sweep.mode, max_t=base.train.epochs,
                              grace_period=sweep.grace_period,
                              reduction_factor=sweep.reduction_factor)
    return searcher, scheduler, sweep.num_samples


def _fixed(sweep: Sweep, base: TrialConfig) -> TrialConfig:
    """The config whose unvaried fields every trial shares: the base with the first
    point (its constants are every point's) or with the space's constants."""
    if sweep.points:
        return base.replace(sweep.points[0])
    import optuna

    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    return base.replace(sweep.space(trial) or {})


def _describe_search(sweep: Sweep) -> tuple[str, str]:
    """(searcher, scheduler) as the sweep run's params say them."""
    if sweep.points:
        return "points (each as given)", "FIFO (every trial to its last epoch)"
    if sweep.objectives:
        return f"Optuna NSGA-II (seed {sweep.seed})", "FIFO (every trial to its last epoch)"
    searcher = f"Optuna TPE (seed {sweep.seed})"
    if not sweep.early_stopping:
        return searcher, "FIFO (every trial to its last epoch)"
    return searcher, (f"ASHA (grace {sweep.grace_period} epochs, reduction "
                      f"{sweep.reduction_factor:g})")


def space_ranges(space: SpaceFn, samples: int = 20) -> dict[str, str]:
    """``search.<key>`` -> the range Optuna samples it from (``0.001..0.5 log``, or the
    choices), over a few samples of a define-by-run space (conditional keys included)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ranges: dict[str, dict[str, None]] = {}  # key -> every distinct range (conditional)
    for _ in range(samples):
        trial = study.ask()
        constants = space(trial) or {}
        for key, dist in trial.distributions.items():
            if hasattr(dist, "choices"):
                text = "one of " + ", ".join(map(str, dist.choices))
            else:
                log = " log" if getattr(dist, "log", False) else ""
                text = f"{dist.low:g}..{dist.high:g}{log}"
            ranges.setdefault(f"search.{key}", {})[text] = None
        for key, value in constants.items():
            ranges.setdefault(f"search.{key}", {})[f"= {value}"] = None
        study.tell(trial, 0.0)
    # A returned value that varies is built from the space's own parameters (space.*):
    # their ranges say what is searched, not a list of sampled values.
    return {key: "built from search.space.*" if len(texts) > 1 and
            all(t.startswith("= ") for t in texts) else " | ".join(texts)
            for key, texts in ranges.items()}


def _trial_name(trial: Any) -> str:
    # Tune's default names spell out every config key: too long for paths and the UI.
    return f"trial_{trial.trial_id}"


def run_sweep(sweep: Sweep) -> SweepOutcome:
    """Validate, run the Tune search, and record the sweep as a parent MLflow run."""
    base = absolute_paths(sweep.base)
    if sweep.points:
        searched = validate_points(base, sweep.points)
        datasets = {base.replace(p).data for p in sweep.points}
        design = {"sweep.design": "points"}
    else:
        searched = validate_space(base, sweep.space)
        datasets = {base.data}
        design = {"sweep.design": "optuna", **space_ranges(sweep.space)}
    if sweep.prepare_data:
        for data in datasets:
            prepare_data(data)
    check_initial_weights(base, sweep.points, build=sweep.prepare_data)
    tracker = SweepTracker(sweep.tracking_uri, sweep.name)  # fails now if the store is bad
    if RUN_CHECKPOINT in repr((base.train.init_from, sweep.points)):
        sweep, base = resolve_run_checkpoints(sweep, base, tracker)
        check_initial_weights(base, sweep.points, build=sweep.prepare_data)
    if sweep.resume_run_id:
        return _resume(sweep, base, tracker, searched)
    # The MLflow parent run and the Tune run folder share this name.
    run_name = sweep.run_name or f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    # Locked before the MLflow run exists: a second driver on this folder stops with an
    # error and leaves no run behind.
    with driver_lock(Path(sweep.storage_path).resolve() / run_name / ".driver.lock",
                     f"sweep {run_name}"):
        return _run_new(sweep, base, tracker, searched, design, run_name)


def _run_new(sweep: Sweep, base: TrialConfig, tracker: SweepTracker, searched: list[str],
             design: dict[str, str], run_name: str) -> SweepOutcome:
    nested = {"mlflow.parentRunId": sweep.parent_run_id} if sweep.parent_run_id else {}
    searcher, scheduler = _describe_search(sweep)
    parent = tracker.start_sweep(
        sweep.title or run_name,
        params={"sweep.num_samples": len(sweep.points) or sweep.num_samples,
                "sweep.metric": sweep.metric,
                "sweep.mode": sweep.mode, "sweep.max_concurrent": sweep.max_concurrent,
                "sweep.searcher": searcher, "sweep.scheduler": scheduler,
                "sweep.seed": sweep.seed, "sweep.varied": ",".join(searched), **design,
                **sweep.params,
                # The fixed fields as the trials ran them (a point's constants included);
                # a searched field's base value is not what ran.
                **{k: v for k, v in _fixed(sweep, base).tracked_params().items()
                   if k not in searched}},
        tags={"sweep": sweep.name, "kind": sweep.kind or ("points" if sweep.points else "search"),
              "phase": sweep.phase, "tune_folder": run_name, **sweep.tags, **nested})
    callback = MLflowSweepCallback(tracker, varied=searched, phase=sweep.phase,
                                   log_checkpoint=sweep.log_checkpoints)
    with tracker.ending(parent):
        _init_ray(sweep.address)
        base = _with_cluster_gpus(sweep, base, tracker, parent)
        results = _fit(_tuner(sweep, base, callback, run_name, searched), callback, parent,
                       sweep.storage_path)
        return _finish_sweep(sweep, results, callback, tracker, parent, searched)


@contextlib.contextmanager
def driver_lock(path: Path, what: str) -> Iterator[None]:
    """Hold ``path`` locked while this driver runs ``what``: a second driver (a --resume
    of a sweep still running) stops with a clear error. The kernel drops the lock when
    this process dies, however it dies (SIGKILL included), so a resume after a crash
    is never refused."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b", buffering=0) as handle:  # unbuffered: a full disk fails here
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().decode(errors="replace").strip() or "another process"
            raise ConfigError(f"{what} is running now ({holder}): wait for it, or stop it "
                              "first (Ctrl-C), then --resume") from None
        handle.seek(0)
        handle.truncate()
        try:
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}".encode())
        except OSError as err:  # ENOSPC names no file: say which
            err.filename = err.filename or str(path)
            raise
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _resume(sweep: Sweep, base: TrialConfig, tracker: SweepTracker, searched: list[str]
            ) -> SweepOutcome:
    """Go on with an interrupted sweep: its Tune folder restored (finished trials stay
    finished; unfinished ones resume from their last checkpoint; the searcher's state is
    Tune's saved copy), its MLflow run and trial runs reused."""
    parent = sweep.resume_run_id
    path = _resumable_folder(tracker, parent, sweep)
    with driver_lock(path / ".driver.lock", f"sweep run {parent}"):
        return _resume_locked(sweep, base, tracker, searched, parent, path)


def _resume_locked(sweep: Sweep, base: TrialConfig, tracker: SweepTracker,
                   searched: list[str], parent: str, path: Path) -> SweepOutcome:
    from ray import tune

    from trainables.tune_trial import trainable

    children = tracker.child_runs(parent)
    print(f"resuming sweep run {parent} ({len(children)} trial runs so far) from {path}",
          flush=True)
    tracker.reopen_run(parent)
    tracker.parent_run_id = parent  # new trials nest under it
    callback = MLflowSweepCallback(tracker, varied=searched, phase=sweep.phase,
                                   log_checkpoint=sweep.log_checkpoints, resumed=children)
    with tracker.ending(parent):
        _init_ray(sweep.address)
        tuner = tune.Tuner.restore(str(path), trainable(), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # Tune restores the callbacks as pickled at the first start (their MLflow state
        # as it was then): use fresh ones that know this sweep's runs.
        tuner._local_tuner._run_config.callbacks = _callbacks(sweep, base, callback,
                                                              searched)
        saved = tuner._local_tuner._experiment_analysis
        done_before = {t.trial_id for t in (saved.trials if saved else [])
                       if t.status in ("TERMINATED", "ERROR")}
        results = _fit(tuner, callback, parent, sweep.storage_path)
        return _finish_sweep(sweep, results, callback, tracker, parent, searched,
                             done_before)


def _fit(tuner: Any, callback: MLflowSweepCallback, parent: str, storage: str) -> Any:
    """``tuner.fit()``; a Ctrl-C Tune does not catch itself (a second one, or one outside
    its loop) still ends the open trial runs KILLED and says how to resume; so does a
    full disk. Tune installs its SIGINT handler for the run and leaves it installed after:
    restored here, else a Ctrl-C after this sweep (between a study's sweeps) would only
    stop a finished run."""
    handler = signal.getsignal(signal.SIGINT)
    watch = next(c for c in tuner._local_tuner._run_config.callbacks
                 if isinstance(c, DiskFullWatch))
    try:
        return tuner.fit()
    except KeyboardInterrupt:
        callback.end_interrupted(f"the sweep was interrupted; resume it with --resume {parent}")
        raise SweepInterrupted(parent) from None
    except Exception:
        if watch.full is None:
            raise
        where = disk_space(Path(storage).resolve(), Path(tempfile.gettempdir()))
        callback.end_interrupted(f"a disk is full ({watch.full}; {where}); free space, "
                                 f"then resume it with --resume {parent}")
        raise SweepInterrupted(parent, cause=f"no space left on device while a trial wrote "
                               f"its checkpoint ({watch.full}); {where}") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def disk_space(*folders: Path) -> str:
    """"free: DIR N MiB, ..." for the folders a trial writes (the storage path, the temp
    folder checkpoints are staged in), to say which disk is full."""
    free = []
    for folder in dict.fromkeys(folders):
        probe = next((p for p in (folder, *folder.parents) if p.exists()), folder)
        try:
            stat = os.statvfs(probe)
            free.append(f"{folder} {stat.f_bavail * stat.f_frsize / 2**20:.1f} MiB")
        except OSError:
            free.append(f"{folder} unknown")
    return "free: " + ", ".join(free)


def _resumable_folder(tracker: SweepTracker, run_id: str, sweep: Sweep) -> Path:
    """The Tune folder of the sweep run ``run_id``, checked before any Ray work: a sweep
    run of this experiment, unfinished, of this metric, with a restorable state."""
    run = tracker.get_run(run_id)
    if run is None or "tune_folder" not in run.data.tags:
        raise ConfigError(f"--resume {run_id} is invalid: allowed the run id of a sweep run "
                          f"of experiment {tracker.experiment_name!r} (see find_resumable)")
    if run.info.status == "FINISHED":
        raise ConfigError(f"--resume {run_id} is invalid: that sweep finished; allowed an "
                          "interrupted, killed or failed one")
    was = run.data.params.get("sweep.metric")
    if was is not None and was != sweep.metric:
        raise ConfigError(f"--resume {run_id} is invalid here: that sweep searched on "
                          f"{was}, this command on {sweep.metric} (allowed: the command it "
                          "was started with)")
    path = Path(sweep.storage_path).resolve() / run.data.tags["tune_folder"]
    if not restorable(path):
        raise ConfigError(f"--resume {run_id}: its Tune state {path} is missing, or holds "
                          "no trial yet (was --storage-path different? was it stopped "
                          "before its first trial?); start the sweep again without --resume")
    return path


def restorable(path: Path) -> bool:
    """Tune can go on from ``path``: its state was saved with at least one trial in it.
    (A state saved before any trial existed does not restore: Tune's variant generator
    then fails on the dotted config keys with a KeyError.)"""
    import json

    from ray import tune

    if not tune.Tuner.can_restore(str(path)):
        return False
    states = sorted(path.glob("experiment_state-*.json"))
    try:
        return bool(states) and bool(json.loads(states[-1].read_text())["trial_data"])
    except (OSError, ValueError, KeyError):
        return False


def find_resumable(tracking_uri: str, experiment: str, kind: str | None = None) -> str:
    """The newest top-level run of ``experiment`` (of tag ``kind``, if given) that did not
    finish: what ``--resume`` with no run id resumes."""
    tracker = SweepTracker(tracking_uri, experiment)
    kind_filter = f"tags.kind = '{kind}'" if kind else ""
    for run in tracker.search_all(kind_filter, order_by=["attributes.start_time DESC"]):
        if "mlflow.parentRunId" in run.data.tags:
            continue
        if run.info.status != "FINISHED":
            return run.info.run_id
        break  # the newest finished: nothing was left unfinished after it
    raise ConfigError(f"--resume is invalid here: experiment {experiment!r} has no "
                      "unfinished sweep run to resume (allowed --resume RUN_ID of an "
                      "interrupted, killed or failed one)")


def _finish_sweep(sweep: Sweep, results: Any, callback: MLflowSweepCallback,
                  tracker: SweepTracker, parent: str, searched: list[str],
                  done_before: set[str] | frozenset[str] = frozenset()) -> SweepOutcome:
    """Tune returned: after Ctrl-C (not every trial ended), end the runs KILLED and say how
    to resume; else settle runs a killed driver left RUNNING, and summarize."""
    # At a Ctrl-C Tune stops the running and pending trials and marks them TERMINATED
    # without the completion hooks: a trial really ended if its hooks ran this session,
    # or if it had ended in the state a resume restored.
    trials = results._experiment_analysis.trials
    ended = done_before | callback.ended_now
    if len(trials) < (len(sweep.points) or sweep.num_samples) or \
            any(t.trial_id not in ended for t in trials):
        callback.end_interrupted(f"the sweep was interrupted; resume it with --resume {parent}")
        raise SweepInterrupted(parent)
    callback.settle(results)
    return _summarize(sweep, results, callback, tracker, parent, searched)


def _summarize(sweep: Sweep, results: Any, callback: MLflowSweepCallback,
               tracker: SweepTracker, parent: str, searched: list[str]) -> SweepOutcome:
    rows = []
    for result in results:
        if not result.metrics or sweep.metric not in result.metrics:
            continue  # failed before its first report
        trial_id = result.metrics.get("trial_id", "")
        params = {k: result.config[k] for k in searched if k in result.config}
        history = result.metrics_dataframe.to_dict("records") \
            if result.metrics_dataframe is not None else [result.metrics]
        row = {"trial_id": trial_id, "status": callback.statuses.get(trial_id, "UNKNOWN"),
               "diverged": diverged(history),
               "mlflow_run_id": callback.run_ids.get(trial_id, ""), **params}
        objectives = (m for m, _ in sweep.objectives)
        for key in dict.fromkeys((*SUMMARY_METRICS, sweep.metric, *objectives)):
            if key in result.metrics:
                row[key] = result.metrics[key]
        rows.append(row)
    if not rows:
        raise RuntimeError(f"sweep {sweep.name!r}: no trial reported a result; see the "
                           "errors above and the FAILED child runs in MLflow")
    sign = 1.0 if sweep.mode == "max" else -1.0
    best = max(rows, key=lambda r: sign * r[sweep.metric] if sweep.metric in r
               else float("-inf"))
    best_result = next(r for r in results if r.metrics and
                       r.metrics.get("trial_id") == best["trial_id"])
    tracker.log_table(parent, rows, "trials")
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_sweep(rows, searched, sweep.metric, Path(tmp) / "sweep.png",
                         f"{sweep.name}: {len(rows)} trials")
        if png is not None:
            tracker.log_artifact(parent, png)
    if sweep.log_best:
        tracker.log_metrics(parent, {f"best_{k}": v for k, v in best.items()
                                     if k in SUMMARY_METRICS or k == sweep.metric}, step=0)
        tracker.set_tags(parent, {"best_trial_id": best["trial_id"],
                                  "best_mlflow_run_id": best["mlflow_run_id"]})
    return SweepOutcome(best=best, best_config=dict(best_result.config), rows=rows,
                        parent_run_id=parent, tracking_uri=sweep.tracking_uri,
                        experiment=sweep.name, results=results)


def mlflow_ui_command(tracking_uri: str) -> str:
    """The light UI (sweeps/ui.py: one worker, bound to 127.0.0.1) on this store."""
    return f"python -m sweeps.ui --tracking-uri {tracking_uri}"
