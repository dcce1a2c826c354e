"""The LC (learning-compression) algorithm as a trial stage (the ``lc`` section, see
:class:`trainables.config.LCSection`; the algorithm: :mod:`compress.lc`).

Training is cut into segments of optimizer steps, known at ``plan``: the reference epochs
(``train.epochs - lc.steps x lc.epochs_per_step``), then ``lc.steps`` L steps.

- At the end of the reference epochs (at step 0 when there are none: ``train.init_from``
  gives the reference and ``train.epochs = lc.steps x lc.epochs_per_step``): the direct
  compression, the first C step.
- During L step k: ``penalty`` adds ``mu_k/2 ||w - Delta(theta) - lambda/mu_k||^2``; the
  learning rate follows ``optim.schedule`` afresh over the L step, from
  ``optim.lr x lc.lr_decay^k`` (``lr_segment``).
- At the end of L step k (``after_step`` on its last optimizer step): the C step with
  ``mu_k`` and the multiplier update.
- Every epoch: ``lc_step`` (the L step in progress, -1 while training the reference),
  ``lc_mu``, ``lc_distance`` (``||w - Delta(theta)||^2 / ||w||^2``), and the compressed
  model's accuracy on the selection split (``val_acc_lc``; test without one) and its
  ``packed_bytes`` (before the first C step: of direct compression of the weights so
  far, a preview that changes nothing).
- ``finalize``: the compressed model ``Delta(theta)`` of the last C step becomes the
  trial's result: low-rank layers factorized (:class:`compress.lowrank.LowRank`, their
  ranks read back from the file's shapes), codebook and int layers encoded, pruned ones
  stored sparse; evaluated (``test_acc_lc``, ``test_loss_lc``), packed (``model.qsw``,
  ``packed_bytes``, ``compression_ratio``), counted (``params``, ``macs``), and
  described per layer in ``lc.json``.

The stage's state (the compressed targets, multipliers, C steps done) is in every
checkpoint: a resume between or inside L steps continues exactly.

Example::

    cfg = TrialConfig().with_overrides(["model.name=mlp", "lc.linear=codebook:2",
                                        "train.epochs=6", "lc.steps=4"])
    history = run_trial(cfg, LocalSession())   # history[-1]["test_acc_lc"]
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import torch
from torch import nn

import quant
from compress.lc import LC, Compression, layer_weight, parse_compression, parse_layer_map
from compress.lowrank import factorize_
from trainables.config import ConfigError, TrialConfig
from trainables.models import macs_of
from trainables.stages.base import (
    Stage,
    StageContext,
    TrainingPlan,
    diverged_reason,
    fp32_bytes,
    nonfinite_params,
)

__all__ = ["LCStage", "build_lc_stage", "lc_tasks", "encode_compressed_"]


def lc_tasks(cfg: TrialConfig, model: nn.Module) -> dict[str, Compression]:
    """{layer: compression} from ``lc.conv``, ``lc.linear`` and ``lc.layers``; a
    ConfigError names the field whose compression names no layer or does not fit one."""
    lc = cfg.lc
    by_type = {"conv": (nn.Conv2d, parse_compression(lc.conv)),
               "linear": (nn.Linear, parse_compression(lc.linear))}
    tasks: dict[str, Compression] = {}
    for field, (kind, spec) in by_type.items():
        if spec.kind == "none":
            continue
        # A type-wide low-rank leaves grouped (depthwise) convolutions as they are: their
        # weight is not one matrix.
        names = [n for n, m in model.named_modules() if type(m) is kind and not
                 (spec.kind == "lowrank" and getattr(m, "groups", 1) != 1)]
        if not names:
            raise ConfigError(f"lc.{field}={getattr(lc, field)!r} names no layer: "
                              f"{cfg.model.name} has no {kind.__name__}")
        tasks.update(dict.fromkeys(names, spec))
    for name, spec in parse_layer_map(lc.layers).items():
        try:
            layer_weight(model, name)
        except ValueError as exc:
            raise ConfigError(f"lc.layers={lc.layers!r} is invalid: {exc}") from None
        tasks[name] = spec
    for name, spec in tasks.items():
        module = model.get_submodule(name)
        if spec.kind == "lowrank" and isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ConfigError(f"lc.layers={lc.layers!r} is invalid: lowrank is invalid for "
                              f"{name} (a grouped convolution: its weight is not one "
                              "matrix): allowed codebook, prune, int, none")
        try:
            spec.check_layer(name, module.weight)
        except ValueError as exc:
            field = _field_of(cfg, name, module)
            raise ConfigError(f"lc.{field}={getattr(lc, field)!r} is invalid: {exc}") \
                from None
    tasks = {n: s for n, s in tasks.items() if s.kind != "none"}
    if not tasks:
        raise ConfigError(f"lc.layers={lc.layers!r} is invalid: it sets every layer lc.conv "
                          "/ lc.linear compress to none, leaving LC nothing to compress")
    return tasks


def _field_of(cfg: TrialConfig, name: str, module: nn.Module) -> str:
    if name in parse_layer_map(cfg.lc.layers):
        return "layers"
    return "conv" if isinstance(module, nn.Conv2d) else "linear"


class LCStage(Stage):
    name = "lc"

    def __init__(self, cfg: TrialConfig) -> None:
        self.cfg = cfg
        self.lc: LC | None = None
        self.c_steps = 0  # C steps done: 1 after direct compression, k + 2 after L step k
        self.bounds: list[int] = []  # the optimizer step each C step follows
        self.steps_per_epoch = 1
        self.reference_epochs = 0
        self.epochs_done = 0
        self.example: torch.Tensor | None = None
        self.device = torch.device("cpu")

    def metric_names(self) -> frozenset[str]:
        return frozenset({"lc_step", "lc_mu", "lc_distance", "val_acc_lc", "test_acc_lc",
                          "test_loss_lc", "extra_acc_lc", "packed_bytes", "fp32_bytes",
                          "compression_ratio", "params", "macs", "efficiency_score"})

    # -- before training ------------------------------------------------------------------
    def plan(self, plan: TrainingPlan) -> None:
        lc, spe = self.cfg.lc, plan.steps_per_epoch
        reference = plan.epochs - lc.lc_epochs
        self.steps_per_epoch, self.reference_epochs = spe, reference
        self.bounds = [(reference + j * lc.epochs_per_step) * spe for j in range(lc.steps + 1)]
        self.example = plan.example_input()

    def prepare(self, model: nn.Module) -> nn.Module:
        lc = self.cfg.lc
        self.device = next(model.parameters()).device
        self.lc = LC(lc_tasks(self.cfg, model), lc.mu0, lc.growth, lc.lagrangian)
        self._c_steps_due(0, model)  # no reference epochs: compress train.init_from's model
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"c_steps": self.c_steps, "epochs_done": self.epochs_done,
                "lc": self.lc.state_dict() if self.lc else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c_steps = int(state["c_steps"])
        self.epochs_done = int(state["epochs_done"])
        if self.lc is not None and state["lc"] is not None:
            self.lc.load_state_dict(state["lc"])
            self.lc.to_(self.device)  # read onto the CPU; the model may be on a GPU

    # -- training -------------------------------------------------------------------------
    def _l_step(self) -> int | None:
        """The L step in progress (None before the direct compression and after the last
        C step)."""
        return self.c_steps - 1 if 1 <= self.c_steps <= self.cfg.lc.steps else None

    def _c_steps_due(self, step: int, model: nn.Module) -> None:
        if self.c_steps < len(self.bounds) and step == self.bounds[self.c_steps] and \
                nonfinite_params(model):
            return  # diverged: the loop stops the trial; nothing to project
        while self.c_steps < len(self.bounds) and step == self.bounds[self.c_steps]:
            self.lc.c_step(model, self.c_steps - 1)  # k = -1: the direct compression
            self.c_steps += 1

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        k = self._l_step()
        return None if k is None else self.lc.penalty(model, k)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> None:
        self._c_steps_due(step, model)

    def lr_segment(self, step: int) -> tuple[int, int, float] | None:
        """(first step, length, lr scale) of the segment holding optimizer step ``step``
        (0-based): the reference epochs, or L step k (``lc.lr_decay^k``)."""
        lc = self.cfg.lc
        if not self.bounds or step < self.bounds[0]:
            return 0, max(1, self.bounds[0] if self.bounds else 1), 1.0
        k = min(lc.steps - 1, sum(1 for b in self.bounds[1:] if b <= step))
        if k < 0:  # no L step (direct compression only): the reference segment goes on
            return 0, max(1, self.bounds[0]), 1.0
        return self.bounds[k], lc.epochs_per_step * self.steps_per_epoch, lc.lr_decay ** k

    def epoch_end(self, ctx: StageContext) -> dict[str, float]:
        """Every epoch (what a search ranks trials by): the compressed model's accuracy on
        the selection split and its packed bytes; before the first C step, those of
        direct compression of the weights so far (a preview: the state is unchanged)."""
        # The L step this epoch trained in (-1: the reference model's training).
        k = (self.epochs_done - self.reference_epochs) // self.cfg.lc.epochs_per_step \
            if self.epochs_done >= self.reference_epochs else -1
        self.epochs_done += 1
        split = "val" if "val" in ctx.splits else "test"
        metrics = {"lc_step": k, "lc_mu": self.lc.mu(k) if k >= 0 else 0.0}
        if nonfinite_params(ctx.model):  # diverged: nothing to compress (NaN, not a crash)
            return {**metrics, f"{split}_acc_lc": math.nan, "packed_bytes": math.nan}
        lc = self.lc
        if lc.targets:
            metrics["lc_distance"] = lc.distance(ctx.model)
        else:
            lc = LC(lc.tasks, lc.mu0, lc.growth, lc.lagrangian)
            lc.c_step(ctx.model, -1)
        compressed = encode_compressed_(copy.deepcopy(ctx.model), lc)
        metrics[f"{split}_acc_lc"] = ctx.evaluate(compressed, split)[f"{split}_acc"]
        metrics["packed_bytes"] = quant.save_packed(compressed, ctx.out_dir / "epoch.qsw")
        return metrics

    # -- the end ----------------------------------------------------------------------------
    def finalize(self, ctx: StageContext) -> dict[str, float]:
        bad = nonfinite_params(ctx.result)
        if bad or not self.lc.targets:
            reason = diverged_reason(bad) if bad else "no C step ran"
            if ctx.is_chief:
                (ctx.out_dir / "lc.json").write_text(json.dumps(
                    {"not_compressed": reason}, indent=1))
            return {"test_acc_lc": math.nan, "test_loss_lc": math.nan,
                    "packed_bytes": math.nan, "compression_ratio": math.nan}
        model = encode_compressed_(copy.deepcopy(ctx.result), self.lc)
        ctx.result = model
        result = ctx.evaluate(model)
        metrics = {"test_acc_lc": result["test_acc"], "test_loss_lc": result["test_loss"]}
        if "extra" in ctx.splits:
            metrics["extra_acc_lc"] = ctx.evaluate(model, "extra")["extra_acc"]
        metrics["packed_bytes"] = quant.save_packed(model, ctx.out_dir / "model.qsw")
        metrics["fp32_bytes"] = fp32_bytes(ctx)
        metrics["compression_ratio"] = metrics["fp32_bytes"] / metrics["packed_bytes"]
        metrics["params"] = sum(p.numel() for p in model.parameters())
        if self.example is not None:
            metrics["macs"] = macs_of(model, self.example.to(self.device))
        chance = 1.0 / ctx.data_shape[2]
        metrics["efficiency_score"] = metrics["compression_ratio"] * max(
            0.0, (metrics["test_acc_lc"] - chance) / (1.0 - chance))
        if ctx.is_chief:
            (ctx.out_dir / "lc.json").write_text(json.dumps(
                {"layers": describe_layers(self.lc), **metrics,
                 "data_shape": list(ctx.data_shape)}, indent=1))
        return metrics


def encode_compressed_(model: nn.Module, lc: LC) -> nn.Module:
    """The model holding ``Delta(theta)``, in the form its packed file stores: low-rank
    layers replaced by their factors (:func:`compress.lowrank.factorize_`), codebook and
    int layers given their codes (``weight_format`` / ``weight_encoded``, what
    :func:`quant.save_packed` writes at their bits), pruned layers' zeros stored by
    position. In place; returns the model."""
    from quant.codebook import CodebookFormat
    from quant.intfmt import IntFormat

    lc.compressed_(model)
    ranks = {n: r for n, r in lc.ranks().items() if r > 0}
    for name, spec in lc.tasks.items():
        module = model.get_submodule(name)
        if spec.kind == "codebook":
            fmt = CodebookFormat(spec.k)
            enc = fmt.quantize(module.weight)
        elif spec.kind == "int":
            fmt = IntFormat(spec.bits)
            scale = lc.encodings[name]["scale"]
            enc = fmt.quantize(module.weight, scale, torch.zeros((), dtype=torch.int64))
        else:
            continue
        with torch.no_grad():  # exact already: the codes decode to the projection
            module.weight.copy_(fmt.dequantize(enc, dtype=module.weight.dtype))
        module.weight_format, module.weight_encoded = fmt, enc
    return factorize_(model, ranks)


def describe_layers(lc: LC) -> dict[str, dict[str, Any]]:
    """Per compressed layer: its compression, rank, non-zeros and distinct values."""
    out = {}
    ranks = lc.ranks()
    for name, spec in lc.tasks.items():
        target = lc.targets[name]
        entry = {"compression": str(spec), "shape": list(target.shape),
                 "nonzeros": int((target != 0).sum()),
                 "distinct_values": int(torch.unique(target).numel())}
        if name in ranks:
            entry["rank"] = ranks[name]
        out[name] = entry
    return out


def build_lc_stage(cfg: TrialConfig) -> Stage | None:
    return LCStage(cfg) if cfg.lc.enabled else None
