"""Gradient rounding in the backward pass: training "all in LNS" (LNS-Madam's setting).

LNS-Madam (Zhao et al., 2022) trains with weights, activations *and gradients* in a
logarithmic format. :func:`quant.prepare_qat_` with ``QuantConfig(gradients=fmt)`` rounds,
in every backward pass of each quantized layer,

- the gradient with respect to the layer's output (what flows back to earlier layers),
  through a forward hook that is the identity forward, and
- the gradient with respect to the layer's weight (what the optimizer reads), in the
  weight's fake-quant parametrization,

onto ``fmt``'s grid with a per-tensor scale of max |g| (nothing clips; the smallest
gradients underflow to zero, as they would in the format; INT: symmetric levels, step
max|g| / (2^(bits-1) - 1)). A gradient holding inf/NaN
passes unchanged: the optimizers' policy skips that step (``optim/base.py``). Under DDP
each rank rounds its own gradients before they are averaged, as hardware in that format
would: the average of rounded gradients is not itself on the grid.

Example::

    prepare_qat_(model, QuantConfig(weights=LNSFormat(8, 3), gradients=LNSFormat(8, 3)))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quant.codes import all_finite
from quant.intfmt import IntFormat
from quant.lns import LNSFormat

__all__ = ["round_gradient", "gradient_rounded", "attach_gradient_rounding",
           "detach_gradient_rounding", "check_gradient_format", "GRADIENT_FORMATS",
           "set_gradient_rounding_enabled"]

GRADIENT_FORMATS = (LNSFormat, IntFormat)


def round_gradient(grad: torch.Tensor, fmt: LNSFormat | IntFormat) -> torch.Tensor:
    """``grad`` on ``fmt``'s grid, per tensor, its largest magnitude max |grad| (kept
    exactly); unchanged when it holds inf/NaN (the step will be skipped) or is empty.
    INT: symmetric levels -q..q with step max|g|/q (not the observer's convention, whose
    scale floor of float32 eps would zero gradients below ~1e-7)."""
    if grad.numel() == 0 or not all_finite(grad):
        return grad
    if isinstance(fmt, IntFormat):
        top = grad.detach().abs().max().float()
        step = top.clamp_min(torch.finfo(torch.float32).tiny) / fmt.quant_max
        levels = torch.clamp(torch.round(grad.float() / step), -fmt.quant_max, fmt.quant_max)
        return (levels * step).to(grad.dtype)
    return fmt.fake_quantize(grad)


class _RoundGradient(torch.autograd.Function):
    """Identity forward; the incoming gradient rounded backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fmt: Any) -> torch.Tensor:  # noqa: D102
        ctx.fmt = fmt
        # A copy, not a view: the next op may be in place (ReLU(inplace=True)), which
        # autograd forbids on a custom Function's view output.
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return round_gradient(grad, ctx.fmt), None


def gradient_rounded(x: torch.Tensor, fmt: LNSFormat | IntFormat | None) -> torch.Tensor:
    """``x`` itself, whose gradient is rounded to ``fmt`` (None: left as is)."""
    if fmt is None or not x.requires_grad:
        return x
    return _RoundGradient.apply(x, fmt)


def _round_output_gradient(module: nn.Module, args: tuple, output: torch.Tensor
                           ) -> torch.Tensor:
    # A module-level function (not a closure), so a deepcopied model's hook is its own.
    if not module.gradient_rounding:
        return output
    return gradient_rounded(output, module.gradient_format)


def set_gradient_rounding_enabled(module: nn.Module, enabled: bool) -> None:
    """Turn the rounding of ``module``'s output gradient off or back on (its weight's
    follows the weight's fake quantization: off with it)."""
    if hasattr(module, "gradient_format"):
        module.gradient_rounding = enabled


def attach_gradient_rounding(module: nn.Module, fmt: LNSFormat | IntFormat) -> None:
    """Round the gradient with respect to ``module``'s output in every backward pass."""
    check_gradient_format(fmt)
    module.gradient_format = fmt
    module.gradient_rounding = True
    module.register_forward_hook(_round_output_gradient)


def detach_gradient_rounding(module: nn.Module) -> None:
    for key, hook in list(module._forward_hooks.items()):
        if hook is _round_output_gradient:
            del module._forward_hooks[key]
    for name in ("gradient_format", "gradient_rounding"):
        if hasattr(module, name):
            delattr(module, name)


def check_gradient_format(fmt: Any) -> None:
    if not isinstance(fmt, GRADIENT_FORMATS) or getattr(fmt, "per_channel", False):
        raise ValueError(f"gradients={fmt!r} is invalid: allowed an LNSFormat or a "
                         "per-tensor IntFormat")
