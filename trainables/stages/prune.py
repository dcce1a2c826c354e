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

With ``prune.granularity=channel`` whole output channels go, by L2 norm
(:mod:`compress.channels`): a mask row of zeros, and after every step the layer's bias
and batch-norm scale and shift of those channels are set to 0 (with their optimizer
state), so the channel outputs exactly 0. ``finalize`` then cuts them out (torch-pruning):
the trial's final model is the smaller dense one (``params``, ``macs``,
``channel_sparsity``), and what the quantization stage after this one converts and packs.

Masks are buffers of the model (saved in its state_dict), so resume is exact.

Example::

    cfg = TrialConfig().with_overrides(["prune.schedule=polynomial",
                                        "prune.final_sparsity=0.8", "prune.end=0.7"])
    history = run_trial(cfg, LocalSession())     # history[-1]["sparsity"] == 0.8
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

import compress
import quant
from compress import channels
from compress.prune import masked_layers
from trainables.config import ConfigError, TrialConfig
from trainables.models import macs_of
from trainables.stages.base import (
    Stage,
    StageContext,
    TrainingPlan,
    fp32_bytes,
    nonfinite_params,
)

__all__ = ["PruneStage", "build_prune_stage", "check_prunable"]


class PruneStage(Stage):
    name = "prune"

    def __init__(self, cfg: TrialConfig) -> None:
        self.cfg = cfg.prune
        self.schedule = cfg.prune.sparsity_schedule()
        self.total_steps = 0
        self.packs = cfg.quant.mode == "none"  # else the quantization stage packs
        self.by_channel = cfg.prune.granularity == "channel"
        self.example: torch.Tensor | None = None  # an input for tracing (channels)
        self.groups: list[channels.ChannelGroup] = []
        # What holds the pruned channels at 0, cached between mask changes; rebuilt
        # lazily (after prepare, later stages re-parametrize weights; after a resume,
        # the checkpoint's masks replace the ones prepare made).
        self.held: list[tuple[torch.Tensor, int, torch.Tensor]] | None = None

    def metric_names(self) -> frozenset[str]:
        packed = {"packed_bytes", "fp32_bytes", "compression_ratio"} if self.packs else set()
        shrunk = {"channel_sparsity", "params", "macs"} if self.by_channel else set()
        shrunk_acc = {"test_acc_shrunk"} if self.by_channel and self.packs else set()
        return frozenset({"sparsity", *packed, *shrunk, *shrunk_acc})

    def plan(self, plan: TrainingPlan) -> None:
        self.total_steps = plan.total_steps
        self.example = plan.example_input()

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.example is None:
            raise RuntimeError("prune stage: plan() must come before prepare() (the input "
                               "shape traces the model)")
        self.example = self.example.to(next(model.parameters()).device)
        chosen = check_prunable(self.cfg, model)
        if self.by_channel:
            self.groups = channel_groups_of(self.cfg, model, self.example, chosen)
            chosen = [g.root for g in self.groups]
        compress.attach_masks_(model, lambda m, fqn: fqn in set(chosen))
        self._prune(model, self.schedule.sparsity_at(0, self.total_steps), None)
        return model

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> None:
        if self.schedule.changes_at(step, self.total_steps):
            self._prune(model, self.schedule.sparsity_at(step, self.total_steps), optimizer)
        if self.by_channel:  # biases, batch norms, consumers' columns: held at 0
            if self.held is None:
                self.held = channels.held_at_zero(model, self.groups)
            channels.zero_held_(self.held, optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.held = None  # the restored masks may differ from prepare's

    @torch.no_grad()
    def _prune(self, model: nn.Module, sparsity: float,
               optimizer: torch.optim.Optimizer | None) -> None:
        if sparsity <= 0.0:
            return
        if self.by_channel:
            channels.prune_channels_(model, self.groups, sparsity)
            channels.zero_followers_(model, self.groups, None, optimizer)
            self.held = None
        else:
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
        if self.by_channel:
            metrics.update(self._shrink(ctx))
        if not self.packs:
            return metrics
        if nonfinite_params(ctx.result):  # diverged: nothing worth packing
            return {**metrics, "packed_bytes": math.nan, "compression_ratio": math.nan}
        model = ctx.result if self.by_channel else \
            compress.bake_masks_(copy.deepcopy(ctx.result))
        ctx.result = model
        if self.by_channel:  # the smaller model's own accuracy: what model.qsw scores
            metrics["test_acc_shrunk"] = ctx.evaluate(model)["test_acc"]
        metrics["packed_bytes"] = quant.save_packed(model, ctx.out_dir / "model.qsw")
        metrics["fp32_bytes"] = fp32_bytes(ctx)
        metrics["compression_ratio"] = metrics["fp32_bytes"] / metrics["packed_bytes"]
        return metrics

    def _shrink(self, ctx: StageContext) -> dict[str, float]:
        """Cut the pruned channels out of a copy of the result (its fake-quantizers
        lifted off and put back on the smaller weights); the copy becomes the result."""
        model = copy.deepcopy(ctx.result)
        kept, lifted = channels.cut_pruned_channels_(model, self.groups, self.example)
        for fqn, stack in lifted.items():
            if fqn in kept:
                for p in stack:
                    _cut_channel_state(p, kept[fqn])
        channels.restore_weight_parametrizations_(model, lifted)
        ctx.result = model
        total = sum(g.channels for g in self.groups)
        cut = total - sum(len(v) for v in kept.values())
        return {"channel_sparsity": cut / max(1, total),
                "params": sum(p.numel() for p in model.parameters()),
                "macs": macs_of(model, self.example)}


def _cut_channel_state(p: nn.Module, kept: torch.Tensor) -> None:
    """A fake-quantizer's per-output-channel state (LSQ's learned step) to the kept
    channels; per-tensor state and codebooks stay (the removed values were zeros, inside
    every range)."""
    step = getattr(p, "step", None)
    if isinstance(step, nn.Parameter) and step.ndim == 1 and step.numel() > 1:
        p.step = nn.Parameter(step.detach()[kept.to(step.device)].clone())


@torch.no_grad()
def check_prunable(prune: Any, model: nn.Module, example: torch.Tensor | None = None
                   ) -> list[str]:
    """The layers ``prune`` (the config section) masks in ``model``; a ConfigError naming
    the field where there are none, or (channel pruning, ``example`` an input) where the
    final sparsity would remove every channel of a layer (checked on the driver before
    Ray, and here)."""
    layers = compress.prunable_layers(model, prune.exclude_first_last)
    if not layers:
        why = "leaves no Linear/Conv layer to prune once the first and last are kept" \
            if prune.exclude_first_last else "has no Linear/Conv layer to prune"
        raise ConfigError(f"prune.schedule={prune.schedule} is invalid for this model: it "
                          f"{why}")
    if prune.granularity == "channel" and example is not None:
        channel_groups_of(prune, model, example, layers)
    return layers


def channel_groups_of(prune: Any, model: nn.Module, example: torch.Tensor,
                      layers: list[str]) -> list[channels.ChannelGroup]:
    """The channel groups rooted at ``layers``; a ConfigError naming the field where there
    are none, or where ``prune.final_sparsity`` would remove every channel of one."""
    groups, skipped = channels.channel_groups(model, example, layers)
    if not groups:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
        raise ConfigError("prune.granularity=channel is invalid for this model: no "
                          f"layer's channels can be pruned alone ({reasons}); allowed "
                          "element")
    for g in groups:
        if channels.channels_to_prune(g, prune.final_sparsity) >= g.channels:
            raise ConfigError(
                f"prune.final_sparsity={prune.final_sparsity} is invalid with "
                f"prune.granularity=channel: it removes all {g.channels} output "
                f"channels of {g.root}; allowed a value that keeps one "
                f"(round(final_sparsity x {g.channels}) < {g.channels})")
    return groups


def build_prune_stage(cfg: TrialConfig) -> Stage | None:
    return PruneStage(cfg) if cfg.prune.schedule != "none" else None
