"""Compression transforms beside quantization, pure torch (no Ray, no MLflow): pruning
masks and sparsity schedules (``prune``, ``schedule``), whole-channel pruning
(``channels``), low-rank factorization by truncated SVD (``lowrank``); the LC algorithm
next.

A sibling of ``quant/`` rather than part of it, as torchao keeps ``sparsity/`` beside
``quantization/``: pruning decides which weights exist, quantization how the rest are
stored; they meet on one weight through stacked ``torch.nn.utils.parametrize``
parametrizations (a :class:`~compress.prune.PruneMask` first, then quant's
fake-quantizer), and ``quant.convert_`` bakes both into one set of codes.

Example::

    from compress import attach_masks_, prune_to_, sparsity_of
    attach_masks_(model)                       # every Linear/Conv weight, all kept
    prune_to_(model, 0.8, scope="global")      # the 80% smallest |w| over all layers
    sparsity_of(model)                         # 0.8 (exact zeros / prunable weights)
"""

from compress.prune import (
    PruneMask,
    attach_masks_,
    bake_masks_,
    masked_layers,
    prunable_layers,
    prune_to_,
    sparsity_of,
)
from compress.schedule import SCHEDULES, SparsitySchedule

__all__ = ["PruneMask", "attach_masks_", "bake_masks_", "masked_layers", "prunable_layers",
           "prune_to_", "sparsity_of", "SparsitySchedule", "SCHEDULES"]
