"""The stages of a trial, in their order, run as one pipeline.

Stages run in the order of :data:`STAGE_ORDER` (low-rank factorization, pruning, LC,
quantization, weight rounding, export): each transform builds on the earlier ones
(a pruned model is then quantized; export writes what the others made). A stage
registered under a name the order does not list runs after the listed ones, in
registration order. The package's ``__init__`` registers the built-in stages; no stage
module imports the registry's users.

Example::

    register_stage("count", lambda cfg: CountSteps() if cfg.train.epochs > 1 else None)
    pipeline = build_pipeline(cfg)      # the stages cfg asks for, ordered and checked
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from trainables.config import TrialConfig
from trainables.stages.base import Stage, StageContext, TrainingPlan

__all__ = ["STAGE_ORDER", "LOOP_METRICS", "Pipeline", "register_stage", "build_pipeline",
           "registered"]

STAGE_ORDER = ("lowrank", "prune", "lc", "quant", "weight_rounding", "export")
# What the loop itself reports every epoch: no stage may report these names.
LOOP_METRICS = frozenset({
    "epoch", "train_loss", "train_acc", "lr", "skipped_steps", "train_seconds",
    "images_per_s", "epoch_seconds", "device", "diverged", "diverged_epoch",
    "diverged_batch", "diverged_step",
    *(f"{split}_{kind}" for split in ("test", "val", "extra") for kind in ("loss", "acc"))})

StageBuilder = Callable[[TrialConfig], "Stage | None"]
_BUILDERS: dict[str, StageBuilder] = {}


def register_stage(name: str, build: StageBuilder) -> StageBuilder:
    """Register the builder of stage ``name`` (it returns the stage ``cfg`` asks for, or
    None); a name registered again replaces its builder."""
    _BUILDERS[name] = build
    return build


def registered() -> list[str]:
    """The registered stage names, in the order their stages run."""
    known = [n for n in STAGE_ORDER if n in _BUILDERS]
    return known + [n for n in _BUILDERS if n not in STAGE_ORDER]


def build_pipeline(cfg: TrialConfig) -> "Pipeline":
    """The stages ``cfg`` asks for, in their order."""
    stages = []
    for name in registered():
        stage = _BUILDERS[name](cfg)
        if stage is not None:
            if stage.name != name:
                raise ValueError(f"the builder registered as {name!r} built a stage named "
                                 f"{stage.name!r}")
            stages.append(stage)
    return Pipeline(stages)


class Pipeline:
    """Ordered stages, each hook called on each in turn. Built with two stages that report
    the same metric it raises (a checkpoint's stage states are keyed by name: names must
    be unique too)."""

    def __init__(self, stages: list[Stage]) -> None:
        self.stages = list(stages)
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        owner: dict[str, str] = dict.fromkeys(LOOP_METRICS, "the loop")
        for stage in self.stages:
            for metric in stage.metric_names():
                if metric in owner:
                    who = owner[metric]
                    raise ValueError(f"{'stages ' + who if who != 'the loop' else who} and "
                                     f"{'' if who != 'the loop' else 'stage '}{stage.name} "
                                     f"both report the metric {metric!r}: rename one")
                owner[metric] = stage.name

    def __bool__(self) -> bool:
        return bool(self.stages)

    def __iter__(self):
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def plan(self, plan: TrainingPlan) -> None:
        for stage in self.stages:
            stage.plan(plan)

    def prepare(self, model: nn.Module) -> nn.Module:
        for stage in self.stages:
            model = stage.prepare(model)
        return model

    def penalty(self, model: nn.Module) -> torch.Tensor | float:
        terms = [t for t in (s.penalty(model) for s in self.stages) if t is not None]
        return sum(terms) if terms else 0.0

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for stage in self.stages:
            stage.before_step(model, optimizer)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> None:
        for stage in self.stages:
            stage.after_step(step, model, optimizer)

    def lr_segment(self, step: int) -> tuple[int, int, float] | None:
        """The first stage's schedule segment holding ``step`` (None: all of training)."""
        for stage in self.stages:
            segment = stage.lr_segment(step)
            if segment is not None:
                return segment
        return None

    def epoch_end(self, ctx: StageContext, metrics: dict[str, Any]) -> None:
        """Each stage's epoch metrics, added to ``metrics`` (the epoch's report)."""
        for stage in self.stages:
            _merge(metrics, stage.epoch_end(ctx), stage)

    def finalize(self, ctx: StageContext) -> dict[str, float]:
        """Each stage's end of training, in order, each from the earlier ones' result."""
        ctx.result = ctx.model
        metrics: dict[str, float] = {}
        for stage in self.stages:
            _merge(metrics, stage.finalize(ctx), stage)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {s.name: s.state_dict() for s in self.stages}

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for stage in self.stages:  # a stage added since the checkpoint starts fresh
            if stage.name in states:
                stage.load_state_dict(states[stage.name])


def _merge(into: dict[str, Any], new: dict[str, Any], stage: Stage) -> None:
    """Add a stage's metrics. Each must be one the stage declared (``metric_names``: what
    the build-time check saw) and not one reported already (a bug in that stage, not
    something to overwrite silently)."""
    undeclared = sorted(set(new) - stage.metric_names())
    if undeclared:
        raise ValueError(f"stage {stage.name} reports {', '.join(undeclared)}, which its "
                         "metric_names() does not declare")
    clash = sorted(set(into) & set(new))
    if clash:
        raise ValueError(f"stage {stage.name} reports {', '.join(clash)}, already reported "
                         "this epoch")
    into.update(new)
