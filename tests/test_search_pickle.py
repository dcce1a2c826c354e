"""The sweep's searcher survives the pickling Ray Tune does (at construction, at every
experiment-state save, and on --resume), whatever locks the installed Optuna's samplers
hold: optuna 5.1's NSGA-II holds a threading.Lock, which pickle refuses."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import optuna
import pytest

from sweeps.samplers import FreshLocksOnPickle, NSGAIISampler, TPESampler
from sweeps.search import build_search
from sweeps.spec import Sweep
from trainables.config import TrialConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)


class _LockedThing:
    """Stands for a sampler of any Optuna version: two kinds of lock and some state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rlock = threading.RLock()
        self.cache = [1, 2, 3]


class _PicklableThing(FreshLocksOnPickle, _LockedThing):
    pass


def test_a_sampler_with_locks_pickles_and_gets_new_unlocked_locks() -> None:
    with pytest.raises(TypeError, match="pickle"):
        pickle.dumps(_LockedThing())
    thing = _PicklableThing()
    thing.lock.acquire()  # held while pickled: the copy's lock is new, so unlocked
    copy = pickle.loads(pickle.dumps(thing))
    assert copy.cache == [1, 2, 3]
    assert type(copy.lock) is type(threading.Lock())
    assert type(copy.rlock) is type(threading.RLock())
    assert copy.lock.acquire(blocking=False) and copy.rlock.acquire(blocking=False)
    assert thing.lock.locked()  # the original is untouched
    assert isinstance(thing.__dict__["lock"], type(threading.Lock()))


@pytest.mark.parametrize("make", [lambda: NSGAIISampler(seed=3, population_size=4),
                                  lambda: TPESampler(seed=3)])
def test_project_samplers_pickle_with_the_installed_optuna(make) -> None:
    sampler = make()
    copy = pickle.loads(pickle.dumps(sampler))
    assert isinstance(copy, type(sampler))
    # Same random state: both propose the same first point of a fresh study.
    points = []
    for s in (sampler, copy):
        study = optuna.create_study(sampler=s)
        points.append(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}).params)
    assert points[0] == points[1]


def _space(trial) -> None:
    trial.suggest_float("optim.lr", 1e-3, 0.5, log=True)
    trial.suggest_categorical("quant.bits", [2, 4, 8])


def _searcher(sweep: Sweep):
    searcher, _, _ = build_search(sweep, sweep.base)
    searcher.set_search_properties(None, None, {})
    return searcher


def _ask_and_tell(searcher, ids: range) -> list[dict]:
    configs = []
    for i in ids:
        config = searcher.suggest(f"t{i}")
        configs.append(config)
        # Two objectives from the config alone: the same config, the same result.
        searcher.on_trial_complete(f"t{i}", {"val_acc_q": config["optim.lr"],
                                             "packed_bytes": config["quant.bits"] * 100.0})
    return configs


@pytest.mark.parametrize("objectives", [(("val_acc_q", "max"), ("packed_bytes", "min")), ()])
def test_the_sweeps_searcher_saved_and_restored_proposes_what_it_would_have(
        tmp_path: Path, objectives) -> None:
    """Tune's save/restore of the searcher (what --resume does): NSGA-II for several
    objectives, TPE for one; past NSGA-II's first generation (population 4), so the
    restored sampler proposes from the trials it was told about."""
    sweep = Sweep(name="s", base=TrialConfig(), space=_space, num_samples=16,
                  metric="val_acc_q", objectives=objectives, early_stopping=False)
    uninterrupted = _searcher(sweep)
    _ask_and_tell(uninterrupted, range(8))
    interrupted = _searcher(sweep)
    _ask_and_tell(interrupted, range(8))
    interrupted.save(str(tmp_path / "searcher.pkl"))
    pickle.dumps(interrupted)  # as the Tuner pickles it at construction

    resumed = _searcher(sweep)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    expected = _ask_and_tell(uninterrupted, range(8, 14))
    assert _ask_and_tell(resumed, range(8, 14)) == expected
    assert len(resumed._ot_study.trials) == 14
