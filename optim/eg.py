"""EG: sign-preserving exponentiated gradient."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from optim._common import check_bool, check_range, closure_loss, params_with_grad

__all__ = ["EG", "eg_update"]


class EG(Optimizer):
    r"""Exponentiated gradient that keeps every weight's sign (Cornford et al., 2024,
    "Brain-like learning with exponentiated gradients").

    .. math::
        d_t &= g_t + \lambda w_{t-1}                      && \text{(L2 weight decay)}\\
        b_t &= \mu b_{t-1} + d_t,\; b_1 = d_1             && \text{(if } \mu > 0)\\
        d_t &\leftarrow d_t + \mu b_t \text{ (nesterov) else } b_t\\
        w_t &= w_{t-1} \exp(-\eta\, \mathrm{sign}(w_{t-1})\, d_t)  && \text{(multiplicative)}\\
        w_t &= w_{t-1} - \eta\, d_t                        && \text{(additive groups)}

    The update moves ``log|w|``, so a weight never changes sign and a weight that is
    exactly 0 never moves. Biases and norm parameters (often initialized at 0) therefore
    belong in a param group with ``multiplicative=False``, which takes the plain
    (momentum) gradient step; :func:`optim.split_params` builds those groups.

    Example::

        opt = EG(optim.split_params(model, bias_lr=0.05), lr=2.0)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1.0, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0,
                 multiplicative: bool = True) -> None:
        check_range("lr", lr, 0.0, lo_open=True)
        check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
        check_bool("nesterov", nesterov)
        check_range("weight_decay", weight_decay, 0.0)
        check_bool("multiplicative", multiplicative)
        if nesterov and momentum == 0.0:
            raise ValueError("Invalid nesterov: True (allowed only with momentum > 0)")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov,
                        weight_decay=weight_decay, multiplicative=multiplicative)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in params_with_grad(group):
                eg_update(p, p.grad, self.state[p], lr=group["lr"], momentum=group["momentum"],
                          nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                          multiplicative=group["multiplicative"])
        return loss


def eg_update(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], *, lr: float,
              momentum: float, nesterov: bool, weight_decay: float,
              multiplicative: bool) -> None:
    """One EG step on one tensor, in place."""
    d = grad.add(p, alpha=weight_decay) if weight_decay else grad.clone()
    if momentum > 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = d.clone()
        else:
            buf.mul_(momentum).add_(d)
        d = d.add(buf, alpha=momentum) if nesterov else buf
    if multiplicative:
        p.mul_(torch.exp(-lr * torch.sign(p) * d))
    else:
        p.add_(d, alpha=-lr)
