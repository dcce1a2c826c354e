"""AdamEG: Adam's direction applied multiplicatively to weight magnitudes."""

from __future__ import annotations

from typing import Any, Iterable

from optim._common import check_bool, check_choice, params_with_grad
from optim._update import adam_direction, additive_, decoupled_decay_, multiplicative_
from optim.adam_gd import check_adam
from optim.base import Optimizer

__all__ = ["AdamEG", "ADAM_EG_DECAYS"]

ADAM_EG_DECAYS = ("decoupled", "exp")


class AdamEG(Optimizer):
    r"""The multiplicative half of the matched pair with :class:`AdamGD`: the same
    bias-corrected Adam direction (``amsgrad``, ``maximize`` as in AdamW), applied to
    ``log|w|``.

    .. math::
        d_t &= \hat m_t / (\sqrt{\hat v_t} + \epsilon)  \quad\text{(as in AdamGD)}\\
        w_t &= w_{t-1} (1 - \eta\lambda) \exp(-\eta\, \mathrm{sign}(w_{t-1})\, d_t)
               && \text{(decay="decoupled", the default)}\\
        w_t &= w_{t-1} \exp(-\eta\, (\mathrm{sign}(w_{t-1})\, d_t + \lambda))
               && \text{(decay="exp")}\\
        w_t &= w_{t-1} (1 - \eta\lambda) - \eta\, d_t    && \text{(additive groups)}

    The "decoupled" decay is the research code's (seed 000's AdamWeg) and AdamGD's; "exp"
    is its first-order equal in log space. The lr is a relative change per step
    (AdamGD's is absolute). Signs never change and zeros never move: put biases and norm
    parameters in a ``multiplicative=False`` group (:func:`optim.split_params`), which
    steps as AdamGD.

    Example::

        opt = AdamEG(optim.split_params(model, bias_lr=1e-3), lr=1e-2)
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decay: str = "decoupled", amsgrad: bool = False,
                 maximize: bool = False, multiplicative: bool = True) -> None:
        check_adam(lr, betas, eps, weight_decay, amsgrad, maximize)
        check_choice("decay", decay, ADAM_EG_DECAYS)
        check_bool("multiplicative", multiplicative)
        _check_shrink(lr, weight_decay, decay)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decay=decay, amsgrad=amsgrad, maximize=maximize,
                        multiplicative=multiplicative)
        super().__init__(params, defaults)

    def _update(self) -> None:
        for group in self.param_groups:
            for p in params_with_grad(group):
                d = adam_direction(p.grad, self.state[p], group["betas"], group["eps"],
                                   group["amsgrad"], group["maximize"])
                lr, wd = group["lr"], group["weight_decay"]
                if not group["multiplicative"]:
                    decoupled_decay_(p, lr, wd)
                    additive_(p, d, lr)
                elif group["decay"] == "decoupled":
                    _check_shrink(lr, wd, "decoupled")  # a schedule may have raised lr
                    decoupled_decay_(p, lr, wd)
                    multiplicative_(p, d, lr)
                else:
                    multiplicative_(p, d, lr, decay=wd)


def _check_shrink(lr: float, weight_decay: float, decay: str) -> None:
    # 1 - lr * wd <= 0 would flip (or zero) every sign: what this update promises not to.
    if decay == "decoupled" and lr * weight_decay >= 1:
        raise ValueError(f"Invalid lr * weight_decay: {lr * weight_decay!r} (allowed < 1 "
                         "with decay='decoupled': w *= 1 - lr * weight_decay must keep signs)")
