"""GDSign: gradient descent that never lets a weight change sign."""

from __future__ import annotations

from typing import Any, Iterable

from optim._common import check_bool, check_range, params_with_grad
from optim._update import additive_, sign_preserving_additive_
from optim.base import Optimizer

__all__ = ["GDSign"]


class GDSign(Optimizer):
    r"""Additive gradient descent with frozen signs: the research code's (seed 000)
    ``freeze_gd_signs``, the matched additive baseline for sign-preserving EG.

    .. math::
        d_t &= g_t + \lambda w_{t-1}\\
        \tilde w_t &= w_{t-1} - \eta\, d_t\\
        w_t &= \tilde w_t \text{ if } \mathrm{sign}(\tilde w_t) = \mathrm{sign}(w_{t-1})
               \text{ else } \tau\, \mathrm{sign}(w_{t-1})      && \text{(preserve_signs)}\\
        w_t &= \tilde w_t                                       && \text{(other groups)}

    A weight that would cross (or reach) 0 stops at ``threshold`` (``tau``, 1e-18) on
    its own side, from where a gradient can grow it again; a weight that is exactly 0
    stays 0, as under EG. Biases and norm parameters therefore belong in a
    ``preserve_signs=False`` group (:func:`optim.split_params`, the registry's bias group
    for ``gd_sign``), which is plain GD.

    Example::

        opt = GDSign(optim.split_params(model, bias_lr=0.05,
                                        bias_group={"preserve_signs": False}), lr=0.1)
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, weight_decay: float = 0.0,
                 threshold: float = 1e-18, preserve_signs: bool = True) -> None:
        check_range("lr", lr, 0.0, lo_open=True)
        check_range("weight_decay", weight_decay, 0.0)
        check_range("threshold", threshold, 0.0, lo_open=True)
        check_bool("preserve_signs", preserve_signs)
        defaults = dict(lr=lr, weight_decay=weight_decay, threshold=threshold,
                        preserve_signs=preserve_signs)
        super().__init__(params, defaults)

    def _update(self) -> None:
        for group in self.param_groups:
            for p in params_with_grad(group):
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] \
                    else p.grad
                if group["preserve_signs"]:
                    sign_preserving_additive_(p, d, group["lr"], group["threshold"])
                else:
                    additive_(p, d, group["lr"])
