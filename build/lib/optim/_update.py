"""The update vocabulary every optimizer here is written in, beside torch/optim/adam.py:
a *direction* per family (what the gradient and the state say to move) and an *apply*
per geometry (how a direction moves the weight). An optimizer's step is one of each.

Directions: :func:`momentum_direction` (GD, EG), :func:`adam_direction` (AdamGD, AdamEG),
:func:`madam_direction` (Madam, LNS-Madam).
Applies: :func:`additive_` (w - lr d), :func:`multiplicative_` (w exp(-lr sign(w) d)),
:func:`sign_preserving_additive_` (GD that never lets a weight cross 0), the decays
:func:`decoupled_decay_` (w (1 - lr wd)) and the ``decay`` of :func:`multiplicative_`
(w exp(-lr wd)). EG+- (u, v) and LNS-Madam (integer exponents) apply on their own state.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["momentum_direction", "adam_direction", "madam_direction", "additive_",
           "multiplicative_", "decoupled_decay_", "sign_preserving_additive_"]


# -- directions -------------------------------------------------------------------------------
def momentum_direction(d: torch.Tensor, state: dict[str, Any], momentum: float,
                       nesterov: bool) -> torch.Tensor:
    """Heavy-ball momentum as torch's SGD: b = mu b + d (b_1 = d); d + mu b if nesterov."""
    if momentum == 0:
        return d
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = state["momentum_buffer"] = d.clone()
    else:
        buf.mul_(momentum).add_(d)
    return d.add(buf, alpha=momentum) if nesterov else buf


def adam_direction(grad: torch.Tensor, state: dict[str, Any], betas: tuple[float, float],
                   eps: float, amsgrad: bool = False, maximize: bool = False) -> torch.Tensor:
    """Update ``state`` (step, exp_avg, exp_avg_sq[, max_exp_avg_sq]) and return
    m_hat / (sqrt(v_hat) + eps), v_hat from the running maximum of v if ``amsgrad``
    (torch's AdamW); ``maximize`` ascends."""
    if maximize:
        grad = -grad
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    beta1, beta2 = betas
    state["step"] += 1
    step = state["step"].item()
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if amsgrad:
        v = torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    return m_hat / (v_hat.sqrt() + eps)


def madam_direction(grad: torch.Tensor, state: dict[str, Any], beta: float,
                    g_bound: float) -> torch.Tensor:
    """Update ``state`` (step, exp_avg_sq) and return g / sqrt(s_hat) clamped to
    +-g_bound, as jxbz/madam: 0 where g = 0 and s = 0 (0/0), a full bounded step where
    only g**2 underflowed (g / 0 = inf, clamped)."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    state["step"] += 1
    s = state["exp_avg_sq"]
    s.mul_(beta).addcmul_(grad, grad, value=1 - beta)
    s_hat = s / (1 - beta ** state["step"].item())
    g = torch.nan_to_num_(grad / s_hat.sqrt(), nan=0.0, posinf=g_bound, neginf=-g_bound)
    return g.clamp_(-g_bound, g_bound)


# -- applies ----------------------------------------------------------------------------------
def additive_(p: torch.Tensor, d: torch.Tensor, lr: float) -> None:
    """w <- w - lr d."""
    p.add_(d, alpha=-lr)


def multiplicative_(p: torch.Tensor, d: torch.Tensor, lr: float, decay: float = 0.0) -> None:
    """w <- w exp(-lr (sign(w) d + decay)): moves log|w|, keeps the sign, leaves 0 at 0."""
    p.mul_(torch.exp(-lr * (torch.sign(p) * d + decay)))


def decoupled_decay_(p: torch.Tensor, lr: float, weight_decay: float) -> None:
    """w <- w (1 - lr wd) (AdamW's decoupled decay)."""
    if weight_decay:
        p.mul_(1 - lr * weight_decay)


def sign_preserving_additive_(p: torch.Tensor, d: torch.Tensor, lr: float,
                              threshold: float) -> None:
    """w <- w - lr d, except that a weight whose sign would change (crossing or reaching
    0) is set to ``threshold * sign(w)``: a weight that is 0 stays 0. A threshold below
    the dtype's smallest normal number (1e-18 in float16) is raised to it, or it would
    round to 0 and the weight could never move again."""
    threshold = max(threshold, torch.finfo(p.dtype).tiny)
    new = p - lr * d
    crossed = torch.sign(new) != torch.sign(p)
    p.copy_(torch.where(crossed, threshold * torch.sign(p), new))
