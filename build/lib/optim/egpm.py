"""EGPM: exponentiated gradient with positive and negative weights (EG+-)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from optim._common import check_bool, check_range, params_with_grad
from optim.base import Optimizer

__all__ = ["EGPM", "egpm_apply_"]


class EGPM(Optimizer):
    r"""EG+- (Kivinen & Warmuth, 1997, "Exponentiated gradient versus gradient descent
    for linear predictors"): each weight is the difference of two positive parts.

    .. math::
        u_0 &= \max(w_0, 0) + c,\quad v_0 = \max(-w_0, 0) + c  \quad (w_0 = u_0 - v_0)\\
        d_t &= g_t + \lambda w_{t-1}\\
        u_t &= u_{t-1} \exp(-\eta d_t),\quad v_t = v_{t-1} \exp(+\eta d_t)\\
        (u_t, v_t) &\leftarrow (u_t, v_t)\, \frac{U}{\sum (u_t + v_t)}
                   \text{ with } U = \sum (u_0 + v_0)  \quad (\text{if normalize})\\
        w_t &= u_t - v_t

    To first order ``w`` moves by ``-eta * (u + v) * d``: the step is proportional to
    ``|w| + 2c``, so a weight at 0 moves (at rate ``2c``) and can change sign; no
    separate group for biases is needed (the registry builds it without one). It is
    still a multiplicative update, of ``u`` and ``v``. ``normalize`` keeps each tensor's
    total ``sum(u + v)`` fixed (the simplex version of the original). The optimizer owns
    the weights through ``(u, v)`` in its state: assigning to a parameter between steps
    is overwritten at the next step.

    Example::

        opt = EGPM(model.parameters(), lr=5.0, offset=0.01)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1.0, offset: float = 0.01,
                 normalize: bool = False, weight_decay: float = 0.0) -> None:
        check_range("lr", lr, 0.0, lo_open=True)
        check_range("offset", offset, 0.0, lo_open=True)
        check_bool("normalize", normalize)
        check_range("weight_decay", weight_decay, 0.0)
        defaults = dict(lr=lr, offset=offset, normalize=normalize, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _update(self) -> None:
        for group in self.param_groups:
            for p in params_with_grad(group):
                state = self.state[p]
                if not state:
                    state["u"] = p.clamp(min=0) + group["offset"]
                    state["v"] = (-p).clamp(min=0) + group["offset"]
                    state["total"] = (state["u"] + state["v"]).sum()
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] \
                    else p.grad
                egpm_apply_(p, d, state, lr=group["lr"], normalize=group["normalize"])


def egpm_apply_(p: torch.Tensor, d: torch.Tensor, state: dict[str, Any], *, lr: float,
                normalize: bool) -> None:
    """u <- u exp(-lr d), v <- v exp(lr d) (rescaled to their first total if
    ``normalize``), w <- u - v; in place."""
    u, v = state["u"], state["v"]
    u.mul_(torch.exp(-lr * d))
    v.mul_(torch.exp(lr * d))
    if normalize:
        factor = state["total"] / (u.sum() + v.sum())
        u.mul_(factor)
        v.mul_(factor)
    torch.sub(u, v, out=p)
