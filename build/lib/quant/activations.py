"""Activation quantization: a layer's input observed and fake-quantized (per tensor), in
an INT format (the range's scale and zero point) or an LNS one (signed magnitudes on the
log grid, the largest being max(|low|, |high|) of the range).

An :class:`ActivationQuant` module sits on a quantized layer (``layer.input_quant``) and a
forward pre-hook passes the layer's input through it. It keeps the observed range in
buffers (so checkpoints and packed files carry it) and fake-quantizes with the range's
:class:`~quant.IntFormat` parameters and a straight-through backward.

Observers (how a batch's range enters the running range):

- ``minmax``: the running min and max of every batch seen (torch's ``MinMaxObserver``).
- ``moving_average``: the first batch's min/max, then ``r += 0.01 * (batch - r)``
  (torch's ``MovingAverageMinMaxObserver``).
- ``percentile``: each batch's 0.01th / 99.99th percentiles, moving-averaged: outliers do
  not stretch the grid.
- ``mse``: each batch's range shrunk by the factor in 0.30..1.00 (35 steps) that
  minimizes the batch's quantization MSE, moving-averaged.

Under DDP every rank observes its own shard; the batch range is reduced across ranks
(min/max for the first two, the mean for the last two) so every rank holds the same
parameters and DDP equals one worker with the global batch for min-max observers.

Example::

    act = ActivationQuant(IntFormat(bits=8, symmetric=False), "moving_average")
    y = act(x)   # observes x (while observing), returns fake-quantized x
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from quant.intfmt import IntFormat
from quant.lns import LNSFormat

__all__ = ["ActivationQuant", "OBSERVERS", "attach_input_quant"]

OBSERVERS = ("minmax", "moving_average", "percentile", "mse")
_AVERAGING = 0.01
_PERCENTILE = 0.9999
_MSE_FACTORS = torch.linspace(0.3, 1.0, 35)


class ActivationQuant(nn.Module):
    def __init__(self, fmt: IntFormat | LNSFormat, observer: str = "moving_average") -> None:
        super().__init__()
        if not isinstance(fmt, (IntFormat, LNSFormat)) or getattr(fmt, "per_channel", False):
            raise ValueError(f"activations={fmt!r} is invalid: allowed a per-tensor IntFormat "
                             "or an LNSFormat")
        if observer not in OBSERVERS:
            raise ValueError(f"observer={observer!r} is invalid: allowed one of "
                             f"{', '.join(OBSERVERS)}")
        self.fmt, self.observer = fmt, observer
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))
        self.observing = True  # update the range from each input in training mode
        self.calibrating = False  # update it in eval mode too (calibrate_)
        self.enabled = True  # fake-quantize (once a range exists)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """INT: (scale, zero point) of the observed range."""
        return self.fmt.qparams_from_range(self.low, self.high)

    def _fake(self, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``x`` fake-quantized with the range low..high, where x lies inside it). LNS:
        signed magnitudes up to max(|low|, |high|), the largest grid value."""
        x = x.detach()
        if isinstance(self.fmt, LNSFormat):
            scale = torch.maximum(low.abs(), high.abs()).float().clamp_min(
                torch.finfo(torch.float32).tiny)
            return self.fmt.fake_quantize(x, scale), x.abs() <= scale
        scale, zp = self.fmt.qparams_from_range(low, high)
        level = torch.round(x.float() * torch.reciprocal(scale)) + zp
        inside = (level >= self.fmt.quant_min) & (level <= self.fmt.quant_max)
        return self.fmt.fake_quantize(x, scale, zp), inside

    @torch.no_grad()
    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if self.observer in ("minmax", "moving_average"):
            low, high = torch.aminmax(x)
            return _all_reduce(low, dist.ReduceOp.MIN), _all_reduce(high, dist.ReduceOp.MAX)
        if self.observer == "percentile":
            flat = x.flatten()
            if flat.numel() > 1 << 20:  # torch.quantile's size limit; a strided sample
                flat = flat[:: flat.numel() // (1 << 20) + 1]
            low = torch.quantile(flat, 1 - _PERCENTILE)
            high = torch.quantile(flat, _PERCENTILE)
        else:
            low, high = self._mse_range(x)
        return _mean_over_ranks(low), _mean_over_ranks(high)

    def _mse_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = torch.aminmax(x)
        best, best_err = (low, high), None
        for factor in _MSE_FACTORS.tolist():
            err = (self._fake(x, low * factor, high * factor)[0] - x).pow(2).mean()
            if best_err is None or err < best_err:
                best, best_err = (low * factor, high * factor), err
        return best

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        low, high = self._batch_range(x)
        if not bool(self.observed):
            self.low.copy_(low)
            self.high.copy_(high)
            self.observed.fill_(True)
        elif self.observer == "minmax":
            self.low.copy_(torch.minimum(self.low, low))
            self.high.copy_(torch.maximum(self.high, high))
        else:
            self.low.add_(_AVERAGING * (low - self.low))
            self.high.add_(_AVERAGING * (high - self.high))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Evaluation never moves the range: test data must not tune the model.
        if self.observing and (self.training or self.calibrating):
            self.observe(x)
        if not self.enabled or not bool(self.observed):
            return x
        q, inside = self._fake(x, self.low, self.high)
        # Straight through inside the range, zero gradient where the input was clipped (as
        # torch's fake-quant ops): a plain STE keeps pushing clipped inputs further out
        # and QAT from scratch collapsed to chance on MNIST. Forward exactly q:
        # x - x.detach() is 0.0 carrying x's gradient.
        return q + (x - x.detach()) * inside

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, observer={self.observer}"


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=op)
    return t


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        return _all_reduce(t, dist.ReduceOp.SUM) / dist.get_world_size()
    return t


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    # A module-level function (not a closure), so a deepcopied model's hook is its own.
    return (module.input_quant(args[0]), *args[1:])


def attach_input_quant(module: nn.Module, fmt: IntFormat, observer: str) -> ActivationQuant:
    """Give ``module`` an ``input_quant`` and the pre-hook that applies it."""
    if hasattr(module, "input_quant"):
        raise ValueError(f"{type(module).__name__} already quantizes its input")
    module.input_quant = ActivationQuant(fmt, observer)
    module.register_forward_pre_hook(_quantize_input)
    return module.input_quant
