"""EG: sign-preserving exponentiated gradient."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from optim._common import check_bool, check_choice, check_range, params_with_grad
from optim._update import additive_, momentum_direction, multiplicative_
from optim.base import Optimizer

__all__ = ["EG", "EG_DECAYS"]

EG_DECAYS = ("sign", "l2")


class EG(Optimizer):
    r"""Exponentiated gradient that keeps every weight's sign (Cornford et al., 2024,
    "Brain-like learning with exponentiated gradients").

    .. math::
        d_t &= g_t + \lambda\,\mathrm{sign}(w_{t-1})  && \text{(decay="sign", the default)}\\
        d_t &= g_t + \lambda w_{t-1}                   && \text{(decay="l2")}\\
        b_t &= \mu b_{t-1} + d_t,\; b_1 = d_1          && \text{(if } \mu > 0)\\
        d_t &\leftarrow d_t + \mu b_t \text{ (nesterov) else } b_t\\
        w_t &= w_{t-1} \exp(-\eta\, \mathrm{sign}(w_{t-1})\, d_t)  && \text{(multiplicative)}\\
        w_t &= w_{t-1} - \eta\, d_t                     && \text{(additive groups)}

    The "sign" decay is the research code's (seed 000): every ``|w|`` shrinks by the same
    factor ``exp(-eta * lambda)`` per step, an L1-like pull in log space; "l2" shrinks
    large weights more (per step ``exp(-eta * lambda * |w|)``). The update moves
    ``log|w|``, so a weight never changes sign and a weight that is exactly 0 never
    moves. Biases and norm parameters (often initialized at 0) therefore belong in a
    param group with ``multiplicative=False``, which takes the plain (momentum) gradient
    step; :func:`optim.split_params` builds those groups.

    Example::

        opt = EG(optim.split_params(model, bias_lr=0.05), lr=2.0)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1.0, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, decay: str = "sign",
                 multiplicative: bool = True) -> None:
        check_range("lr", lr, 0.0, lo_open=True)
        check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
        check_bool("nesterov", nesterov)
        check_range("weight_decay", weight_decay, 0.0)
        check_choice("decay", decay, EG_DECAYS)
        check_bool("multiplicative", multiplicative)
        if nesterov and momentum == 0.0:
            raise ValueError("Invalid nesterov: True (allowed only with momentum > 0)")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay, decay=decay, multiplicative=multiplicative)
        super().__init__(params, defaults)

    def _update(self) -> None:
        for group in self.param_groups:
            for p in params_with_grad(group):
                d = eg_decayed(p, p.grad, group["weight_decay"], group["decay"])
                d = momentum_direction(d, self.state[p], group["momentum"], group["nesterov"])
                if group["multiplicative"]:
                    multiplicative_(p, d, group["lr"])
                else:
                    additive_(p, d, group["lr"])


def eg_decayed(p: torch.Tensor, grad: torch.Tensor, weight_decay: float, decay: str
               ) -> torch.Tensor:
    """The gradient with EG's weight decay added (a new tensor unless there is none)."""
    if not weight_decay:
        return grad
    if decay == "sign":
        return grad.add(torch.sign(p), alpha=weight_decay)
    return grad.add(p, alpha=weight_decay)
