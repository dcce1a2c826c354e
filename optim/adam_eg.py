"""AdamEG: Adam's direction applied multiplicatively to weight magnitudes."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from optim._adam_moments import adam_direction, check_adam
from optim._common import check_bool, closure_loss, params_with_grad
from optim.adam_gd import adam_gd_update

__all__ = ["AdamEG", "adam_eg_update"]


class AdamEG(Optimizer):
    r"""The multiplicative half of the matched pair with :class:`AdamGD`: the same
    bias-corrected Adam direction, applied to ``log|w|``.

    .. math::
        d_t &= \hat m_t / (\sqrt{\hat v_t} + \epsilon)  \quad\text{(as in AdamGD)}\\
        w_t &= w_{t-1} \exp(-\eta\, (\mathrm{sign}(w_{t-1})\, d_t + \lambda))
               && \text{(multiplicative)}\\
        w_t &= w_{t-1} (1 - \eta\lambda) - \eta\, d_t    && \text{(additive groups)}

    Decoupled weight decay shrinks magnitudes by ``exp(-eta * lambda)``, to first order
    the ``1 - eta * lambda`` of AdamGD. The lr is a relative change per step (AdamGD's is
    absolute). Signs never change and zeros never move: put biases and norm parameters in
    a ``multiplicative=False`` group (:func:`optim.split_params`), which steps as AdamGD.

    Example::

        opt = AdamEG(optim.split_params(model, bias_lr=1e-3), lr=1e-2)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, multiplicative: bool = True) -> None:
        check_adam(lr, betas, eps, weight_decay)
        check_bool("multiplicative", multiplicative)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        multiplicative=multiplicative)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in params_with_grad(group):
                d = adam_direction(p.grad, self.state[p], group["betas"], group["eps"])
                if group["multiplicative"]:
                    adam_eg_update(p, d, lr=group["lr"], weight_decay=group["weight_decay"])
                else:
                    adam_gd_update(p, d, lr=group["lr"], weight_decay=group["weight_decay"])
        return loss


def adam_eg_update(p: torch.Tensor, d: torch.Tensor, *, lr: float, weight_decay: float) -> None:
    """w <- w exp(-lr (sign(w) d + wd)), in place."""
    p.mul_(torch.exp(-lr * (torch.sign(p) * d + weight_decay)))
