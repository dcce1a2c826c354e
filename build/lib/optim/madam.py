"""Madam: multiplicative Adam-style update normalized by the gradient's RMS."""

from __future__ import annotations

from typing import Any, Iterable

from optim._common import check_bool, check_range, params_with_grad, rms
from optim._update import additive_, decoupled_decay_, madam_direction, multiplicative_
from optim.base import Optimizer

__all__ = ["Madam", "check_madam"]


class Madam(Optimizer):
    r"""Madam (Bernstein, Zhao, Meister, Liu, Anandkumar & Yue, 2020, "Learning
    compositional functions via multiplicative weight updates").

    .. math::
        s_t &= \beta s_{t-1} + (1-\beta) g_t^2,\quad
        \hat g_t = \mathrm{clamp}\big(g_t / \sqrt{s_t / (1-\beta^t)},\ \pm g_{bound}\big)
        \ (0 \text{ where } g_t = s_t = 0)\\
        w_t &= \mathrm{clamp}\big(w_{t-1} \exp(-\eta\,(\mathrm{sign}(w_{t-1})\,\hat g_t
               + \lambda)),\ \pm w_{max}\big),\quad
        w_{max} = p_{scale} \cdot \mathrm{rms}(w_0)     && \text{(multiplicative)}\\
        w_t &= w_{t-1}(1 - \eta\lambda) - \eta\,\hat g_t  && \text{(additive groups)}

    ``w_max`` is fixed from each tensor's first-step value. As in the reference code
    (jxbz/madam), a gradient whose square underflows to 0 takes a full bounded step
    (``g / 0`` clamped to ``g_bound``). Unlike it, ``p_scale``, ``g_bound`` and ``beta``
    live in the param groups, and weight decay is one form, a decoupled shrink of
    magnitudes by ``exp(-eta * lambda)``. Zeros never move under the multiplicative
    update (their ``w_max`` would be 0 too): put biases and norm parameters in a
    ``multiplicative=False`` group (:func:`optim.split_params`).

    Example::

        opt = Madam(optim.split_params(model, bias_lr=0.01), lr=0.01, p_scale=3.0)
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.01, p_scale: float = 3.0,
                 g_bound: float = 10.0, beta: float = 0.999, weight_decay: float = 0.0,
                 multiplicative: bool = True) -> None:
        check_madam(lr, p_scale, g_bound, beta, weight_decay, multiplicative)
        defaults = dict(lr=lr, p_scale=p_scale, g_bound=g_bound, beta=beta,
                        weight_decay=weight_decay, multiplicative=multiplicative)
        super().__init__(params, defaults)

    def _update(self) -> None:
        for group in self.param_groups:
            for p in params_with_grad(group):
                state = self.state[p]
                if not state:
                    state["max"] = group["p_scale"] * rms(p)
                g = madam_direction(p.grad, state, group["beta"], group["g_bound"])
                lr, wd = group["lr"], group["weight_decay"]
                if group["multiplicative"]:
                    multiplicative_(p, g, lr, decay=wd)
                    p.clamp_(-state["max"], state["max"])
                else:
                    decoupled_decay_(p, lr, wd)
                    additive_(p, g, lr)


def check_madam(lr: float, p_scale: float, g_bound: float, beta: float, weight_decay: float,
                multiplicative: bool) -> None:
    check_range("lr", lr, 0.0, lo_open=True)
    check_range("p_scale", p_scale, 0.0, lo_open=True)
    check_range("g_bound", g_bound, 0.0, lo_open=True)
    check_range("beta", beta, 0.0, 1.0, hi_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    check_bool("multiplicative", multiplicative)
