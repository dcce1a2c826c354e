"""torch's SGD under this package's non-finite policy (the ``gd`` and ``sgd`` of the
registry), so every optimizer a study compares treats inf/NaN gradients alike."""

from __future__ import annotations

import torch

from optim.base import Optimizer

__all__ = ["SGD"]


class SGD(Optimizer, torch.optim.SGD):
    """``torch.optim.SGD`` (same arguments, same steps on finite gradients, sparse
    gradients included) that skips a step with a non-finite gradient and counts it
    (:mod:`optim.base`) instead of turning the weights inf/NaN.

    Example::

        opt = SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    """

    supports_sparse = True

    def _update(self) -> None:
        # Once any plain torch SGD exists, torch has wrapped SGD.step with its hook
        # runner: call what it wraps, or this step's hooks would run twice.
        step = torch.optim.SGD.step
        if getattr(step, "hooked", False):
            step = step.__wrapped__
        step(self)
