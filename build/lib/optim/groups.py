"""Param groups for multiplicative optimizers: weights multiply, biases add."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

__all__ = ["split_params"]


def split_params(model: nn.Module, bias_lr: float | None = None,
                 bias_group: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Two param groups: tensors of 2+ dims (linear/conv weights) with the optimizer's
    multiplicative update, and 0/1-dim tensors (biases, norm scales and shifts) with
    ``bias_group`` (default ``multiplicative=False``: the additive step; GDSign's is
    ``preserve_signs=False``), ``weight_decay=0`` and ``lr=bias_lr`` (when given).

    Why: a multiplicative update cannot move a weight that is exactly 0, and biases start
    at 0; norm scales start at 1 and would only ever keep their sign. Empty groups are
    left out.

    Example::

        opt = optim.EG(split_params(model, bias_lr=0.05), lr=2.0)
    """
    weights = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    others = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups: list[dict[str, Any]] = []
    if weights:
        groups.append({"params": weights})
    if others:
        flags = {"multiplicative": False} if bias_group is None else dict(bias_group)
        extra: dict[str, Any] = {**flags, "weight_decay": 0.0}
        if bias_lr is not None:
            extra["lr"] = bias_lr
        groups.append({"params": others, **extra})
    return groups
