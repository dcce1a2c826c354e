"""What every optimizer here shares beyond its update: one policy for non-finite
gradients, a clear refusal of sparse gradients, and state that reloads exactly.

**Non-finite gradients** (inf or NaN, from an overflow, a log of 0, a bad batch): the
whole step is skipped, as GradScaler skips one under AMP fp16 (so the policy is the
same in every precision). No weight and no state changes (moments, step counts,
momentum buffers, EG+- parts, LNS exponents); ``optimizer.skipped_steps`` counts the
skipped steps and the training loop reports them per epoch as ``skipped_steps``. Never a
finite but wrong weight (EG's ``exp(-inf) = 0``, LNS-Madam's NaN cast to an integer
exponent), never a state poisoned for good (Madam's NaN second moment). A skipped step
alone is not divergence; the training loop stops a trial as diverged when its weights
hold inf/NaN or ``train.nonfinite_streak`` losses in a row were non-finite (every step
skipped), and ``skipped_steps`` shows the skips either way.

Example::

    class MyEG(Optimizer):
        def _update(self) -> None:
            for group in self.param_groups:
                for p in params_with_grad(group):
                    multiplicative_(p, p.grad, group["lr"])
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from optim._common import closure_loss

__all__ = ["Optimizer", "all_finite"]


class Optimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` whose ``step`` runs ``_update`` (the algorithm, under
    ``no_grad``) unless a gradient is non-finite; ``load_state_dict`` keeps each state
    tensor's saved dtype (torch casts them all to the parameter's, which rounds float32
    scales and integer exponents of bf16 parameters)."""

    supports_sparse: ClassVar[bool] = False
    skipped_steps: int = 0

    def _update(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure_loss(closure)
        self._before_update()
        if not self.supports_sparse:
            self._refuse_sparse()
        if all_finite(self):
            self._update()
        else:
            self.skipped_steps += 1
        return loss

    def _before_update(self) -> None:
        """Runs after the closure, before the finite check (LNS-Madam snaps new params)."""

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


def all_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient of ``optimizer``'s params is finite: one sum per tensor and
    one device sync (a sum is non-finite if any element is; inf + -inf is NaN). A sum
    can also overflow without a bad element: the exact elementwise check decides then."""
    grads = [p.grad._values() if p.grad.is_sparse else p.grad
             for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    device = grads[0].device
    total = torch.stack([g.sum().to(device, torch.float32) for g in grads]).sum()
    if bool(torch.isfinite(total)):
        return True
    return all(bool(torch.isfinite(g).all()) for g in grads)
