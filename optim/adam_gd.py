"""AdamGD: Adam's direction applied additively, with decoupled weight decay (AdamW)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from optim._adam_moments import adam_direction, check_adam
from optim._common import closure_loss, params_with_grad

__all__ = ["AdamGD", "adam_gd_update"]


class AdamGD(Optimizer):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter 2019), the additive half
    of the matched pair with :class:`AdamEG` (Kingma & Ba 2015 for the moments).

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2\\
        \hat m_t &= m_t / (1-\beta_1^t),\quad \hat v_t = v_t / (1-\beta_2^t),\quad
        d_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon)\\
        w_t &= w_{t-1} (1 - \eta\lambda) - \eta\, d_t

    This is ``torch.optim.AdamW`` (tests check it); it exists so that AdamGD and AdamEG
    share one moment function and differ only in the last line.

    Example::

        opt = AdamGD(model.parameters(), lr=1e-3, weight_decay=1e-2)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        check_adam(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in params_with_grad(group):
                d = adam_direction(p.grad, self.state[p], group["betas"], group["eps"])
                adam_gd_update(p, d, lr=group["lr"], weight_decay=group["weight_decay"])
        return loss


def adam_gd_update(p: torch.Tensor, d: torch.Tensor, *, lr: float, weight_decay: float) -> None:
    """w <- w (1 - lr wd) - lr d, in place."""
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.add_(d, alpha=-lr)
