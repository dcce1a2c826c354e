"""The search of a sweep: validating a define-by-run space or explicit points before Ray
starts, Ray's Optuna searcher (TPE, or NSGA-II for several objectives) with the scheduler
that goes with it, and how the sweep run describes both.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from ray.tune.search.optuna import OptunaSearch

from sweeps.halving import SynchronousHalving
from sweeps.init_weights import absolute_paths
from sweeps.samplers import NSGAIISampler, TPESampler
from sweeps.spec import SPACE_PREFIX, SpaceFn, Sweep
from trainables.config import ConfigError, TrialConfig

__all__ = ["validate_space", "validate_points", "check_list_lengths", "space_ranges",
           "build_search", "describe_search", "fixed_config", "DivergenceAwareOptunaSearch",
           "worst_where_nonfinite"]


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
    check_list_lengths([("the sweep's base", base.to_flat()),
                        *((f"point {i} of the sweep", c) for i, c in enumerate(configs))])
    return [k for k in configs[0] if len({repr(c[k]) for c in configs}) > 1]


def check_list_lengths(configs: list[tuple[str, Mapping[str, Any]]]) -> None:
    """Configs that run in one Tune run as points (``(what, flat config)`` each) must
    give every list field the same length: Tune lays each point over the run's base
    element by element, so a shorter list would keep the base's extra elements and a
    longer one fails when its trial is created."""
    (first, reference), *rest = configs
    for what, config in rest:
        for key, value in config.items():
            base = reference.get(key)
            if isinstance(value, (list, tuple)) and isinstance(base, (list, tuple)) and \
                    len(value) != len(base):
                raise ConfigError(f"{what}: {key}={list(value)} is invalid in one Tune run "
                                  f"with {first} ({key}={list(base)}): allowed lists of the "
                                  "same length in every point (Tune lays a point over the "
                                  "run's base element by element); run them as separate "
                                  "sweeps")


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


def build_search(sweep: Sweep, base: TrialConfig) -> tuple[Any, Any, int]:
    """(searcher, scheduler, num_samples): Optuna TPE + ASHA for a space; the points in
    order, each run to the end, for explicit points."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sweep.points:
        points = [absolute_paths(base.replace(p)).to_flat() for p in sweep.points]
        if sweep.rungs:
            # No limit in the generator: it counts paused trials as running, and the
            # trials waiting at a rung would hold back the rest. The cluster's CPUs limit.
            return (BasicVariantGenerator(points_to_evaluate=points),
                    SynchronousHalving(sweep.metric, sweep.mode, sweep.rungs,
                                       int(sweep.reduction_factor), len(points),
                                       sweep.rung_margin),
                    len(points))
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
            sampler=NSGAIISampler(
                seed=sweep.seed, population_size=max(2, min(50, sweep.num_samples // 4))))
        return searcher, FIFOScheduler(), sweep.num_samples
    searcher = DivergenceAwareOptunaSearch(
        space=sweep.space, metric=sweep.metric, mode=sweep.mode,
        sampler=TPESampler(seed=sweep.seed))
    if not sweep.early_stopping:
        return searcher, FIFOScheduler(), sweep.num_samples
    scheduler = ASHAScheduler(time_attr="training_iteration", metric=sweep.metric,
                              mode=sweep.mode, max_t=base.train.epochs,
                              grace_period=sweep.grace_period,
                              reduction_factor=sweep.reduction_factor)
    return searcher, scheduler, sweep.num_samples


def fixed_config(sweep: Sweep, base: TrialConfig) -> TrialConfig:
    """The config whose unvaried fields every trial shares: the base with the first
    point (its constants are every point's) or with the space's constants."""
    if sweep.points:
        return base.replace(sweep.points[0])
    import optuna

    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    return base.replace(sweep.space(trial) or {})


def describe_search(sweep: Sweep) -> tuple[str, str]:
    """(searcher, scheduler) as the sweep run's params say them."""
    if sweep.points and sweep.rungs:
        return "points (each as given)", (
            f"synchronous successive halving (rungs at epochs "
            f"{', '.join(map(str, sweep.rungs))}; the best 1/{sweep.reduction_factor:g} of "
            f"the points go on, ties to the earlier point, and any within "
            f"{sweep.rung_margin:g} of the last of them)")
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
