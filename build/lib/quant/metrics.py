"""How far a quantized tensor is from the float one.

Example::

    sqnr_db(w, IntFormat(8).fake_quantize(w))   # about 40-50 dB for Gaussian weights
"""

from __future__ import annotations

import math

import torch

__all__ = ["sqnr_db"]


def sqnr_db(x: torch.Tensor, q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum x^2 / sum (x - q)^2), in float64;
    inf when q == x exactly, -inf when x is all zeros and q is not."""
    x, q = x.detach().double(), q.detach().double()
    noise = (x - q).pow(2).sum().item()
    signal = x.pow(2).sum().item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)
