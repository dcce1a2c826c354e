"""Model transforms (torchao-shaped): PTQ ``quantize_``, QAT ``prepare_qat_`` / ``convert_``.

A :class:`QuantConfig` says which number format each layer's weights use: one default
(``weights``) and per-layer ``overrides`` by name pattern (``fnmatch`` on the layer's
fully qualified name; ``None`` keeps a layer in float): mixed precision is a mapping.
``filter_fn(module, fqn)`` selects layers (default: every ``nn.Linear`` and ``nn.Conv*d``).

- :func:`prepare_qat_` registers a fake-quant parametrization on each selected weight:
  the forward pass sees ``fmt.fake_quantize(w)``, the backward pass the straight-through
  estimator (gradient of the identity), and the optimizer keeps updating the float
  weight underneath.
- :func:`convert_` bakes the quantized values in (the weight *is* the dequantized
  tensor, equal to what the QAT forward pass saw) and keeps the format and the codes on
  the module (``module.weight_format``, ``module.weight_encoded``) for
  :func:`quant.save_packed`.
- :func:`quantize_` (PTQ) is ``prepare_qat_`` then ``convert_``: QAT's convert and PTQ of
  the same weights give the same model by construction.

Weights only for now: activations stay in float, and BatchNorm is kept (not folded).

Example::

    quantize_(model, QuantConfig(weights=IntFormat(bits=4, symmetric=True, per_channel=True),
                                 overrides=(("features.0", IntFormat(bits=8)),)))
    save_packed(model, "model.qsw")
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from quant.codebook import CodebookFormat
from quant.floatfmt import FloatFormat
from quant.intfmt import IntFormat
from quant.lns import LNSFormat

__all__ = ["QuantConfig", "Format", "quantize_", "prepare_qat_", "convert_",
           "default_filter", "WeightFakeQuant", "quantized_layers"]

Format = Union[IntFormat, FloatFormat, LNSFormat, CodebookFormat]
FORMAT_TYPES = (IntFormat, FloatFormat, LNSFormat, CodebookFormat)
FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class QuantConfig:
    """Weight format per layer: ``weights`` unless an ``overrides`` pattern matches the
    layer's name first (a ``None`` format leaves the layer in float)."""

    weights: Format
    overrides: tuple[tuple[str, Format | None], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.weights, FORMAT_TYPES):
            raise ValueError(f"weights={self.weights!r} is invalid: allowed an IntFormat, "
                             "FloatFormat, LNSFormat or CodebookFormat")
        for i, entry in enumerate(self.overrides):
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
                    and (entry[1] is None or isinstance(entry[1], FORMAT_TYPES))):
                raise ValueError(f"overrides[{i}]={entry!r} is invalid: allowed a pair "
                                 "(name pattern, format or None)")

    def format_for(self, fqn: str) -> Format | None:
        for pattern, fmt in self.overrides:
            if fnmatch.fnmatchcase(fqn, pattern):
                return fmt
        return self.weights


def default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


class WeightFakeQuant(nn.Module):
    """Parametrization: forward ``fake_quantize(w)``, backward straight through."""

    def __init__(self, fmt: Format) -> None:
        super().__init__()
        self.fmt = fmt
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return w + (self.fmt.fake_quantize(w.detach()) - w).detach()


def _selected(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None
              ) -> list[tuple[str, nn.Module, Format]]:
    chosen = []
    for fqn, module in model.named_modules():
        if (filter_fn or default_filter)(module, fqn) and getattr(module, "weight", None) \
                is not None:
            fmt = config.format_for(fqn)
            if fmt is not None:
                chosen.append((fqn, module, fmt))
    return chosen


def prepare_qat_(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None
                 ) -> nn.Module:
    """Fake-quantize the selected weights in every forward pass (in place; returns it)."""
    for _, module, fmt in _selected(model, config, filter_fn):
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"{type(module).__name__} is already prepared for QAT")
        parametrize.register_parametrization(module, "weight", WeightFakeQuant(fmt))
    return model


def convert_(model: nn.Module) -> nn.Module:
    """Replace each fake-quantized weight by its quantized values (in place)."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            (fq,) = [p for p in module.parametrizations["weight"]
                     if isinstance(p, WeightFakeQuant)]
            original = module.parametrizations["weight"].original
            _unparametrize(module)
            with torch.no_grad():
                # The codes are kept: re-quantizing a quantized tensor need not give the same
                # codes (INT's min-max scale of the rounded tensor differs), and the packed
                # artifact must hold exactly what was evaluated.
                encoded = fq.fmt.quantize(original)
                weight = fq.fmt.dequantize(encoded, dtype=original.dtype)
            module.weight = nn.Parameter(weight, requires_grad=original.requires_grad)
            module.weight_format = fq.fmt
            module.weight_encoded = encoded
    return model


def _unparametrize(module: nn.Module) -> None:
    """Undo the weight parametrization of this module only. (torch's
    remove_parametrizations deletes the property from the module's generated class,
    which ``copy.deepcopy`` shares between a model and its copy: converting a copy would
    break the original.)"""
    if set(module.parametrizations) != {"weight"}:
        raise ValueError(f"{type(module).__name__} has other parametrizations: "
                         f"{sorted(module.parametrizations)}")
    module.__class__ = module.__class__.__bases__[0]
    del module._modules["parametrizations"]


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None
              ) -> nn.Module:
    """Post-training quantization of the selected weights (in place; returns it)."""
    with torch.no_grad():
        return convert_(prepare_qat_(model, config, filter_fn))


def quantized_layers(model: nn.Module) -> dict[str, Any]:
    """fqn -> weight format of every converted layer."""
    return {fqn: m.weight_format for fqn, m in model.named_modules()
            if hasattr(m, "weight_format")}
