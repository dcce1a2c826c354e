"""Magnitude pruning on a sparsity schedule, as a trial stage (``prune.schedule``, see
:class:`trainables.config.PruneSection`).

- ``plan``: the schedule's fractions of training become optimizer steps.
- ``prepare``: a :class:`compress.PruneMask` on every prunable weight (before QAT's
  fake-quantizer, which then quantizes the masked weight), pruned to the schedule's
  sparsity at step 0.
- ``after_step``: where the schedule raises the sparsity, the masks grow (by magnitude;
  a pruned weight stays pruned), and the stored weight and every optimizer state tensor
  of its shape (momentum, Adam moments, EG+- halves, LNS exponents) are zeroed where the
  mask is 0: nothing holds on to a pruned weight. Its effective value is exactly 0 from
  the mask alone, whatever the optimizer does.
- ``epoch_end`` and ``finalize``: ``sparsity``, the fraction of exact zeros among the
  prunable weights the layers compute with. With quantization on, the masks stay on the
  model and the quantization stage after this one bakes them into its packed weights;
  without, this stage bakes them and writes the packed model itself (``model.qsw``:
  float weights stored sparse, ``packed_bytes``, ``fp32_bytes``, ``compression_ratio``).

Masks are buffers of the model (saved in its state_dict), so resume is exact.

Example::

    cfg = TrialConfig().with_overrides(["prune.schedule=polynomial",
                                        "prune.final_sparsity=0.8", "prune.end=0.7"])
    history = run_trial(cfg, LocalSession())     # history[-1]["sparsity"] == 0.8
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import compress
import quant
from compress.prune import masked_layers
from trainables.config import ConfigError, TrialConfig
from trainables.stages.base import Stage, StageContext, TrainingPlan, nonfinite_params

__all__ = ["PruneStage", "build_prune_stage", "check_prunable"]


class PruneStage(Stage):
    name = "prune"

    def __init__(self, cfg: TrialConfig) -> None:
        self.cfg = cfg.prune
        self.schedule = cfg.prune.sparsity_schedule()
        self.total_steps = 0
        self.packs = cfg.quant.mode == "none"  # else the quantization stage packs

    def metric_names(self) -> frozenset[str]:
        packed = {"packed_bytes", "fp32_bytes", "compression_ratio"} if self.packs else set()
        return frozenset({"sparsity", *packed})

    def plan(self, plan: TrainingPlan) -> None:
        self.total_steps = plan.total_steps

    def prepare(self, model: nn.Module) -> nn.Module:
        chosen = set(check_prunable(self.cfg, model))
        compress.attach_masks_(model, lambda m, fqn: fqn in chosen)
        self._prune(model, self.schedule.sparsity_at(0, self.total_steps), None)
        return model

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> None:
        if self.schedule.changes_at(step, self.total_steps):
            self._prune(model, self.schedule.sparsity_at(step, self.total_steps), optimizer)

    @torch.no_grad()
    def _prune(self, model: nn.Module, sparsity: float,
               optimizer: torch.optim.Optimizer | None) -> None:
        if sparsity <= 0.0:
            return
        compress.prune_to_(model, sparsity, self.cfg.scope)
        for module in masked_layers(model).values():
            stack = module.parametrizations["weight"]
            mask = next(p for p in stack if isinstance(p, compress.PruneMask)).mask
            stored, pruned = stack.original, mask == 0
            stored.masked_fill_(pruned, 0.0)
            state = optimizer.state.get(stored, {}) if optimizer is not None else {}
            for value in state.values():
                if torch.is_tensor(value) and value.shape == stored.shape:
                    value.masked_fill_(pruned, 0)

    def epoch_end(self, ctx: StageContext) -> dict[str, float]:
        return {"sparsity": compress.sparsity_of(ctx.model)}

    def finalize(self, ctx: StageContext) -> dict[str, float]:
        metrics = {"sparsity": compress.sparsity_of(ctx.result)}
        if not self.packs:
            return metrics
        if nonfinite_params(ctx.result):  # diverged: nothing worth packing
            return {**metrics, "packed_bytes": math.nan, "compression_ratio": math.nan}
        model = compress.bake_masks_(copy.deepcopy(ctx.result))
        ctx.result = model
        metrics["packed_bytes"] = quant.save_packed(model, ctx.out_dir / "model.qsw")
        with tempfile.TemporaryDirectory() as tmp:  # the FP32 baseline, same architecture
            metrics["fp32_bytes"] = quant.state_dict_bytes(model, Path(tmp) / "fp32.pt")
        metrics["compression_ratio"] = metrics["fp32_bytes"] / metrics["packed_bytes"]
        return metrics


def check_prunable(prune: Any, model: nn.Module) -> list[str]:
    """The layers ``prune`` (the config section) masks in ``model``; a ConfigError naming
    the field where there are none (checked on the driver before Ray, and here)."""
    layers = compress.prunable_layers(model, prune.exclude_first_last)
    if not layers:
        why = "leaves no Linear/Conv layer to prune once the first and last are kept" \
            if prune.exclude_first_last else "has no Linear/Conv layer to prune"
        raise ConfigError(f"prune.schedule={prune.schedule} is invalid for this model: it "
                          f"{why}")
    return layers


def build_prune_stage(cfg: TrialConfig) -> Stage | None:
    return PruneStage(cfg) if cfg.prune.schedule != "none" else None
