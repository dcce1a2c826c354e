"""What every optimizer here shares beyond its update: one policy for non-finite
gradients, a clear refusal of sparse gradients, and state that reloads exactly.

**Non-finite gradients** (inf or NaN, from an overflow, a log of 0, a bad batch): the
element is skipped, as GradScaler skips a step. Its weight and every per-element state
(moments, momentum buffers, EG+- parts, LNS exponents) stay as they were for that step,
the rest of the tensor steps as if that element had no gradient, and
``optimizer.nonfinite_skipped`` counts the skipped elements (the training loop logs it
per epoch as ``grad_nonfinite``). Never a finite but wrong weight (EG's ``exp(-inf) = 0``,
LNS-Madam's NaN cast to an integer exponent), never a state poisoned for good (Madam's
NaN second moment). A trial whose *loss* is non-finite is still stopped as diverged by
the loop; a skipped gradient alone is not divergence.

Example::

    class MyEG(Optimizer):
        def _update(self) -> None:
            for group in self.param_groups:
                for p in params_with_grad(group):
                    multiplicative_(p, p.grad, group["lr"])
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator

import torch

from optim._common import closure_loss

__all__ = ["Optimizer", "skipping_nonfinite"]


class Optimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` whose ``step`` runs ``_update`` (the algorithm, under
    ``no_grad``) with the non-finite policy above; ``load_state_dict`` keeps each state
    tensor's saved dtype (torch casts them all to the parameter's, which rounds float32
    scales and integer exponents of bf16 parameters)."""

    supports_sparse: ClassVar[bool] = False
    nonfinite_skipped: int = 0

    def _update(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure_loss(closure)
        if not self.supports_sparse:
            self._refuse_sparse()
        with skipping_nonfinite(self):
            self._update()
        return loss

    def _refuse_sparse(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse "
                                       "gradients (torch.optim.SGD does: optim.name=gd)")

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A state_dict saved before a group option existed (e.g. EG's decay) lacks it:
        # the constructor's value fills it, as torch's optimizers setdefault theirs.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(index, {}).items():
                if torch.is_tensor(value) and key != "step" and p in self.state:
                    loaded = self.state[p][key]
                    self.state[p][key] = value.detach().to(loaded.device, copy=True)


@contextmanager
def skipping_nonfinite(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Around one update: zero the non-finite gradient elements, then put back the
    weights, the same-shaped state and the gradients of those elements. One device sync
    and one sum per tensor per step when every gradient is finite."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        yield
        return
    values = [p.grad._values() if p.grad.is_sparse else p.grad for p in params]
    # A sum is non-finite if any element is (inf + -inf is NaN): one cheap reduction per
    # tensor. It can also overflow without a bad element: then the exact check below
    # finds nothing to set aside.
    total = torch.stack([v.sum().to(values[0].device, torch.float64) for v in values]).sum()
    if bool(torch.isfinite(total)):
        yield
        return
    saved = [_set_aside(optimizer, p) for p, v in zip(params, values, strict=True)
             if not bool(torch.isfinite(v).all())]
    try:
        yield
    finally:
        for p, grad, bad, weight, kept in saved:
            p[bad] = weight
            for key, value in kept.items():
                optimizer.state[p][key][bad] = value
            p.grad = grad


def _set_aside(optimizer: torch.optim.Optimizer, p: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    grad = p.grad
    dense = grad.to_dense() if grad.is_sparse else grad
    bad = ~torch.isfinite(dense)
    state = optimizer.state.get(p, {})  # .get: the defaultdict would grow an entry
    kept = {k: v[bad].clone() for k, v in state.items()
            if torch.is_tensor(v) and v.shape == p.shape}
    p.grad = dense.masked_fill(bad, 0)
    optimizer.nonfinite_skipped += int(bad.sum())
    return p, grad, bad, p[bad].clone(), kept
