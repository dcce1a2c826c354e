"""The Adam moment estimates that AdamGD and AdamEG share (one definition, so the pair
differs only in how the direction is applied)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["adam_direction", "check_adam"]


def check_adam(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    from optim._common import check_range

    check_range("lr", lr, 0.0, lo_open=True)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (allowed a pair (beta1, beta2))")
    check_range("betas[0]", betas[0], 0.0, 1.0, hi_open=True)
    check_range("betas[1]", betas[1], 0.0, 1.0, hi_open=True)
    check_range("eps", eps, 0.0, lo_open=True)
    check_range("weight_decay", weight_decay, 0.0)


def adam_direction(grad: torch.Tensor, state: dict[str, Any], betas: tuple[float, float],
                   eps: float) -> torch.Tensor:
    """Update ``state`` (step, exp_avg, exp_avg_sq) and return m_hat / (sqrt(v_hat) + eps)."""
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
    beta1, beta2 = betas
    state["step"] += 1
    step = state["step"].item()
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    return m_hat / (v_hat.sqrt() + eps)
