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

Activations (``QuantConfig.activations``): the input of each quantized layer, per tensor,
observed during QAT or from calibration batches in PTQ. BatchNorm is kept (not folded).

Example::

    quantize_(model, QuantConfig(weights=IntFormat(bits=4, symmetric=True, per_channel=True),
                                 overrides=(("features.0", IntFormat(bits=8)),)))
    save_packed(model, "model.qsw")
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from quant.activations import ActivationQuant, attach_input_quant
from quant.codebook import CodebookFormat
from quant.codes import all_finite
from quant.floatfmt import FloatFormat
from quant.gradients import (
    attach_gradient_rounding,
    check_gradient_format,
    detach_gradient_rounding,
    gradient_rounded,
    set_gradient_rounding_enabled,
)
from quant.intfmt import IntFormat
from quant.lns import LNSFormat

__all__ = ["QuantConfig", "Format", "quantize_", "prepare_qat_", "convert_", "calibrate_",
           "strip_qat_", "set_qat_enabled_",
           "default_filter", "WeightFakeQuant", "quantized_layers", "input_quantizers",
           "fake_quant_of", "float_weight"]

Format = Union[IntFormat, FloatFormat, LNSFormat, CodebookFormat]
FORMAT_TYPES = (IntFormat, FloatFormat, LNSFormat, CodebookFormat)
FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class QuantConfig:
    """Weight format per layer: ``weights`` unless an ``overrides`` pattern matches the
    layer's name first (a ``None`` format leaves the layer in float). ``activations``: a
    per-tensor :class:`IntFormat` or an :class:`LNSFormat` for the input of every
    quantized layer (None: float), its range from ``observer`` (see
    :mod:`quant.activations`). ``gradients`` (QAT): the format the gradients of each
    quantized layer's output and weight are rounded to in the backward pass (None:
    float; see :mod:`quant.gradients`). ``lsq`` (QAT, symmetric INT weights): each
    weight's step size is a trained parameter (LSQ, Esser et al. 2020), not min-max."""

    weights: Format
    overrides: tuple[tuple[str, Format | None], ...] = ()
    activations: IntFormat | LNSFormat | None = None
    observer: str = "moving_average"
    gradients: IntFormat | LNSFormat | None = None  # rounded in backward: quant.gradients
    lsq: bool = False  # learned step sizes (LSQ) for symmetric INT weights

    def __post_init__(self) -> None:
        if not isinstance(self.lsq, bool):
            raise ValueError(f"lsq={self.lsq!r} is invalid: allowed True or False")
        if self.lsq:
            for fmt in (self.weights, *(f for _, f in self.overrides if f is not None)):
                if not (isinstance(fmt, IntFormat) and fmt.symmetric):
                    raise ValueError(f"lsq=True is invalid with weights {fmt!r}: allowed "
                                     "symmetric IntFormat weights only (a learned step "
                                     "with zero point 0)")
        if self.activations is not None:
            ActivationQuant(self.activations, self.observer)  # validates both
        if self.gradients is not None:
            check_gradient_format(self.gradients)
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


# A codebook's k-means is refit every this many training forward passes; in between the
# weights snap to the nearest entry of the last fit. 1: every step (~0.08 s for a
# 94k-weight layer at k=4 on this CPU). Measured on MNIST LeNet-5 k=4 QAT: refitting every
# 50 steps diverged (train loss 9000 within an epoch: weights beyond the stale codebook's
# extremes keep the full straight-through gradient), every step trained (loss 0.41).
CODEBOOK_REFIT_EVERY = 1


class WeightFakeQuant(nn.Module):
    """Parametrization: forward ``fake_quantize(w)``, backward straight through. For a
    codebook, the codebook is kept (a buffer: checkpoints carry it) and refit every
    ``CODEBOOK_REFIT_EVERY`` training steps."""

    def __init__(self, fmt: Format, gradient_format: Any = None,
                 lsq_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.fmt = fmt
        self.gradient_format = gradient_format  # the weight's gradient rounded to it
        self.enabled = True
        if lsq_weight is not None:  # LSQ: a learned step, initialised as the paper does
            self.step = nn.Parameter(lsq_initial_step(lsq_weight, fmt))
        if isinstance(fmt, CodebookFormat):
            self.register_buffer("codebook", torch.zeros(fmt.k))
            self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def encode(self, w: torch.Tensor) -> Any:
        """``w`` in the format's codes, as the forward pass quantizes it."""
        w = w.detach()
        if hasattr(self, "step"):
            step = _floored(self.step, w, self.fmt).detach()
            return self.fmt.quantize(w, step, torch.zeros_like(step, dtype=torch.int64))
        if not isinstance(self.fmt, CodebookFormat):
            return self.fmt.quantize(w)
        refit = int(self.steps) % CODEBOOK_REFIT_EVERY == 0 and \
            (self.training or not self.steps)
        # Newly pruned weights (exact zeros) and no entry of 0 to keep them: refit now.
        refit = refit or (self.training and not bool((self.codebook == 0).any())
                          and self.fmt.keeps_zero(w))
        if refit:
            encoded = self.fmt.quantize(w)
            self.codebook.copy_(encoded.params["codebook"])
        else:
            encoded = self.fmt.assign(w, self.codebook)
        if self.training:
            self.steps += 1
        return encoded

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if hasattr(self, "step"):
            return self._lsq(w)
        if not all_finite(w):
            return w  # diverged weights (inf/NaN) pass through: the loss says so
        if isinstance(self.fmt, CodebookFormat):  # its codebook is state: through encode
            q = self.fmt.dequantize(self.encode(w), dtype=w.dtype)
        else:  # = dequantize(quantize(w)) bit for bit (tested), without the int64 codes
            q = self.fmt.fake_quantize(w.detach())
        # Exactly q forward (w - w.detach() is 0.0), identity backward (its gradient
        # rounded, with a gradient format).
        return q + gradient_rounded(w - w.detach(), self.gradient_format)

    def _lsq(self, w: torch.Tensor) -> torch.Tensor:
        """Forward exactly ``fmt.fake_quantize(w, step)`` (what convert_ packs); backward
        LSQ's: d/dw 1 inside the range and 0 outside, d/dstep (round(v) - v) inside and
        the clipped level outside (v = w / step), scaled by 1 / sqrt(n * quant_max)."""
        fmt = self.fmt
        step = _floored(self.step, w, fmt)
        exact = fmt.fake_quantize(w.detach(), step.detach(),
                                  torch.zeros_like(step, dtype=torch.int64))
        per_step = w.numel() // max(1, step.numel())
        g = 1.0 / math.sqrt(per_step * fmt.quant_max)
        scaled = fmt._broadcast((step - step * g).detach() + step * g, w)
        v = torch.clamp(w / scaled, fmt.quant_min, fmt.quant_max)
        trained = ((v.round() - v).detach() + v) * scaled
        return exact + gradient_rounded(trained - trained.detach(), self.gradient_format)


def lsq_initial_step(weight: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """LSQ's start: 2 mean|w| / sqrt(quant_max), per tensor or per output channel."""
    w = weight.detach().float().abs()
    mean = w.reshape(w.shape[0], -1).mean(1) if fmt.per_channel else w.mean()
    return _positive(2 * mean / math.sqrt(fmt.quant_max))


def _positive(step: torch.Tensor) -> torch.Tensor:
    return step.clamp_min(torch.finfo(torch.float32).tiny)


def _floored(step: torch.Tensor, w: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """The step used: at least 2^-16 of the min-max step of ``w`` (an optimizer may push
    the parameter to or below 0, where every weight would clip and the layer die), with
    the gradient passing straight through the floor so the parameter can come back."""
    top = w.detach().float().abs()
    top = top.reshape(top.shape[0], -1).amax(1) if fmt.per_channel else top.amax()
    floor = _positive(top / fmt.quant_max * 2.0 ** -16)
    return step + (torch.maximum(step, floor) - step).detach()


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
    """Fake-quantize the selected weights (and, with ``config.activations``, their inputs,
    observing the range as training goes) in every forward pass (in place; returns it)."""
    seen: dict[int, str] = {}
    for fqn, module, fmt in _selected(model, config, filter_fn):
        if fake_quant_of(module) is not None:
            raise ValueError(f"{type(module).__name__} is already prepared for QAT")
        # The stored tensor, not module.weight: a parametrized weight (a mask) is
        # recomputed on every access, and a freed tensor's id is reused.
        stored = module.parametrizations["weight"].original \
            if parametrize.is_parametrized(module, "weight") else module.weight
        if id(stored) in seen:  # each copy would be quantized and stored apart
            raise ValueError(f"{fqn}.weight is tied to {seen[id(stored)]}.weight: "
                             "tied weights are not supported; leave one of them out")
        seen[id(stored)] = fqn
        lsq_weight = module.weight if config.lsq else None
        parametrize.register_parametrization(module, "weight",
                                             WeightFakeQuant(fmt, config.gradients, lsq_weight))
        if config.activations is not None:
            attach_input_quant(module, config.activations, config.observer)
        if config.gradients is not None:
            attach_gradient_rounding(module, config.gradients)
    return model


def set_qat_enabled_(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn a prepared model's fake quantization (weights, input observing and
    quantization, gradient rounding) off (float training, e.g. a warm-up) or back on."""
    for module in model.modules():
        if isinstance(module, WeightFakeQuant):
            module.enabled = enabled
        elif isinstance(module, ActivationQuant):
            module.observing = module.enabled = enabled
        set_gradient_rounding_enabled(module, enabled)
    return model


def input_quantizers(model: nn.Module) -> dict[str, ActivationQuant]:
    """fqn of the layer -> its input quantizer."""
    return {fqn: m.input_quant for fqn, m in model.named_modules()
            if isinstance(getattr(m, "input_quant", None), ActivationQuant)}


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Observe the input ranges of every input quantizer on ``batches`` (eval mode, no
    fake quantization meanwhile), then freeze them."""
    quantizers = input_quantizers(model)
    for q in quantizers.values():
        q.observing, q.calibrating, q.enabled = True, True, False
    was_training = model.training
    model.eval()
    for x in batches:
        model(x)
    model.train(was_training)
    for fqn, q in quantizers.items():
        if not bool(q.observed):
            raise ValueError(f"calibration saw no input for {fqn}: give it batches")
        q.observing, q.calibrating, q.enabled = False, False, True
    return model


def fake_quant_of(module: nn.Module) -> "WeightFakeQuant | None":
    """The weight's fake-quantizer, found by type among its stacked parametrizations (a
    pruning mask may sit before it), or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations["weight"] if isinstance(p, WeightFakeQuant)]
    return found[0] if found else None


def float_weight(module: nn.Module) -> torch.Tensor:
    """The float tensor a layer's fake-quantizer quantizes: the stored weight with the
    parametrizations stacked before the quantizer applied (a mask), detached; the plain
    weight where there is no quantizer."""
    fq = fake_quant_of(module)
    if fq is None:
        return module.weight.detach()
    stack = module.parametrizations["weight"]
    x = stack.original.detach()
    with torch.no_grad():
        for p in stack:
            if p is fq:
                return x
            x = p(x)
    raise AssertionError("unreachable: fake_quant_of found the quantizer in the stack")


def convert_(model: nn.Module) -> nn.Module:
    """Replace each fake-quantized weight by its quantized values (in place). Masks or
    other parametrizations stacked before the quantizer are baked in with it (the codes
    quantize their output); one stacked after it is refused."""
    for q in input_quantizers(model).values():  # the observed ranges are final
        q.observing, q.enabled = False, True
    for fqn, module in model.named_modules():
        detach_gradient_rounding(module)  # training only
        fq = fake_quant_of(module)
        if fq is None:
            continue
        if module.parametrizations["weight"][-1] is not fq:
            raise ValueError(f"{fqn or type(module).__name__}.weight has a parametrization "
                             "after its fake-quantizer: allowed only before it")
        original = module.parametrizations["weight"].original
        source = float_weight(module)
        _unparametrize(module)
        with torch.no_grad():
            # The codes are kept: re-quantizing a quantized tensor need not give the same
            # codes (INT's min-max scale of the rounded tensor differs), and the packed
            # artifact must hold exactly what was evaluated.
            fq.eval()  # the codes of the last forward pass (a codebook: its last fit)
            encoded = fq.encode(source)
            weight = fq.fmt.dequantize(encoded, dtype=original.dtype)
            # The strides it trained with: a channels-last model whose weights come
            # back NCHW runs every conv and pool on the slow path (2.6x, measured).
            weight = torch.empty_like(original).copy_(weight)
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


def strip_qat_(model: nn.Module) -> nn.Module:
    """Back to float, in place: each fake-quantizer is removed from its weight (the float
    original stays, under any other parametrization stacked on it) and input quantizers
    are removed (what PTQ of a QAT-trained model starts from)."""
    for module in model.modules():
        detach_gradient_rounding(module)
        fq = fake_quant_of(module)
        if fq is not None:
            stack = module.parametrizations["weight"]
            if len(stack) > 1:  # keep the others (a mask): drop the quantizer alone
                del stack[[i for i, p in enumerate(stack) if p is fq][0]]
            else:
                original = stack.original
                _unparametrize(module)
                module.weight = original
        if isinstance(getattr(module, "input_quant", None), ActivationQuant):
            del module.input_quant
            for key, hook in list(module._forward_pre_hooks.items()):
                if getattr(hook, "__name__", "") == "_quantize_input":
                    del module._forward_pre_hooks[key]
    return model


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: FilterFn | None = None,
              calibration: Iterable[torch.Tensor] | None = None) -> nn.Module:
    """Post-training quantization of the selected weights (in place; returns it). With
    ``config.activations``, ``calibration`` batches set the input ranges first."""
    if config.activations is not None and calibration is None:
        raise ValueError("PTQ of activations needs calibration batches (calibration=...)")
    if config.lsq:
        raise ValueError("lsq=True is invalid for PTQ (quantize_): a learned step needs "
                         "training; allowed with prepare_qat_")
    with torch.no_grad():
        prepare_qat_(model, config, filter_fn)
        if config.activations is not None:
            quantizers = [fq for fq in map(fake_quant_of, model.modules()) if fq is not None]
            for fq in quantizers:  # the float weights while observing the inputs
                fq.enabled = False
            calibrate_(model, calibration)
            for fq in quantizers:
                fq.enabled = True
        return convert_(model)


def quantized_layers(model: nn.Module) -> dict[str, Any]:
    """fqn -> weight format of every converted layer."""
    return {fqn: m.weight_format for fqn, m in model.named_modules()
            if hasattr(m, "weight_format")}
