"""Helpers every optimizer here shares: hyperparameter checks and per-tensor scales."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch

__all__ = ["check_range", "check_bool", "check_choice", "rms", "closure_loss", "params_with_grad"]


def check_range(name: str, value: Any, lo: float, hi: float = math.inf,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """``ValueError`` naming ``name`` unless ``lo <(=) value <(=) hi``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = not math.isnan(value)
        ok = ok and (value > lo if lo_open else value >= lo)
        ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        lower = f"> {lo}" if lo_open else f">= {lo}"
        upper = "" if hi == math.inf else (f" and < {hi}" if hi_open else f" and <= {hi}")
        raise ValueError(f"Invalid {name}: {value!r} (allowed a number {lower}{upper})")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (allowed True or False)")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r} (allowed {', '.join(allowed)})")


def rms(p: torch.Tensor) -> torch.Tensor:
    """Root mean square of a tensor as a 0-dim tensor (Madam's weight scale), in float32 or
    the parameter's dtype if wider (half-precision squares would overflow)."""
    return p.detach().to(torch.promote_types(p.dtype, torch.float32)).pow(2).mean().sqrt()


def closure_loss(closure: Callable[[], float] | None) -> float | None:
    """Re-evaluate the model through ``closure`` (with gradients on, as torch's optimizers
    do inside their no-grad ``step``)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def params_with_grad(group: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The parameters of a param group that received a gradient."""
    return (p for p in group["params"] if p.grad is not None)
