"""Accuracy of a trained model as saved, and with its weights rounded to a number format
(weight-only post-training quantization), on the test split.

Until the quantization issue lands its PTQ transforms, this rounds each linear/conv
weight tensor on its own with a plain tensor function (e.g. ``LNSFormat.quantize``,
scale = max |w|); activations stay in float.

Example::

    state = load_state_file("ray_results/.../checkpoint_000002")
    accs = weight_rounding_accuracy(TrialConfig.from_dict(state["config"]), state["model"],
                                    {"lns4": LNSFormat(4, 0).quantize})
"""

from __future__ import annotations

import copy
import functools
from typing import Callable, Mapping

import torch
from torch import nn

from quant.lns import LNSFormat
from trainables.config import DataConfig, TrialConfig
from trainables.data import Splits, load_splits
from trainables.models import build_model

__all__ = ["weight_rounding_accuracy", "LNS_PTQ_FORMATS"]

# Weight formats the EG-vs-GD study reports: sign + 7-bit exponent with 8 codes per octave,
# and sign + 3-bit exponent on powers of two (7 magnitudes down to max/64, and zero).
LNS_PTQ_FORMATS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "lns8": LNSFormat(bits=8, frac_bits=3).quantize,
    "lns4": LNSFormat(bits=4, frac_bits=0).quantize,
}


@torch.no_grad()
def _accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    return correct / total


@functools.lru_cache(maxsize=4)
def _splits(data: DataConfig, seed: int) -> Splits:
    # A study evaluates many trained models of the same dataset and seed: load it once.
    return load_splits(data, seed=seed)


def weight_rounding_accuracy(cfg: TrialConfig, model_state: Mapping[str, torch.Tensor],
                             formats: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
                             ) -> dict[str, float]:
    """``{"fp32": acc, name: acc with every 2+-dim weight tensor rounded by formats[name]}``
    on the test split of ``cfg.data`` (CPU)."""
    splits = _splits(cfg.data, cfg.train.seed)
    model = build_model(cfg.model, splits.in_channels, splits.image_size, splits.num_classes)
    model.load_state_dict(model_state)
    loader = splits.loader("test", cfg.data.test_batch_size, torch.device("cpu"),
                           seed=cfg.train.seed)
    results = {"fp32": _accuracy(model, loader)}
    for name, rounding in formats.items():
        rounded = copy.deepcopy(model)
        with torch.no_grad():
            for p in rounded.parameters():
                if p.dim() >= 2:
                    p.copy_(rounding(p))
        results[name] = _accuracy(rounded, loader)
    return results
