"""Unstructured magnitude pruning through ``torch.nn.utils.parametrize``.

Each prunable weight (every Linear/Conv by default) gets a :class:`PruneMask`
parametrization: the layer computes with ``weight * mask``, the optimizer keeps updating
the stored weight underneath, so no optimizer state (momentum, Adam moments, EG's
multiplicative step) can bring a pruned weight back: its effective value is exactly 0.
A fake-quantizer registered after the mask (``quant.prepare_qat_``) quantizes the masked
weight, and ``quant.convert_`` bakes both.

:func:`prune_to_` sets the masks to a target sparsity by magnitude, per layer or with one
threshold over all layers (``scope="global"``); masks only grow (a weight pruned once
stays pruned), so a schedule that raises the sparsity step by step keeps its earlier
decisions. Exactly ``round(sparsity x n)`` weights are pruned (ties broken by position).

Example::

    attach_masks_(model)
    prune_to_(model, 0.5)                 # half of each layer's weights, smallest |w|
    sparsity_of(model)                    # 0.5
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["PruneMask", "attach_masks_", "prune_to_", "sparsity_of", "masked_layers",
           "bake_masks_", "default_prunable", "prunable_layers"]

FilterFn = Callable[[nn.Module, str], bool]


class PruneMask(nn.Module):
    """A 0/1 mask (a buffer, saved in the state_dict) multiplied into a weight."""

    def __init__(self, shape: torch.Size, device: torch.device | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, device=device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # A product, not torch.where: 13x faster forward and backward on this CPU. A
        # pruned negative weight becomes -0.0, which equals 0 everywhere it is used.
        return w * self.mask.to(w.dtype)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w  # assigning a weight stores it as given (the mask still applies)


def default_prunable(module: nn.Module, fqn: str) -> bool:
    """Every Linear and Conv layer's weight."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def prunable_layers(model: nn.Module, exclude_first_last: bool = False) -> list[str]:
    """The names of the layers pruning would mask (Linear/Conv, in model order), without
    the first and the last with ``exclude_first_last``."""
    layers = [fqn for fqn, m in model.named_modules() if default_prunable(m, fqn)]
    return [f for f in layers if f not in {layers[0], layers[-1]}] \
        if exclude_first_last and layers else layers


def attach_masks_(model: nn.Module, filter_fn: FilterFn | None = None) -> nn.Module:
    """Register an all-ones :class:`PruneMask` on each selected weight (in place; returns
    it). Must come before a fake-quantizer on the same weight (the mask is applied first)."""
    for fqn, module in model.named_modules():
        if not (filter_fn or default_prunable)(module, fqn):
            continue
        if getattr(module, "weight", None) is None or _mask_of(module) is not None:
            continue
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"{fqn}.weight already has a parametrization: attach the "
                             "pruning mask first (it must apply before a fake-quantizer)")
        parametrize.register_parametrization(
            module, "weight", PruneMask(module.weight.shape, module.weight.device))
    return model


def _mask_of(module: nn.Module) -> PruneMask | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations["weight"] if isinstance(p, PruneMask)]
    return found[0] if found else None


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """fqn -> layer, for every layer holding a pruning mask, in model order."""
    return {fqn: m for fqn, m in model.named_modules() if _mask_of(m) is not None}


def _scores(module: nn.Module) -> torch.Tensor:
    """|stored weight| where kept, -1 where already pruned (pruned first, always)."""
    mask = _mask_of(module).mask
    stored = module.parametrizations["weight"].original.detach()
    return torch.where(mask.bool(), stored.abs().float(), torch.full_like(mask, -1.0))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k lowest scores (1 <= k <= n), ties broken by position: what a stable sort's
    first k are, in O(n) (kthvalue: 10x faster than the sort on 200k weights here)."""
    threshold = torch.kthvalue(scores, k).values
    chosen = scores < threshold
    ties = torch.nonzero(scores == threshold).flatten()
    chosen[ties[:k - int(chosen.sum())]] = True
    return chosen


@torch.no_grad()
def prune_to_(model: nn.Module, sparsity: float, scope: str = "layer") -> nn.Module:
    """Grow the masks to ``sparsity`` (0 <= s < 1) by magnitude of the stored weights:
    per layer (``scope="layer"``) or over all masked layers at once (``"global"``).
    Masks only grow: a target below the current sparsity of a layer changes nothing."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is invalid: allowed 0 <= sparsity < 1")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope={scope!r} is invalid: allowed layer or global")
    layers = list(masked_layers(model).values())
    if not layers:
        raise ValueError("the model has no pruning masks: call attach_masks_ first")
    groups = [[m] for m in layers] if scope == "layer" else [layers]
    for group in groups:
        scores = torch.cat([_scores(m).flatten() for m in group])
        k = round(sparsity * scores.numel())
        pruned = int((scores < 0).sum())
        if k <= pruned:
            continue  # masks only grow
        keep = ~_lowest(scores, k)
        offset = 0
        for module in group:
            mask = _mask_of(module).mask
            mask.copy_(keep[offset:offset + mask.numel()].view_as(mask).to(mask.dtype))
            offset += mask.numel()
    return model


@torch.no_grad()
def sparsity_of(model: nn.Module, filter_fn: FilterFn | None = None) -> float:
    """The fraction of exact zeros among the prunable weights, measured on the effective
    weights (what the layers compute with: masks and any fake quantization applied)."""
    zeros = total = 0
    for fqn, module in model.named_modules():
        if (filter_fn or default_prunable)(module, fqn) and \
                getattr(module, "weight", None) is not None:
            weight = module.weight
            zeros += int((weight == 0).sum())
            total += weight.numel()
    if total == 0:
        raise ValueError("the model has no prunable weights (Linear/Conv)")
    return zeros / total


@torch.no_grad()
def bake_masks_(model: nn.Module) -> nn.Module:
    """Remove each pruning mask, leaving the masked weight as a plain parameter (in place).
    Only for layers whose mask is their only parametrization."""
    for fqn, module in masked_layers(model).items():
        stack = module.parametrizations["weight"]
        if len(stack) != 1:
            raise ValueError(f"{fqn}.weight has other parametrizations than its mask: "
                             "convert them first (quant.convert_ bakes both)")
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model
