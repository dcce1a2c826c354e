"""Weight-only rounding, a trial stage: the trained model's test accuracy with every
linear/conv weight tensor rounded to a number format (per tensor, scale = max |w|;
activations are not rounded: they run in the trial's precision, fp32 or autocast).

It runs inside the trial, at its end (``evaluate.weight_rounding=[lns8,lns4]``): metrics
``test_acc_<format>`` and a file ``weight_rounding.json`` with each format's accuracy and
per-layer signal-to-quantization-noise ratio (dB). Until the quantization issue lands its
PTQ transforms, this is what the EG-vs-GD study reports for rounded weights.

Example::

    cfg = TrialConfig().with_overrides(["evaluate.weight_rounding=[lns4]"])
    history = run_trial(cfg, LocalSession())
    history[-1]["test_acc_lns4"]
"""

from __future__ import annotations

import copy
import json
import math
from typing import Callable

import torch
from torch import nn

from quant.lns import LNSFormat
from trainables.config import TrialConfig
from trainables.stages import FinalizeContext, Stage, register_stage_builder

__all__ = ["FORMATS", "WeightRounding", "round_weights", "sqnr_db"]

# sign + 7-bit exponent with 8 codes per octave; sign + 3-bit exponent on powers of two
# (7 magnitudes down to max/64, and zero).
FORMATS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "lns8": LNSFormat(bits=8, frac_bits=3).fake_quantize,
    "lns4": LNSFormat(bits=4, frac_bits=0).fake_quantize,
}


def sqnr_db(x: torch.Tensor, q: torch.Tensor) -> float:
    """10 log10(sum x^2 / sum (x - q)^2) in float64; inf when q == x exactly."""
    x, q = x.detach().double(), q.detach().double()
    noise = (x - q).pow(2).sum().item()
    signal = x.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


@torch.no_grad()
def round_weights(model: nn.Module, rounding: Callable[[torch.Tensor], torch.Tensor]
                  ) -> tuple[nn.Module, dict[str, float]]:
    """A copy of ``model`` with every 2+-dim parameter rounded, and each one's SQNR (dB)."""
    rounded = copy.deepcopy(model)
    per_layer = {}
    for name, p in rounded.named_parameters():
        if p.dim() >= 2:
            q = rounding(p)
            per_layer[name] = sqnr_db(p, q)
            p.copy_(q)
    return rounded, per_layer


class WeightRounding(Stage):
    name = "weight_rounding"

    def __init__(self, formats: tuple[str, ...]) -> None:
        self.formats = formats

    def finalize(self, ctx: FinalizeContext) -> dict[str, float]:
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


@register_stage_builder
def _build(cfg: TrialConfig) -> Stage | None:
    formats = cfg.evaluate.weight_rounding
    return WeightRounding(formats) if formats else None
