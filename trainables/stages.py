"""Trial stages: where compression plugs into the one training loop.

A stage is built from the trial's config on every worker and acts at four points of
:func:`trainables.loop.run_trial`:

- ``prepare(model) -> model``: before DDP wrapping and before the optimizer is built
  (swap in fake-quantized modules, attach pruning masks, ...).
- ``penalty(model) -> Tensor | None``: a term added to the loss of every training step
  (computed in float32, outside autocast).
- ``after_step(step)``: after every optimizer step (``step`` counts from 1; sparsity
  schedules, LC's mu, ...).
- ``epoch_end(ctx) -> metrics``: after every epoch's evaluation, on every rank (evaluate a
  transformed copy, report a sparsity); its metrics join that epoch's report.
- ``finalize(ctx) -> metrics``: after the last epoch, on every rank (its evaluations are
  collective), once the training state is checkpointed: evaluate, transform, write files
  into ``ctx.out_dir``. Its metrics join the last epoch's report; the files of rank 0
  travel in the reported checkpoint's ``artifacts/`` folder and become artifacts of the
  trial's MLflow run (:class:`sweeps.tracking.MLflowSweepCallback`).

A stage knows nothing of Ray or MLflow. ``state_dict`` / ``load_state_dict`` carry what it
needs across a checkpoint (resume stays exact).

Stages are chosen by the config: each builder in ``STAGE_BUILDERS`` looks at the config
and returns a stage or ``None``; :func:`build_stages` keeps their order.

Example::

    class CountSteps(Stage):
        name = "count"
        def __init__(self): self.steps = 0
        def after_step(self, step): self.steps = step
        def finalize(self, ctx): return {"steps": self.steps}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from trainables.config import TrialConfig

__all__ = ["Stage", "StageContext", "FinalizeContext", "STAGE_BUILDERS", "build_stages",
           "nonfinite_params", "diverged_reason",
           "register_stage_builder"]


@dataclass
class StageContext:
    """What a stage sees at the end of an epoch and at the end of training."""

    cfg: TrialConfig
    model: nn.Module  # the model being trained (not DDP-wrapped), in eval mode
    # Evaluation of any model of the same interface on a split ("test", "val" when the
    # config holds one out): {"<split>_loss", "<split>_acc"}, summed over all DDP ranks
    # (every rank must call it the same number of times).
    evaluate: Callable[..., dict[str, float]]
    splits: tuple[str, ...]  # the splits evaluate() takes
    # The first n input batches of this rank's training shard (calibration).
    train_batches: Callable[[int], Iterable[torch.Tensor]]
    # (inputs, labels) batches of this rank's shard of an evaluation split.
    eval_batches: Callable[[str], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    # (input channels, image size, classes): with cfg.model, what rebuilds the model.
    data_shape: tuple[int, int, int]
    out_dir: Path  # files written here reach the trial's MLflow run (rank 0's; finalize)
    is_chief: bool  # rank 0: write files only here if they are expensive
    # What this epoch reports so far (epoch_end: its own evaluations, e.g. val_acc).
    epoch_metrics: dict[str, Any] = field(default_factory=dict)


FinalizeContext = StageContext


class Stage:
    """Base class: every hook is optional and does nothing by default."""

    name: str = "stage"

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, step: int) -> None:
        pass

    def epoch_end(self, ctx: StageContext) -> dict[str, float]:
        return {}

    def finalize(self, ctx: FinalizeContext) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


StageBuilder = Callable[[TrialConfig], "Stage | None"]
STAGE_BUILDERS: list[StageBuilder] = []


def nonfinite_params(model: nn.Module) -> list[str]:
    """Names of the parameters holding inf or NaN: a diverged trial's. Post-training
    stages report NaN for such a model instead of failing the trial."""
    return [name for name, p in model.named_parameters()
            if not bool(torch.isfinite(p.detach()).all())]


def diverged_reason(bad: list[str]) -> str:
    """What a post-training stage's file says instead of its results (``bad``: the
    parameters :func:`nonfinite_params` named)."""
    return f"the trained weights hold inf/NaN (the trial diverged): {', '.join(bad)}"


def register_stage_builder(builder: StageBuilder) -> StageBuilder:
    """Add a builder (usable as a decorator); stages run in registration order."""
    STAGE_BUILDERS.append(builder)
    return builder


def build_stages(cfg: TrialConfig) -> list[Stage]:
    """The stages ``cfg`` asks for, in registration order; names must be unique (they key
    the checkpoint's stage states)."""
    # The built-in stages register their builders on import.
    import trainables.quant_stage  # noqa: F401
    import trainables.weight_rounding  # noqa: F401

    stages = [s for s in (build(cfg) for build in STAGE_BUILDERS) if s is not None]
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique, got {names}")
    return stages
