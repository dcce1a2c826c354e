"""Name -> optimizer class, so a config can say ``optim.name=sgd``."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

__all__ = ["available", "build", "register"]

Factory = Callable[..., torch.optim.Optimizer]
_REGISTRY: dict[str, Factory] = {}


def register(name: str, factory: Factory) -> None:
    """Make ``factory(params, **hparams)`` buildable as ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    _REGISTRY[name] = factory


def available() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build(name: str, params: Iterable[Any], **hparams: Any) -> torch.optim.Optimizer:
    """Construct the optimizer registered as ``name``; hyperparameters are validated by it.

    Example::

        opt = build("gd", model.parameters(), lr=0.1)
    """
    if name not in _REGISTRY:
        raise ValueError(f"optimizer name={name!r} is invalid: allowed one of "
                         f"{', '.join(available())}")
    return _REGISTRY[name](params, **hparams)


def _gd(params: Iterable[Any], lr: float, weight_decay: float = 0.0,
        **_ignored: Any) -> torch.optim.Optimizer:
    # Plain gradient descent: SGD without momentum, whatever the config's momentum says.
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _sgd(params: Iterable[Any], lr: float, momentum: float = 0.0, nesterov: bool = False,
         weight_decay: float = 0.0, **_ignored: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)


register("gd", _gd)
register("sgd", _sgd)
