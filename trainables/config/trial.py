"""The whole trial configuration: one frozen section per concern, flattened to dotted keys
(``optim.lr``) for Ray Tune's ``param_space``, Optuna and MLflow params, and rebuilt from
them on the first line of the worker. The sections are TrialConfig's fields, listed
once; a new section is a new field (with its own module beside this one).

Example::

    cfg = TrialConfig().with_overrides(["optim.lr=0.05", "model.name=lenet"])
    flat = cfg.to_flat()            # {"optim.lr": 0.05, ...}
    assert TrialConfig.from_flat(flat) == cfg
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

import optim
from trainables.config.base import ConfigError, Section, fail
from trainables.config.data import DataConfig
from trainables.config.evaluate import EvaluateConfig
from trainables.config.export_section import ExportSection
from trainables.config.lc_section import LCSection
from trainables.config.model import ModelConfig
from trainables.config.optim_section import OptimConfig
from trainables.config.precision import PrecisionConfig
from trainables.config.prune_section import PruneSection
from trainables.config.quant_section import QuantSection
from trainables.config.train import TrainConfig
from trainables.config.yaml_io import dotted_keys, read_yaml

__all__ = ["TrialConfig", "SECTIONS"]


@dataclass(frozen=True)
class TrialConfig:
    """The whole configuration of one trial."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    prune: PruneSection = field(default_factory=PruneSection)
    lc: LCSection = field(default_factory=LCSection)
    quant: QuantSection = field(default_factory=QuantSection)
    export: ExportSection = field(default_factory=ExportSection)

    def __post_init__(self) -> None:
        q = self.quant
        if q.mode == "qat" and q.qat_start_epoch >= self.train.epochs:
            fail("quant.qat_start_epoch", q.qat_start_epoch,
                  f"a value < train.epochs ({self.train.epochs}): QAT would never start")
        if q.mode != "none" and q.format == "codebook" and q.k < 3 and \
                self.prune.schedule != "none":
            fail("quant.k", q.k, f">= 3 with prune.schedule={self.prune.schedule}: one "
                 "entry holds the pruned zeros, the rest share the others")
        if self.lc.enabled:
            # LC compresses through its own C steps (codebook, prune, int bits among them).
            if q.mode != "none":
                fail("quant.mode", q.mode, "none with lc (LC quantizes through its own "
                     "C step: lc.conv / lc.linear = int:bits=B or codebook:k=K)")
            if self.prune.schedule != "none":
                fail("prune.schedule", self.prune.schedule, "none with lc (LC prunes "
                     "through its own C step: lc.conv / lc.linear = prune:keep=F)")
            self.lc.check_epochs(self.train.epochs, self.train.init_from)
        if not self.evaluate.test_each_epoch and self.data.val_fraction == 0:
            fail("evaluate.test_each_epoch", False, "true unless data.val_fraction > 0 "
                 "(the validation split must score the epochs)")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrialConfig":
        """Build from nested (``{"optim": {"lr": 0.1}}``) or dotted (``{"optim.lr": 0.1}``)
        keys; missing fields keep their defaults."""
        return cls().replace(values)

    from_flat = from_dict

    @classmethod
    def from_stored(cls, values: Mapping[str, Any]) -> "TrialConfig":
        """A config as an older qsweep saved it (checkpoints, MLflow, Tune folders): it wrote
        every optimizer field, read or not. Fields the optimizer does not read had no
        effect then and are dropped; ``optim.bias_lr=0`` meant unset; a config without
        ``optim.decay_form`` keeps the decay eg and adam_eg had then."""
        flat = dotted_keys(values)
        name = flat.get("optim.name", OptimConfig.name)
        if name in optim.available():
            unread = {f.name for f in fields(OptimConfig) if f.default is None} - \
                set(optim.reads(name))
            if not optim.needs_bias_group(name) or flat.get("optim.bias_lr") == 0:
                unread.add("bias_lr")
            # Before decay_form existed, eg's decay was L2 and adam_eg's exp(-lr * wd).
            old_decay = {"eg": "l2", "adam_eg": "exp"}
            if name in old_decay and "optim.decay_form" not in flat:
                flat["optim.decay_form"] = old_decay[name]
            flat = {k: v for k, v in flat.items()
                    if k.partition(".")[2] not in unread or not k.startswith("optim.")}
        return cls.from_flat(flat)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrialConfig":
        return cls().with_yaml(path)

    def with_yaml(self, path: str | Path) -> "TrialConfig":
        """A copy with the overrides of a YAML file (sections or dotted keys) applied."""
        return self.replace(read_yaml(path, tuple(SECTIONS)))

    def replace(self, values: Mapping[str, Any]) -> "TrialConfig":
        """A copy with ``values`` (nested or dotted keys) applied, validated."""
        grouped: dict[str, dict[str, Any]] = {}
        for key, value in dotted_keys(values).items():
            section, _, name = key.partition(".")
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section {section!r} in key {key!r}: "
                                  f"allowed sections {', '.join(SECTIONS)}")
            known = [f.name for f in fields(SECTIONS[section])]
            if name not in known:
                raise ConfigError(f"unknown config key {key!r}: fields of {section} are "
                                  f"{', '.join(known)}")
            grouped.setdefault(section, {})[name] = value
        sections = {s: dataclasses.replace(getattr(self, s), **grouped.get(s, {}))
                    for s in SECTIONS}
        return TrialConfig(**sections)

    def with_overrides(self, assignments: Iterable[str]) -> "TrialConfig":
        """Apply ``key=value`` strings (values parsed as YAML: ``0.1``, ``true``, ``[8,16]``)."""
        values = {}
        for text in assignments:
            key, sep, raw = text.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override {text!r} is invalid: allowed the form key=value, "
                                  "e.g. optim.lr=0.1")
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        return self.replace(values)

    # -- export -------------------------------------------------------------------------
    def to_flat(self) -> dict[str, Any]:
        """Dotted keys to plain values (tuples become lists), for Tune, Optuna and MLflow."""
        flat = {}
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                flat[f"{section}.{key}"] = list(value) if isinstance(value, tuple) else value
        return flat

    def tracked_params(self) -> dict[str, Any]:
        """What MLflow logs: every field, but of ``optim`` only those the chosen optimizer
        and schedule read (unset hyperparameters at the optimizer's defaults)."""
        flat = {k: v for k, v in self.to_flat().items() if not k.startswith("optim.")}
        read = {f"optim.{k}": v for k, v in self.optim.read_fields().items()}
        return {**read, **flat}

    def to_nested(self) -> dict[str, dict[str, Any]]:
        nested: dict[str, dict[str, Any]] = {}
        for key, value in self.to_flat().items():
            section, _, name = key.partition(".")
            nested.setdefault(section, {})[name] = value
        return nested

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_nested(), sort_keys=False)




# Section name -> its class, in TrialConfig's field order (the one list of sections).
SECTIONS: dict[str, type[Section]] = {f.name: f.default_factory  # type: ignore[misc]
                                      for f in fields(TrialConfig)}
