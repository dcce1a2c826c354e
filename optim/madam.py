"""Madam: multiplicative Adam-style update normalized by the gradient's RMS."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from optim._common import check_bool, check_range, closure_loss, params_with_grad, rms

__all__ = ["Madam", "madam_direction", "madam_additive_step", "check_madam"]


class Madam(Optimizer):
    r"""Madam (Bernstein, Zhao, Meister, Liu, Anandkumar & Yue, 2020, "Learning
    compositional functions via multiplicative weight updates").

    .. math::
        s_t &= \beta s_{t-1} + (1-\beta) g_t^2,\quad
        \hat g_t = \mathrm{clamp}\big(g_t / \sqrt{s_t / (1-\beta^t)},\ \pm g_{bound}\big)
        \ (0 \text{ where } s_t = 0)\\
        w_t &= \mathrm{clamp}\big(w_{t-1} \exp(-\eta\,(\mathrm{sign}(w_{t-1})\,\hat g_t
               + \lambda)),\ \pm w_{max}\big),\quad
        w_{max} = p_{scale} \cdot \mathrm{rms}(w_0)     && \text{(multiplicative)}\\
        w_t &= w_{t-1}(1 - \eta\lambda) - \eta\,\hat g_t  && \text{(additive groups)}

    ``w_max`` is fixed from each tensor's first-step value. Unlike the reference code
    (jxbz/madam), ``p_scale``, ``g_bound`` and ``beta`` live in the param groups, and
    weight decay is one form, a decoupled shrink of magnitudes by ``exp(-eta * lambda)``.
    Zeros never move under the multiplicative update (their ``w_max`` would be 0 too):
    put biases and norm parameters in a ``multiplicative=False`` group
    (:func:`optim.split_params`).

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

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in params_with_grad(group):
                state = self.state[p]
                if not state:
                    state["max"] = group["p_scale"] * rms(p)
                g = madam_direction(p.grad, state, group["beta"], group["g_bound"])
                lr, wd = group["lr"], group["weight_decay"]
                if group["multiplicative"]:
                    p.mul_(torch.exp(-lr * (torch.sign(p) * g + wd)))
                    p.clamp_(-state["max"], state["max"])
                else:
                    madam_additive_step(p, g, lr, wd)
        return loss


def madam_additive_step(p: torch.Tensor, g: torch.Tensor, lr: float, wd: float) -> None:
    """The step of ``multiplicative=False`` groups: w <- w (1 - lr wd) - lr g."""
    if wd:
        p.mul_(1 - lr * wd)
    p.add_(g, alpha=-lr)


def check_madam(lr: float, p_scale: float, g_bound: float, beta: float, weight_decay: float,
                multiplicative: bool) -> None:
    check_range("lr", lr, 0.0, lo_open=True)
    check_range("p_scale", p_scale, 0.0, lo_open=True)
    check_range("g_bound", g_bound, 0.0, lo_open=True)
    check_range("beta", beta, 0.0, 1.0, hi_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    check_bool("multiplicative", multiplicative)


def madam_direction(grad: torch.Tensor, state: dict[str, Any], beta: float,
                    g_bound: float) -> torch.Tensor:
    """Update ``state`` (step, exp_avg_sq) and return the clamped RMS-normalized gradient."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    state["step"] += 1
    s = state["exp_avg_sq"]
    s.mul_(beta).addcmul_(grad, grad, value=1 - beta)
    s_hat = s / (1 - beta ** state["step"].item())
    # A coordinate whose gradient has always been 0 has s = 0: its direction is 0, not NaN.
    g = torch.where(s_hat > 0, grad / s_hat.sqrt(), torch.zeros_like(grad))
    return g.clamp_(-g_bound, g_bound)
