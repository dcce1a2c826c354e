"""What a trial stage is: the hooks the training loop calls, and what they see.

A stage is built from the trial's config on every worker and knows nothing of Ray or
MLflow: it returns metrics and writes files; the session carries them. The loop
(:func:`trainables.loop.run_trial`) calls, through the
:class:`~trainables.stages.pipeline.Pipeline` that orders the stages:

- ``plan(plan)``: once, before training, with the number of optimizer steps
  (:class:`TrainingPlan`): schedules given as fractions of training become steps.
- ``prepare(model) -> model``: before DDP wrapping and before the optimizer is built
  (fake-quantizers, pruning masks: parametrizations, which stack on one weight).
- ``penalty(model) -> Tensor | None``: a term added to every step's loss (float32,
  outside autocast).
- ``before_step(model, optimizer)``: between backward and the optimizer step (mask
  gradients). The gradients are as the loss scaler left them: scaled under
  ``amp_fp16`` (fine for masking; unscale them before taking norms).
- ``after_step(step, model, optimizer)``: after every optimizer step (``step`` counts
  from 1): re-apply masks, clear the optimizer state of pruned weights, LC's C steps.
- ``lr_segment(step)``: where the learning-rate schedule restarts (LC's L steps); the
  first stage that returns one decides.
- ``epoch_end(ctx) -> metrics``: after each epoch's evaluation, on every rank.
- ``finalize(ctx) -> metrics``: after the last epoch, on every rank (its evaluations are
  collective), once the training state is checkpointed. ``ctx.result`` is the model as
  the earlier stages left it (the trained model for the first); a stage that transforms
  it (prune, then quantize) sets ``ctx.result`` to its own result, so the last
  transforming stage's result holds every transform. Files go to ``ctx.out_dir``.

``metric_names()`` lists every metric a stage reports: two stages naming the same metric,
or a stage naming one of the loop's (``test_acc``), is an error when the pipeline is
built, not a silent overwrite; a stage reporting a metric it did not declare fails.

Example::

    class CountSteps(Stage):
        name = "count"
        def __init__(self): self.steps = 0
        def metric_names(self): return frozenset({"steps"})
        def after_step(self, step, model, optimizer): self.steps = step
        def finalize(self, ctx): return {"steps": self.steps}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from trainables.config import TrialConfig

__all__ = ["Stage", "StageContext", "FinalizeContext", "TrainingPlan", "fp32_bytes",
           "nonfinite_params", "diverged_reason"]


@dataclass(frozen=True)
class TrainingPlan:
    """How long training is, known before it starts."""

    epochs: int
    steps_per_epoch: int
    # (input channels, image size, classes): an example input for tracing the model.
    data_shape: tuple[int, int, int] | None = None

    def example_input(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """One zero image of the trial's input shape (batch 1); None without a shape."""
        from trainables.models import example_input

        return None if self.data_shape is None else example_input(self.data_shape, device)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def step_at(self, fraction: float) -> int:
        """The optimizer step a fraction of training (0..1) falls on (0: before the first)."""
        return round(fraction * self.total_steps)


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
    # finalize: the model as the earlier stages left it (a stage that transforms it sets
    # its own result here). None until the pipeline starts finalizing: then ``model``.
    result: nn.Module | None = None


FinalizeContext = StageContext


class Stage:
    """Base class: every hook is optional and does nothing by default."""

    name: str = "stage"

    def metric_names(self) -> frozenset[str]:
        """Every metric this stage's epoch_end and finalize may report."""
        return frozenset()

    def plan(self, plan: TrainingPlan) -> None:
        pass

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> None:
        pass

    def lr_segment(self, step: int) -> tuple[int, int, float] | None:
        """Where the learning-rate schedule restarts: (first step, length in steps, lr
        scale) of the segment holding optimizer step ``step`` (0-based), within which
        ``optim.schedule`` runs as over a whole training; None: one segment, all of
        training (LC: each L step its own)."""
        return None

    def epoch_end(self, ctx: StageContext) -> dict[str, float]:
        return {}

    def finalize(self, ctx: FinalizeContext) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def fp32_bytes(ctx: StageContext) -> int:
    """Bytes on disk of the trial's model as configured, FP32, before any stage changed
    its architecture (a channel-pruned or factorized model is compared with the dense
    one): ``compression_ratio``'s numerator."""
    import tempfile

    import quant
    from trainables.models import model_for_trial

    with tempfile.TemporaryDirectory() as tmp:
        return quant.state_dict_bytes(model_for_trial(ctx.cfg, ctx.data_shape),
                                      Path(tmp) / "fp32.pt")


def nonfinite_params(model: nn.Module) -> list[str]:
    """Names of the parameters holding inf or NaN: a diverged trial's. Post-training
    stages report NaN for such a model instead of failing the trial."""
    return [name for name, p in model.named_parameters()
            if not bool(torch.isfinite(p.detach()).all())]


def diverged_reason(bad: list[str]) -> str:
    """What a post-training stage's file says instead of its results (``bad``: the
    parameters :func:`nonfinite_params` named)."""
    return f"the trained weights hold inf/NaN (the trial diverged): {', '.join(bad)}"
