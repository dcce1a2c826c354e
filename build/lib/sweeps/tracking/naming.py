"""How a trial appears in MLflow: its run name, tags and params (each config section
says its own part: :meth:`trainables.config.Section.label` and ``tags``), and the
metrics taken from a Tune result."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ray.tune.result import AUTO_RESULT_KEYS

from sweeps.tracking.tables import is_number
from trainables.config import SECTIONS, QuantSection

__all__ = ["trial_run_name", "trial_tags", "quant_label", "trial_metrics", "logged_params",
           "MAX_RUN_NAME"]


# Keys Tune adds to every result (iteration counters, clocks, host): not the trial's own.
_TUNE_KEYS = frozenset((*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag",
                        "checkpoint_path", "should_checkpoint"))


def trial_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric metric a trial reported (epoch metrics and stage metrics alike), without
    the keys Tune adds to each result."""
    return {k: v for k, v in result.items() if k not in _TUNE_KEYS and is_number(v)}


def logged_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields the trial reads (see :meth:`TrialConfig.tracked_params`); a config
    that no longer parses is logged as given."""
    from trainables.config import TrialConfig

    try:
        return TrialConfig.from_stored({k: v for k, v in config.items() if "." in k}
                                       ).tracked_params()
    except ValueError:
        return dict(config)


MAX_RUN_NAME = 250


# Short names for a run's title; other keys show their last part (quant.bits -> bits).
_SHORT = {"optim.lr": "lr", "optim.weight_decay": "wd", "optim.bias_lr": "bias_lr"}


def quant_label(config: Mapping[str, Any]) -> str:
    """The quant section's label of a flat config (``int4-qat``; "" when not quantizing)."""
    return QuantSection.label(config)


def trial_run_name(config: Mapping[str, Any], varied: Iterable[str] = ()) -> str:
    """A trial's MLflow run name, what distinguishes it first: each section's label in
    section order (the optimizer, the quantization, ...), the dataset/model where they
    vary, the other varied keys, the seed; e.g. ``madam lr=0.0995 wd=4.3e-05 s2``,
    ``gd int4-qat lenet s1``."""
    parts = [section.label(config) for section in SECTIONS.values()]
    shown = {"train.seed", *(f"{name}.{f}" for name, section in SECTIONS.items()
                             for f in section.label_fields)}
    cell = [str(config[k]) for k in ("data.name", "model.name") if k in varied]
    if cell:
        parts.append("/".join(cell))
        shown |= {"data.name", "model.name"}
    for key in varied:
        if key not in shown and key in config:
            value = config[key]
            text = f"{value:.3g}" if isinstance(value, float) else str(value)
            parts.append(f"{_SHORT.get(key, key.rpartition('.')[2])}={text}")
    seed = f"s{config.get('train.seed', 0)}"
    name = " ".join(p for p in parts if p)
    # MLflow's SQL stores cap run names at 250 characters: cut the varied keys, keep the seed.
    return f"{name[:MAX_RUN_NAME - len(seed) - 2]}~ {seed}" \
        if len(name) + len(seed) + 1 > MAX_RUN_NAME else f"{name} {seed}"


def trial_tags(config: Mapping[str, Any], phase: str) -> dict[str, str]:
    """What filtering and grouping in the MLflow UI need on every trial run: its phase
    and each section's tags (optimizer, dataset, model, precision, quant, seed, ...)."""
    tags = {"phase": phase}
    for section in SECTIONS.values():
        tags.update(section.tags(config))
    return tags
