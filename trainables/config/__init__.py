"""One frozen, validated trial configuration, from sweep script to Ray worker.

The config is a tree of frozen dataclasses, one section per module here (``data``,
``model``, ``optim``, ``precision``, ``train``, ``evaluate``, ``prune``, ``lc``,
``quant``, ``export``). It flattens to
dotted keys (``optim.lr``) for Ray Tune's ``param_space``, Optuna and MLflow params, and
is rebuilt from them on the first line of the worker. Every field is type-checked and
range-checked at construction: a bad value raises :class:`ConfigError` naming the field,
the value and what is allowed, before any cluster work starts. Each section also says how
it labels a trial in MLflow (:meth:`Section.label`, :meth:`Section.tags`).

Example::

    cfg = TrialConfig().with_overrides(["optim.lr=0.05", "model.name=lenet"])
    flat = cfg.to_flat()            # {"optim.lr": 0.05, ...}
    assert TrialConfig.from_flat(flat) == cfg
"""

from trainables.config.base import ConfigError, Section
from trainables.config.data import AUGMENTATIONS, DATASETS, DataConfig
from trainables.config.evaluate import EvaluateConfig
from trainables.config.export_section import EXPORT_FORMATS, ExportSection
from trainables.config.lc_section import LCSection
from trainables.config.model import MODELS, ModelConfig
from trainables.config.optim_section import SCHEDULES, OptimConfig
from trainables.config.precision import PRECISIONS, PrecisionConfig
from trainables.config.prune_section import PRUNE_SCHEDULES, PruneSection
from trainables.config.quant_section import QUANT_FORMATS, QUANT_MODES, QuantSection
from trainables.config.train import DEVICES, TrainConfig
from trainables.config.trial import SECTIONS, TrialConfig
from trainables.config.yaml_io import dotted_keys, yaml_problem

__all__ = [
    "ConfigError",
    "Section",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PrecisionConfig",
    "TrainConfig",
    "EvaluateConfig",
    "ExportSection",
    "EXPORT_FORMATS",
    "QuantSection",
    "PruneSection",
    "LCSection",
    "PRUNE_SCHEDULES",
    "TrialConfig",
    "SECTIONS",
    "DATASETS",
    "MODELS",
    "AUGMENTATIONS",
    "SCHEDULES",
    "PRECISIONS",
    "DEVICES",
    "QUANT_MODES",
    "QUANT_FORMATS",
    "dotted_keys",
    "yaml_problem",
]
