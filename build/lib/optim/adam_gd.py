"""AdamGD: Adam's direction applied additively, with decoupled weight decay (AdamW)."""

from __future__ import annotations

from typing import Any, Iterable

from optim._common import check_bool, check_range, params_with_grad
from optim._update import adam_direction, additive_, decoupled_decay_
from optim.base import Optimizer

__all__ = ["AdamGD", "check_adam"]


class AdamGD(Optimizer):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter 2019), the additive half
    of the matched pair with :class:`AdamEG` (Kingma & Ba 2015 for the moments).

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2
        \quad (v_t \leftarrow \max(v_{t-1}^{max}, v_t) \text{ if amsgrad})\\
        \hat m_t &= m_t / (1-\beta_1^t),\quad \hat v_t = v_t / (1-\beta_2^t),\quad
        d_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon)\\
        w_t &= w_{t-1} (1 - \eta\lambda) - \eta\, d_t

    This is ``torch.optim.AdamW``, ``amsgrad`` and ``maximize`` included (tests check
    it); it exists so that AdamGD and AdamEG share one direction and differ only in how
    it is applied.

    Example::

        opt = AdamGD(model.parameters(), lr=1e-3, weight_decay=1e-2)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False,
                 maximize: bool = False) -> None:
        check_adam(lr, betas, eps, weight_decay, amsgrad, maximize)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)

    def _update(self) -> None:
        for group in self.param_groups:
            for p in params_with_grad(group):
                d = adam_direction(p.grad, self.state[p], group["betas"], group["eps"],
                                   group["amsgrad"], group["maximize"])
                decoupled_decay_(p, group["lr"], group["weight_decay"])
                additive_(p, d, group["lr"])


def check_adam(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
               amsgrad: bool, maximize: bool) -> None:
    check_range("lr", lr, 0.0, lo_open=True)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (allowed a pair (beta1, beta2))")
    check_range("betas[0]", betas[0], 0.0, 1.0, hi_open=True)
    check_range("betas[1]", betas[1], 0.0, 1.0, hi_open=True)
    check_range("eps", eps, 0.0, lo_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    check_bool("amsgrad", amsgrad)
    check_bool("maximize", maximize)
