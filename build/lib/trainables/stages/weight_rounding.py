"""Weight-only rounding, a trial stage: the trained model's test accuracy with every
linear/conv weight quantized to a number format by :func:`quant.quantize_` (no
calibration; activations are not rounded: they run in the trial's precision).

It runs inside the trial, at its end (``evaluate.weight_rounding=[lns8,lns4,int8,int4]``):
metrics ``test_acc_<format>`` and a file ``weight_rounding.json`` with each format's
accuracy and per-layer signal-to-quantization-noise ratio (dB). The EG-vs-GD study reports
these columns; ``quant.mode=ptq`` is the full PTQ (packed artifact, compression ratio).

Example::

    cfg = TrialConfig().with_overrides(["evaluate.weight_rounding=[lns4]"])
    history = run_trial(cfg, LocalSession())
    history[-1]["test_acc_lns4"]
"""

from __future__ import annotations

import copy
import json
import math

import torch
from torch import nn

from quant import QuantConfig, quantize_, quantized_layers
from quant.metrics import sqnr_db
from quant.named import WEIGHT_ROUNDING_FORMATS
from quant.transforms import Format, strip_qat_
from trainables.config import TrialConfig
from trainables.stages.base import FinalizeContext, Stage, diverged_reason, nonfinite_params

__all__ = ["FORMATS", "WeightRounding", "round_weights", "build_weight_rounding"]

FORMATS = WEIGHT_ROUNDING_FORMATS  # the names evaluate.weight_rounding takes


@torch.no_grad()
def round_weights(model: nn.Module, fmt: Format) -> tuple[nn.Module, dict[str, float]]:
    """A copy of ``model`` with every linear/conv weight quantized by ``fmt``
    (:func:`quant.quantize_`), and each one's SQNR (dB) against the float weight."""
    floats = strip_qat_(copy.deepcopy(model))  # a QAT model: round its float weights
    rounded = quantize_(copy.deepcopy(floats), QuantConfig(weights=fmt))
    per_layer = {f"{fqn}.weight": sqnr_db(floats.get_submodule(fqn).weight,
                                          rounded.get_submodule(fqn).weight)
                 for fqn in quantized_layers(rounded)}
    return rounded, per_layer


class WeightRounding(Stage):
    name = "weight_rounding"

    def __init__(self, formats: tuple[str, ...]) -> None:
        self.formats = formats

    def metric_names(self) -> frozenset[str]:
        return frozenset(f"test_acc_{fmt}" for fmt in self.formats)

    def finalize(self, ctx: FinalizeContext) -> dict[str, float]:
        bad = nonfinite_params(ctx.model)
        if bad:  # a diverged trial: NaN accuracies and a file that says why, not a crash
            if ctx.is_chief:
                (ctx.out_dir / "weight_rounding.json").write_text(json.dumps(
                    {"not_rounded": diverged_reason(bad)}, indent=1))
            return {f"test_acc_{fmt}": math.nan for fmt in self.formats}
        metrics, report = {}, {}
        for fmt in self.formats:
            rounded, per_layer = round_weights(ctx.model, FORMATS[fmt])
            acc = ctx.evaluate(rounded)["test_acc"]
            metrics[f"test_acc_{fmt}"] = acc
            # JSON has no inf: a layer rounded without any error is written as null.
            report[fmt] = {"test_acc": acc, "sqnr_db": {
                k: v if math.isfinite(v) else None for k, v in per_layer.items()}}
        if ctx.is_chief:
            (ctx.out_dir / "weight_rounding.json").write_text(json.dumps(report, indent=1))
        return metrics


def build_weight_rounding(cfg: TrialConfig) -> Stage | None:
    formats = cfg.evaluate.weight_rounding
    return WeightRounding(formats) if formats else None
