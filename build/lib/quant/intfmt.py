"""Integer (uniform affine) formats: INT2 .. INT16, symmetric or asymmetric, per tensor or
per output channel, with torch's own range and parameter conventions.

For ``b`` bits the integer range is torch's: symmetric ``-2**(b-1) .. 2**(b-1)-1``
(``torch.per_tensor_symmetric`` / ``per_channel_symmetric``, zero point 0), asymmetric
``0 .. 2**b - 1`` (``per_tensor_affine`` / ``per_channel_affine``); channels are axis 0.
The scale and zero point are what torch's ``MinMaxObserver`` / ``PerChannelMinMaxObserver``
compute from the tensor's min and max, and :meth:`IntFormat.fake_quantize` is
``torch.fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine`` with
them, bit for bit for float32 (and fp16/bf16) inputs, tested against those ops; float64
inputs are quantized in float32 (torch works in double there). With explicit parameters
NaN stays NaN (torch's kernel turns it into the lowest level) and +-inf go to the top /
bottom level; with min-max parameters one non-finite value makes the scale non-finite.

Example::

    fmt = IntFormat(bits=4, symmetric=True, per_channel=True)
    w_q = fmt.fake_quantize(w)                  # quantize then dequantize
    enc = fmt.quantize(w); assert torch.equal(fmt.dequantize(enc), w_q)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.codes import Encoded

__all__ = ["IntFormat"]

_EPS = torch.finfo(torch.float32).eps  # torch's observers floor the scale at this


@dataclass(frozen=True)
class IntFormat:
    """``bits``-bit integers; ``symmetric`` (zero point 0) or affine; ``per_channel`` (axis
    0) or one scale per tensor."""

    bits: int = 8
    symmetric: bool = True
    per_channel: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) \
                or not 2 <= self.bits <= 16:
            raise ValueError(f"bits={self.bits!r} is invalid: allowed an integer in 2..16")
        for name in ("symmetric", "per_channel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed True or "
                                 "False")

    @property
    def name(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits}-{kind}" + ("-pc" if self.per_channel else "")

    @property
    def quant_min(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def quant_max(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def qscheme(self) -> torch.qscheme:
        if self.per_channel:
            return torch.per_channel_symmetric if self.symmetric else torch.per_channel_affine
        return torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine

    def qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale float32, zero_point int64) from the min and max of ``x`` (per channel:
        shape ``[x.shape[0]]``), as torch's min-max observers compute them."""
        x = x.detach().float()
        if self.per_channel:
            low, high = torch.aminmax(x.reshape(x.shape[0], -1), dim=1)
        else:
            low, high = torch.aminmax(x)
        return self.qparams_from_range(low, high)

    def qparams_from_range(self, low: torch.Tensor, high: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's ``_calculate_qparams``: the range always includes 0."""
        low = torch.minimum(low, torch.zeros_like(low))
        high = torch.maximum(high, torch.zeros_like(high))
        eps = torch.tensor(_EPS, device=low.device)
        span = float(self.quant_max - self.quant_min)
        if self.symmetric:
            scale = torch.maximum(torch.maximum(-low, high) / (span / 2), eps)
            zero_point = torch.zeros(low.shape, dtype=torch.int64, device=low.device)
        else:
            scale = torch.maximum((high - low) / span, eps)
            zero_point = self.quant_min - torch.round(low / scale).to(torch.int64)
            zero_point = zero_point.clamp(self.quant_min, self.quant_max)
        return scale, zero_point

    def _broadcast(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *([1] * (like.dim() - 1))) if self.per_channel else t

    def _levels(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
                ) -> torch.Tensor:
        # As torch's kernel: round(x * (1 / scale)) in float32, half to even, + zero point.
        inv = torch.reciprocal(self._broadcast(scale, x))
        q = torch.round(x.float() * inv) + self._broadcast(zero_point, x).float()
        return q.clamp(self.quant_min, self.quant_max)

    def fake_quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                      zero_point: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize then dequantize (same shape and dtype); parameters default to the
        min-max ones of ``x``."""
        if scale is None or zero_point is None:
            scale, zero_point = self.qparams(x)
        q = self._levels(x, scale, zero_point)
        zp = self._broadcast(zero_point, x).float()
        return ((q - zp) * self._broadcast(scale, x)).to(x.dtype)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                 zero_point: torch.Tensor | None = None) -> Encoded:
        """Codes ``level - quant_min`` (unsigned, ``bits`` bits) and the parameters. NaN
        has no code: it raises."""
        if torch.isnan(x).any():
            raise ValueError("cannot encode NaN in an integer format")
        if scale is None or zero_point is None:
            scale, zero_point = self.qparams(x)
        levels = self._levels(x, scale, zero_point).to(torch.int64)
        params = {"scale": scale.float()}
        if not self.symmetric:  # a symmetric zero point is always 0: nothing to store
            params["zero_point"] = zero_point.to(torch.int32)
        return Encoded(levels - self.quant_min, self.bits, params)

    def dequantize(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        levels = (enc.codes + self.quant_min).float()
        like = enc.codes
        zero_point = enc.params.get("zero_point", torch.zeros((), dtype=torch.int32))
        zp = self._broadcast(zero_point, like).float()
        return ((levels - zp) * self._broadcast(enc.params["scale"], like)).to(dtype)
