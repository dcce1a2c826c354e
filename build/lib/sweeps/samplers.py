"""Optuna samplers that survive pickling, as Ray Tune needs them to.

Tune pickles its searcher (and so the Optuna sampler inside it) when the Tuner is built
and at every save of the experiment state; ``--resume`` unpickles it. Optuna 5.1 gave its
genetic samplers (NSGA-II, NSGA-III) a ``threading.Lock`` attribute, which cannot be
pickled: ``pickle.dumps(optuna.samplers.NSGAIISampler(seed=0))`` raises ``TypeError:
cannot pickle '_thread.lock' object``, so every multi-objective sweep died before its
first trial. A lock guards a cache while a process runs; it holds no state worth
keeping, so these samplers drop their locks when pickled and make new, unlocked ones when
unpickled. Everything else (the random state, the cached generation) pickles as before,
so a restored sampler proposes what the original would have.

Example::

    from sweeps.samplers import NSGAIISampler
    sampler = pickle.loads(pickle.dumps(NSGAIISampler(seed=0)))
"""

from __future__ import annotations

import threading
from typing import Any

import optuna

__all__ = ["FreshLocksOnPickle", "NSGAIISampler", "TPESampler"]

_LOCK = type(threading.Lock())
_RLOCK = type(threading.RLock())


class _DroppedLock:
    """What a pickled lock attribute becomes: which kind to make again."""

    def __init__(self, reentrant: bool) -> None:
        self.reentrant = reentrant

    def make(self) -> Any:
        return threading.RLock() if self.reentrant else threading.Lock()


class FreshLocksOnPickle:
    """Mix-in: an object whose (top-level) lock attributes are left out of its pickled
    state and made anew, unlocked, when it is unpickled."""

    def __getstate__(self) -> dict[str, Any]:
        parent = getattr(super(), "__getstate__", None)  # object has one from Python 3.11
        state = dict(parent() if parent is not None else self.__dict__)  # a copy: 3.11's
        for key, value in state.items():                                  # is __dict__
            if isinstance(value, (_LOCK, _RLOCK)):
                state[key] = _DroppedLock(isinstance(value, _RLOCK))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = {k: v.make() if isinstance(v, _DroppedLock) else v for k, v in state.items()}
        parent = getattr(super(), "__setstate__", None)
        if parent is not None:
            parent(state)
        else:
            self.__dict__.update(state)


class NSGAIISampler(FreshLocksOnPickle, optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, picklable whatever lock its version holds."""


class TPESampler(FreshLocksOnPickle, optuna.samplers.TPESampler):
    """Optuna's TPE, picklable whatever lock its version holds (none up to 5.1)."""
