"""Weight quantization as a trial stage (``quant.mode=ptq|qat``, see
:class:`trainables.config.QuantSection`).

- ``qat``: ``prepare`` registers fake-quantized weights before the optimizer is built, so
  every training step (and every epoch's evaluation) runs the quantized forward pass with
  a straight-through backward; with ``quant.qat_start_epoch=n`` the first n epochs train
  in float (fake quantization off, switched on after epoch n's evaluation). Checkpoints
  hold the float weights under the parametrization (and the epoch count), so resume is
  exact.
- ``ptq``: training is untouched.
- At the end (both): a copy of the trained model is converted (QAT) or quantized (PTQ),
  evaluated on the test split (``test_acc_q``, ``test_loss_q``), and written packed
  (``model.qsw``); metrics ``packed_bytes``, ``fp32_bytes`` (``torch.save`` of the
  configured architecture's FP32 ``state_dict``, before channels are cut),
  ``compression_ratio``, ``weight_sqnr_db_mean``, and
  ``quant.json`` with each layer's format and SQNR (dB) of the quantized against the float
  weights, ``weights_q.png`` (per-layer histograms, float and quantized),
  ``confusion_q.png`` (the quantized model on the test split), and ``efficiency_score`` =
  compression ratio x the share of above-chance accuracy kept.
- Every epoch: the quantized copy's accuracy on the validation split (``val_acc_q``; test
  without one), ``packed_bytes``, ``bitops`` (:func:`bitops_of`: the compute cost a
  bit-width search can minimize where measured latency cannot tell bit widths apart),
  and ``budget_score`` = that accuracy minus the relative
  overshoot of ``quant.byte_budget`` (when set): what ``sweeps/quant_bits.py`` searches.

Example::

    cfg = TrialConfig().with_overrides(["quant.mode=qat", "quant.bits=4"])
    history = run_trial(cfg, LocalSession(checkpoint_dir="ckpt"))   # ckpt/artifacts/model.qsw
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import torch
from torch import nn

import quant
from quant.metrics import sqnr_db
from trainables.config import ConfigError, TrialConfig
from trainables.plots import plot_confusion, plot_weight_histograms
from trainables.stages.base import (
    Stage,
    StageContext,
    diverged_reason,
    fp32_bytes,
    nonfinite_params,
)

__all__ = ["QuantStage", "quant_config", "quantizable_layers", "build_quant_stage",
           "bitops_of"]

CALIBRATION_BATCHES = 8  # PTQ of activations: training batches that set the input ranges


def quant_config(cfg: TrialConfig, model: nn.Module) -> quant.QuantConfig:
    """The :class:`quant.QuantConfig` of a trial: one format, the first and last
    quantizable layers at ``first_last_bits`` when set."""
    q = cfg.quant
    overrides = ()
    layers = quantizable_layers(model)
    if q.first_last_bits:
        edge = q.weight_format(q.first_last_bits)
        overrides = tuple((name, edge) for name in dict.fromkeys((layers[0], layers[-1])))
    if q.layer_bits:
        if len(q.layer_bits) != len(layers):
            raise ConfigError(f"quant.layer_bits={list(q.layer_bits)} is invalid for this "
                              f"model: allowed {len(layers)} bit widths, one per layer "
                              f"({', '.join(layers)})")
        overrides = tuple((name, q.weight_format(bits))
                          for name, bits in zip(layers, q.layer_bits, strict=True))
    return quant.QuantConfig(weights=q.weight_format(), overrides=overrides,
                             activations=q.activation_quant_format(), observer=q.observer,
                             gradients=q.gradient_quant_format(), lsq=q.lsq)


def quantizable_layers(model: nn.Module) -> list[str]:
    """The names of the layers a QuantConfig quantizes (Linear, Conv), in model order."""
    return [n for n, m in model.named_modules() if quant.transforms.default_filter(m, n)]


def bitops_of(model: nn.Module, config: quant.QuantConfig, example: torch.Tensor) -> int:
    """Bit operations of one forward pass at batch 1 (BOPs, as in Baalen et al. 2020's
    Bayesian Bits): the sum over Linear/Conv layers of MACs x weight bits x input bits,
    a float weight or input counting 32. The bits are those a multiplier sees: an INT or
    LNS weight its width (LNS: a shift-add on the exponent, counted like an INT of its
    width), a codebook's entries are floats (32: the index width is storage, not
    arithmetic), FP16/BF16 16. Deterministic, unlike latency on a shared machine, and it
    tells 4 from 8 bits apart, which the CPU's INT8 kernels do not."""
    from torch.utils.flop_counter import FlopCounterMode

    training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(training)
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__
    act_bits = config.activations.bits if config.activations is not None else 32
    total = 0
    for fqn in quantizable_layers(model):
        fmt = config.format_for(fqn)
        w_bits = 32 if fmt is None or isinstance(fmt, quant.CodebookFormat) else fmt.bits
        total += flops.get(f"{root}.{fqn}", 0) // 2 * w_bits * (act_bits if fmt else 32)
    return total


def _float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer fqn -> the float weight its quantizer sees (under a QAT parametrization: the
    original, through any mask stacked before the quantizer)."""
    return {fqn: quant.transforms.float_weight(module)
            for fqn, module in model.named_modules()
            if quant.transforms.default_filter(module, fqn)}


class QuantStage(Stage):
    name = "quant"

    def __init__(self, cfg: TrialConfig) -> None:
        self.cfg = cfg
        self.model: nn.Module | None = None
        self.epochs_done = 0

    def metric_names(self) -> frozenset[str]:
        return frozenset({"val_acc_q", "test_acc_q", "test_loss_q", "extra_acc_q",
                          "packed_bytes", "budget_score", "bitops", "weight_sqnr_db_mean",
                          "fp32_bytes", "compression_ratio", "efficiency_score"})

    def _qat_on(self) -> bool:
        return self.epochs_done >= self.cfg.quant.qat_start_epoch

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.cfg.quant.mode == "qat":
            quant.prepare_qat_(model, quant_config(self.cfg, model))
            quant.transforms.set_qat_enabled_(model, self._qat_on())
            self.model = model
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"epochs_done": self.epochs_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs_done = int(state["epochs_done"])
        if self.model is not None:
            quant.transforms.set_qat_enabled_(self.model, self._qat_on())

    def _quantized_copy(self, source: nn.Module, ctx: StageContext) -> nn.Module:
        """A quantized copy of ``source`` (the trained model, or the earlier stages'
        result): QAT's converted, else PTQ (calibrated when activations are quantized)."""
        model = copy.deepcopy(source)
        if self.cfg.quant.mode == "qat":
            return quant.convert_(model)
        calibration = ctx.train_batches(CALIBRATION_BATCHES) \
            if self.cfg.quant.activation_bits else None
        return quant.quantize_(model, quant_config(self.cfg, model), calibration=calibration)

    def epoch_end(self, ctx: StageContext) -> dict[str, float]:
        """The quantized model's accuracy on the selection split (val when held out) and
        its packed size, every epoch: what a bit-width search ranks trials by."""
        split = "val" if "val" in ctx.splits else "test"
        if nonfinite_params(ctx.model):  # diverged: nothing to quantize, NaN (not a crash)
            self._advance()
            return {f"{split}_acc_q": math.nan, "packed_bytes": math.nan,
                    "budget_score": math.nan, "bitops": math.nan}
        model = self._quantized_copy(ctx.model, ctx)
        if self.model is not None and self._qat_on():
            # The epoch's own evaluation already ran the quantized forward pass, which the
            # converted copy reproduces exactly: no second pass over the split. (Exact as
            # long as no earlier stage changes the model in its own epoch_end.)
            acc = ctx.epoch_metrics[f"{split}_acc"]
        else:
            acc = ctx.evaluate(model, split)[f"{split}_acc"]
        nbytes = quant.save_packed(model, ctx.out_dir / "epoch.qsw")
        budget = self.cfg.quant.byte_budget
        # Over the budget costs accuracy in proportion: a searcher can tell 10% from 2x.
        score = acc - max(0.0, nbytes / budget - 1.0) if budget else acc
        self._advance()
        return {f"{split}_acc_q": acc, "packed_bytes": nbytes, "budget_score": score,
                "bitops": self._bitops(ctx.model, ctx)}

    def _bitops(self, model: nn.Module, ctx: StageContext) -> int:
        """Of the model as it is now (an earlier stage may have cut channels)."""
        from trainables.models import example_input

        device = next(model.parameters()).device
        return bitops_of(model, quant_config(self.cfg, model),
                         example_input(ctx.data_shape, device))

    def _advance(self) -> None:
        self.epochs_done += 1
        if self.model is not None and self._qat_on():  # the float warm-up is over
            quant.transforms.set_qat_enabled_(self.model, True)

    def finalize(self, ctx: StageContext) -> dict[str, float]:
        bad = nonfinite_params(ctx.result)
        if bad:  # a diverged trial: say so in its metrics and file, do not fail it
            if ctx.is_chief:
                (ctx.out_dir / "quant.json").write_text(json.dumps(
                    {"mode": self.cfg.quant.mode, "not_quantized": diverged_reason(bad)},
                    indent=1))
            return {"test_acc_q": math.nan, "test_loss_q": math.nan, "bitops": math.nan}
        floats = _float_weights(ctx.result)
        model = self._quantized_copy(ctx.result, ctx)
        if not quant.quantized_layers(model):  # an earlier stage replaced the QAT layers
            raise RuntimeError("quant stage: the model the earlier stages produced holds no "
                               "fake-quantized layer to convert (was a layer replaced or "
                               "its parametrization removed?)")
        ctx.result = model  # what later stages (export) start from
        result = ctx.evaluate(model)
        layers = {}
        for fqn, fmt in quant.quantized_layers(model).items():
            module = model.get_submodule(fqn)
            db = sqnr_db(floats[fqn], module.weight)
            layers[fqn] = {"format": quant.packed.format_to_dict(fmt),
                           "sqnr_db": db if math.isfinite(db) else None}
        metrics = {"test_acc_q": result["test_acc"], "test_loss_q": result["test_loss"]}
        if "extra" in ctx.splits:  # generalization of the quantized model (data.extra_test)
            metrics["extra_acc_q"] = ctx.evaluate(model, "extra")["extra_acc"]
        finite = [v["sqnr_db"] for v in layers.values() if v["sqnr_db"] is not None]
        metrics["weight_sqnr_db_mean"] = sum(finite) / len(finite) if finite else math.nan
        packed = ctx.out_dir / "model.qsw"
        metrics["packed_bytes"] = quant.save_packed(model, packed)
        metrics["bitops"] = self._bitops(ctx.result, ctx)
        metrics["fp32_bytes"] = fp32_bytes(ctx)
        metrics["compression_ratio"] = metrics["fp32_bytes"] / metrics["packed_bytes"]
        confusion = _confusion(model, ctx)
        chance = 1.0 / len(confusion)
        # Compression times the share of above-chance accuracy kept: 8x at full accuracy
        # scores 8, 8x at chance scores 0 (defined for PTQ and QAT alike).
        metrics["efficiency_score"] = metrics["compression_ratio"] * max(
            0.0, (metrics["test_acc_q"] - chance) / (1.0 - chance))
        if ctx.is_chief:
            (ctx.out_dir / "quant.json").write_text(json.dumps(
                {"mode": self.cfg.quant.mode, "layers": layers, **metrics,
                 "data_shape": list(ctx.data_shape), "confusion": confusion.tolist()},
                indent=1))
            plot_weight_histograms(floats, model, ctx.out_dir / "weights_q.png")
            plot_confusion(confusion, ctx.out_dir / "confusion_q.png",
                           f"quantized model, test accuracy {metrics['test_acc_q']:.4f}")
        return metrics


@torch.no_grad()
def _confusion(model: nn.Module, ctx: StageContext) -> torch.Tensor:
    """Counts [true class, predicted class] on the test split, summed over DDP ranks."""
    import torch.distributed as dist

    model.eval()
    counts = None
    for x, y in ctx.eval_batches("test"):
        logits = model(x)
        if counts is None:
            counts = torch.zeros(logits.shape[1], logits.shape[1], dtype=torch.int64,
                                 device=logits.device)
        index = y * logits.shape[1] + logits.argmax(1)
        counts += torch.bincount(index, minlength=counts.numel()).reshape(counts.shape)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return counts.cpu()


def build_quant_stage(cfg: TrialConfig) -> Stage | None:
    return QuantStage(cfg) if cfg.quant.mode != "none" else None
