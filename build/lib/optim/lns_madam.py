"""LNS-Madam: Madam whose weights live on a logarithmic-number-system grid."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from optim._common import check_range, params_with_grad, rms
from optim._update import additive_, decoupled_decay_, madam_direction
from optim.base import Optimizer
from optim.madam import check_madam
from quant.lns import LNSFormat

__all__ = ["LNSMadam"]


class LNSMadam(Optimizer):
    r"""LNS-Madam (Zhao, Dai, Venkatesan, Zimmer, Ali, Liu, Khailany, Dally & Anandkumar,
    2022, "LNS-Madam: Low-precision training in logarithmic number system using
    multiplicative weight update").

    Every multiplicative weight is ``sign * scale * 2**(-e / gamma)`` on the
    :class:`quant.LNSFormat` grid (``bits`` including the sign, ``gamma =
    2**frac_bits``), with ``scale = p_scale * rms(w_0)`` per tensor (Madam's clamp is the
    grid's top) and an integer exponent ``e in [0, levels - 1]`` kept in the state. The
    Madam step, in base 2, moves the integer exponent:

    .. math::
        \hat g_t &= \text{Madam's clamped, RMS-normalized gradient}\\
        e_t &= \mathrm{clamp}\big(e_{t-1} + \mathrm{round}(\eta\,\gamma\,
               (\mathrm{sign}(w)\,\hat g_t + \lambda)),\ 0,\ levels - 1\big)\\
        w_t &= \mathrm{sign}(w)\cdot scale \cdot 2^{-e_t/\gamma}

    so ``|w|`` changes by ``2**(-eta * (sign(w) * g + lambda))`` rounded to whole grid
    steps: an update smaller than half a step (``eta * gamma * |g| < 0.5``) does not move
    the weight, which is the point of training in low precision; pick ``lr >= 1 /
    (2 * gamma * g_bound)``. The reference code rounds ``g`` itself and uses ``lr = 1 /
    gamma``; that is the same update when ``lr * gamma`` is 1. Weights are snapped onto
    the grid at construction (the first forward pass already sees LNS weights) and a
    weight that was exactly 0 stays 0; parameters that do not train (``requires_grad``
    False) are left alone, and a group added later (``add_param_group``) is snapped when
    added. ``multiplicative=False`` groups (biases, norm
    parameters; :func:`optim.split_params`) take Madam's additive step in float.

    Example::

        opt = LNSMadam(optim.split_params(model, bias_lr=0.01), lr=1 / 8, bits=8,
                       frac_bits=3)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1 / 8, bits: int = 8,
                 frac_bits: int = 3, p_scale: float = 3.0, g_bound: float = 10.0,
                 beta: float = 0.999, weight_decay: float = 0.0,
                 multiplicative: bool = True) -> None:
        check_madam(lr, p_scale, g_bound, beta, weight_decay, multiplicative)
        check_range("bits", bits, 2, 16)
        check_range("frac_bits", frac_bits, 0, 10)
        if not isinstance(bits, int) or not isinstance(frac_bits, int):
            raise ValueError(f"Invalid bits/frac_bits: {bits!r}/{frac_bits!r} (allowed "
                             "integers)")
        defaults = dict(lr=lr, bits=bits, frac_bits=frac_bits, p_scale=p_scale,
                        g_bound=g_bound, beta=beta, weight_decay=weight_decay,
                        multiplicative=multiplicative)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # torch's __init__ adds its groups through here too: one place snaps them all.
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["multiplicative"]:
            with torch.no_grad():
                for p in group["params"]:
                    if p.requires_grad:
                        self._snap(p, group)

    @staticmethod
    def format_of(group: dict[str, Any]) -> LNSFormat:
        return LNSFormat(bits=group["bits"], frac_bits=group["frac_bits"])

    def _snap(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Put ``p`` on the grid; state: scale, sign, exponent."""
        state = self.state[p]
        scale = group["p_scale"] * rms(p)
        if scale == 0:
            scale = torch.ones_like(scale)  # an all-zero tensor: any scale encodes it
        sign, code = self.format_of(group).encode(p, scale, underflow="clamp")
        state.update(scale=scale, sign=sign, exponent=code)
        p.copy_(self.format_of(group).decode(sign, code, scale, dtype=p.dtype))

    def _before_update(self) -> None:
        # Params that did not train when their group was added (after the closure, which
        # may be what gave them a gradient): snap them now.
        for group in self.param_groups:
            for p in params_with_grad(group):
                if group["multiplicative"] and "exponent" not in self.state.get(p, {}):
                    self._snap(p, group)

    def _update(self) -> None:
        for group in self.param_groups:
            for p in params_with_grad(group):
                state = self.state[p]
                g = madam_direction(p.grad, state, group["beta"], group["g_bound"])
                if group["multiplicative"]:
                    self._exponent_step(p, g, state, group)
                else:
                    decoupled_decay_(p, group["lr"], group["weight_decay"])
                    additive_(p, g, group["lr"])

    def _exponent_step(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, Any],
                       group: dict[str, Any]) -> None:
        fmt = self.format_of(group)
        sign = state["sign"]
        change = group["lr"] * fmt.gamma * (sign.to(g.dtype) * g + group["weight_decay"])
        exponent = state["exponent"] + torch.round(change).to(torch.int32)
        state["exponent"] = exponent.clamp_(0, fmt.levels - 1)
        p.copy_(fmt.decode(sign, state["exponent"], state["scale"], dtype=p.dtype))
