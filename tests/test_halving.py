"""Synchronous successive halving: the survivors depend only on the metrics at each rung,
whatever order the trials report in and however many run at once; a halving study picks
what the same study without early stopping picks (real Ray, tiny data)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler
from test_cli import run

from sweeps.halving import SynchronousHalving, halving_epochs, point_index, survivors
from sweeps.spec import Sweep
from sweeps.study import Cell, SearchSpace, Study, auto_rungs
from trainables.config import ConfigError, TrialConfig

SCRIPT = Path(__file__).resolve().parent.parent / "sweeps" / "eg_vs_gd.py"


def test_survivors_rank_by_the_metric_ties_to_the_earlier_point():
    scores = {0: 0.5, 1: 0.9, 2: 0.9, 3: math.nan, 4: 0.7, 5: 0.1}
    assert survivors(scores, 6, 2, "max") == [1, 2, 4]  # ceil(6 / 2) = 3
    assert survivors(scores, 6, 3, "max") == [1, 2]
    assert survivors({0: 0.9, 1: 0.9, 2: 0.9}, 3, 2, "max") == [0, 1]  # ties: lower index
    assert survivors(scores, 6, 2, "min") == [0, 4, 5]  # a loss: smaller is better
    assert survivors({0: math.nan, 1: math.inf}, 2, 2, "max") == []  # nothing finite
    # A cohort counts its ended members: 7 due, 2 reported -> ceil(7/2) = 4 may go on.
    assert survivors({0: 0.1, 6: 0.2}, 7, 2, "max") == [0, 6]
    # A margin keeps whatever is within it of the last survivor (the study's pick_within:
    # the config the pick backs off to may be a hair behind at a rung).
    close = {0: 0.9657, 1: 0.9655, 2: 0.9670, 3: 0.9563, 4: 0.9620}
    assert survivors(close, 4, 2, "max") == [0, 2]
    assert survivors(close, 4, 2, "max", margin=0.003) == [0, 1, 2]
    assert survivors(close, 4, 2, "min", margin=0.003) == [3, 4]


def test_epochs_trained_and_the_automatic_rungs():
    assert halving_epochs(8, (1, 2), 2, 3) == 8 + 4 + 2  # FIFO: 24
    assert halving_epochs(8, (), 2, 3) == 24
    assert halving_epochs(8, (1,), 2, 3) == 8 + 4 * 2
    assert auto_rungs(8, 3) == (1, 2)  # the default study: 8 -> 4 -> 2 finishers
    assert auto_rungs(8, 10) == (3, 5)
    assert auto_rungs(2, 2) == (1,)  # the smoke test: 2 -> 1
    assert auto_rungs(8, 1) == () and auto_rungs(1, 5) == ()


class _Trial:
    def __init__(self, index: int) -> None:
        self.trial_id = f"abc_{index:05d}"
        self.status = Trial.PENDING
        self.is_saving = False
        self.epoch = 0


class _Controller:
    """What SynchronousHalving asks of Tune's controller, and a loop that drives trials
    the way Tune does: start pending ones while slots are free (resuming paused ones the
    scheduler chooses), let a random running trial report its next epoch."""

    def __init__(self, scheduler: SynchronousHalving, curves: list[list[float]],
                 slots: int, seed: int, crash: frozenset = frozenset(),
                 silent: frozenset = frozenset(), metric: str = "val_acc") -> None:
        self.scheduler, self.curves, self.slots = scheduler, curves, slots
        self.trials = [_Trial(i) for i in range(len(curves))]
        self.random = random.Random(seed)
        self.epochs_run = 0
        self.metric = metric
        # (point, epoch): fails once in that epoch and Tune restarts it from its last
        # checkpoint (on_trial_error, back to PENDING, on_trial_add); silent: ends ERROR
        # without any hook (a reused process that failed to reset).
        self.crash, self.silent = set(crash), set(silent)

    def get_trials(self) -> list[_Trial]:
        return self.trials

    def stop_trial(self, trial: _Trial) -> None:
        assert trial.status in (Trial.PAUSED, Trial.PENDING)
        self.scheduler.on_trial_remove(self, trial)
        trial.status = Trial.TERMINATED

    def run(self) -> dict[int, int]:
        while True:
            running = [t for t in self.trials if t.status == Trial.RUNNING]
            while len(running) < self.slots:
                chosen = self.scheduler.choose_trial_to_run(self)
                if chosen is None:
                    break
                chosen.status = Trial.RUNNING
                running.append(chosen)
            if not running:
                break
            self._report(self.random.choice(running))
        stuck = [t.trial_id for t in self.trials
                 if t.status not in (Trial.TERMINATED, Trial.ERROR)]
        assert not stuck, f"trials left waiting: {stuck}"
        return {point_index(t): t.epoch for t in self.trials}

    def _report(self, trial: _Trial) -> None:
        at = (point_index(trial), trial.epoch + 1)
        if at in self.silent:
            trial.status = Trial.ERROR
            return
        if at in self.crash:
            self.crash.discard(at)
            self.scheduler.on_trial_error(self, trial)
            trial.status = Trial.PENDING
            self.scheduler.on_trial_add(self, trial)
            return
        trial.epoch += 1
        self.epochs_run += 1
        value = self.curves[point_index(trial)][trial.epoch - 1]
        result = {"epoch": trial.epoch, self.metric: value,
                  "diverged": 0 if math.isfinite(value) or self.metric != "val_acc" else 1}
        decision = self.scheduler.on_trial_result(self, trial, result)
        done = trial.epoch == len(self.curves[0]) or bool(result["diverged"])
        if decision == TrialScheduler.STOP or done:
            trial.status = Trial.TERMINATED
            self.scheduler.on_trial_complete(self, trial, result)
        elif decision == TrialScheduler.PAUSE:
            trial.status = Trial.PAUSED


# 8 points over 3 epochs; point 2 diverges in epoch 1, point 6 starts slow and ends best.
CURVES = [[0.50, 0.70, 0.80], [0.60, 0.65, 0.66], [math.nan] * 3, [0.60, 0.75, 0.90],
          [0.30, 0.40, 0.50], [0.55, 0.72, 0.70], [0.20, 0.30, 0.99], [0.60, 0.60, 0.60]]


@pytest.mark.parametrize("slots", [1, 2, 3, 8])
def test_survivors_do_not_depend_on_the_order_or_the_number_running(slots):
    """Rung 1 (all 8 due, one diverged): the best 4 of the finite ones, ties (0.60 x3)
    to the earlier point: 1, 3, 5, 7; rung 2: 3 (0.75), 5 (0.72). Point 6, slow to start
    and best at the end, is stopped at rung 1 in every order: what halving trades."""
    for seed in range(25):
        scheduler = SynchronousHalving("val_acc", "max", (1, 2), 2, len(CURVES))
        controller = _Controller(scheduler, CURVES, slots, seed)
        epochs = controller.run()
        assert epochs == {0: 1, 1: 2, 2: 1, 3: 3, 4: 1, 5: 3, 6: 1, 7: 2}, (slots, seed)
        assert scheduler.promoted == {1: [1, 3, 5, 7], 2: [3, 5]}
        assert controller.epochs_run == sum(epochs.values())


# A second cohort of 4 points with one rung: 0.9, 0.2, 0.5, 0.4 at epoch 1 -> 0 and 2 go on.
SECOND = [[0.90, 0.10, 0.10], [0.20, 0.95, 0.95], [0.50, 0.50, 0.50], [0.40, 0.60, 0.70]]
ALONE = {0: 1, 1: 2, 2: 1, 3: 3, 4: 1, 5: 3, 6: 1, 7: 2}  # CURVES ranked by themselves


@pytest.mark.parametrize("slots", [1, 2, 5])
def test_cohorts_are_ranked_apart_each_with_the_survivors_it_has_alone(slots):
    """Three cells in one run (8, 4 and 8 points; the third the same curves as the
    first): each is ranked only among itself, with its own rungs, ties to its own
    earlier point; a cohort without rungs runs every point to the end."""
    for seed in range(25):
        scheduler = SynchronousHalving("val_acc", "max", reduction=2,
                                       cohorts=[(8, (1, 2)), (4, (1,)), (8, (1, 2)), (2, ())])
        controller = _Controller(scheduler, CURVES + SECOND + CURVES + SECOND[:2],
                                 slots, seed)
        epochs = controller.run()
        assert epochs == {**ALONE, 8: 3, 9: 1, 10: 3, 11: 1,
                          **{12 + i: e for i, e in ALONE.items()}, 20: 3, 21: 3}, seed
        assert [c.promoted for c in scheduler.cohorts] == [
            {1: [1, 3, 5, 7], 2: [3, 5]}, {1: [8, 10]},
            {1: [13, 15, 17, 19], 2: [15, 17]}, {}]
    with pytest.raises(ValueError, match="at least one rung"):
        SynchronousHalving("val_acc", "max", cohorts=[(4, ()), (2, ())])


def test_a_rung_is_decided_when_its_last_trial_ends_without_reaching_it():
    """Every other point waits at rung 1; the last one diverges in epoch 1 (it reports
    NaN, then ends): the rung is decided then, and the waiting survivors go on."""
    curves = [[0.5, 0.6], [0.7, 0.8], [0.4, 0.9], [math.nan, math.nan]]
    scheduler = SynchronousHalving("val_acc", "max", (1,), 2, len(curves))
    controller = _Controller(scheduler, curves, slots=1, seed=0)
    assert controller.run() == {0: 2, 1: 2, 2: 1, 3: 1}


@pytest.mark.parametrize("crash", [(4, 1), (3, 2), (5, 3), (1, 2)])
def test_a_failed_trial_tune_restarts_is_due_again(crash):
    """max_failures: Tune restarts a crashed trial from its checkpoint; the rung waits
    for it and the survivors are those of a run without the crash."""
    for seed in range(10):
        scheduler = SynchronousHalving("val_acc", "max", (1, 2), 2, len(CURVES))
        epochs = _Controller(scheduler, CURVES, 2, seed, crash=frozenset({crash})).run()
        assert epochs == {0: 1, 1: 2, 2: 1, 3: 3, 4: 1, 5: 3, 6: 1, 7: 2}, (crash, seed)


def test_a_non_finite_loss_that_is_not_divergence_stops_and_the_rung_goes_on():
    """Mode min on a loss: the last point due at the rung reports inf (not flagged
    diverged): it stops there, the rung is decided, nothing waits forever."""
    losses = [[0.5, 0.4], [0.3, 0.2], [0.9, 0.8], [math.inf, math.inf]]
    for seed in range(10):
        scheduler = SynchronousHalving("val_loss", "min", (1,), 2, len(losses))
        epochs = _Controller(scheduler, losses, 1, seed, metric="val_loss").run()
        assert epochs == {0: 2, 1: 2, 2: 1, 3: 1}


def test_a_trial_that_ends_without_a_hook_does_not_hold_the_rung():
    for seed in range(10):
        scheduler = SynchronousHalving("val_acc", "max", (1, 2), 2, len(CURVES))
        controller = _Controller(scheduler, CURVES, 2, seed, silent=frozenset({(6, 1)}))
        epochs = controller.run()
        assert epochs[6] == 0 and epochs[3] == 3 and epochs[5] == 3


def test_halving_is_refused_where_it_cannot_work(tiny_root):
    base = TrialConfig().with_overrides([f"data.root={tiny_root}", "train.epochs=3"])
    with pytest.raises(ConfigError, match=r"rungs=\[3\] is invalid: allowed increasing "
                                          r"epochs from 1 to train.epochs - 1 \(2\)"):
        Sweep(name="s", base=base, points=({},), rungs=(3,))
    with pytest.raises(ConfigError, match=r"rungs=\[2, 1\] is invalid"):
        Sweep(name="s", base=base, points=({},), rungs=(2, 1))
    with pytest.raises(ConfigError, match="rungs is invalid for a searched space"):
        Sweep(name="s", base=base, space=lambda trial: None, rungs=(1,))
    with pytest.raises(ConfigError, match="reduction_factor=1.5 is invalid with rungs"):
        Sweep(name="s", base=base, points=({},), rungs=(1,), reduction_factor=1.5)
    with pytest.raises(ConfigError, match="rungs is invalid with resume_run_id"):
        Sweep(name="s", base=base, points=({},), rungs=(1,), resume_run_id="abc")
    search = base.with_overrides(["data.val_fraction=0.1", "evaluate.test_each_epoch=false"])
    with pytest.raises(ConfigError, match="evaluate.test_each_epoch=false is invalid with "
                                          "the sweep metric test_acc"):
        Sweep(name="s", base=search, points=({},))
    cell = Cell(("mnist",), base, SearchSpace((("optim.lr", 0.01, 1.0, True),)))
    study = Study(name="s", cells=(cell,), key_names=("dataset",), rungs=(1, 3))
    with pytest.raises(ConfigError, match=r"cell mnist: rungs=\[1, 3\] is invalid"):
        study.validate()
    with pytest.raises(ConfigError, match="reduction=1 is invalid"):
        Study(name="s", cells=(cell,), key_names=("dataset",), reduction=1)


def test_a_bad_rungs_flag_names_what_is_allowed(tmp_path: Path):
    out = run(["--rungs", "one"], tmp_path, timeout=60, script=SCRIPT)
    assert out.returncode == 2
    assert "--rungs='one' is invalid: allowed auto, none or epochs like 1,2" in out.stderr


def _search_trials(folder: Path) -> dict[float, tuple[str, int, float]]:
    """Search trial runs by learning rate: (status, epochs, last val_acc)."""
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eg_vs_gd")
    runs = client.search_runs([exp.experiment_id], "tags.phase = 'search'")
    trials = {}
    for r in runs:
        if "optim.lr" not in r.data.params or "trial_id" not in r.data.tags:
            continue
        epochs = len(client.get_metric_history(r.info.run_id, "val_acc"))
        trials[float(r.data.params["optim.lr"])] = (r.info.status, epochs,
                                                    r.data.metrics["val_acc"])
    return trials


def _picked(stdout: str) -> list[str]:
    """The comparison table's rows up to the picked lr and weight decay."""
    table = stdout.split("test_acc over seeds per cell ===")[1].split("\n\n")[0]
    header, *rows = [line.split(" | ") for line in table.strip().splitlines()
                     if line.startswith("| ") and not line.startswith("|---")]
    columns = [header.index("best_lr"), header.index("best_weight_decay")]
    return [" ".join(row[i] for i in columns) for row in rows]


@pytest.mark.ray
def test_a_halving_study_picks_what_every_point_to_the_end_picks(tmp_path, tiny_root):
    """One cell, 6 points over 3 epochs: halving at rungs 1, 2 (6 -> 3 -> 2) run twice,
    two at once and one at a time (another completion order), and once without early
    stopping. The same configs are picked every time; every trial halving let finish
    ends with the very numbers it has without early stopping (a paused trial resumes
    from its checkpoint to the same weights)."""
    common = ["--datasets", "mnist", "--models", "mlp", "--optimizers", "gd",
              "--num-samples", "6", "--epochs", "3", "--seeds", "1", "--address", "local"]
    outs = {}
    for name, extra in (("halving", ["--rungs", "1,2"]),
                        ("one_at_a_time", ["--rungs", "1,2", "--cpus-per-worker", "2"]),
                        ("fifo", ["--rungs", "none"])):
        folder = tmp_path / name
        folder.mkdir()
        outs[name] = run([*common, *extra], folder, tiny_root, timeout=600, script=SCRIPT)
        assert outs[name].returncode == 0, outs[name].stderr[-3000:]
    picked = {name: _picked(out.stdout) for name, out in outs.items()}
    assert picked["halving"] == picked["one_at_a_time"] == picked["fifo"], picked

    fifo = _search_trials(tmp_path / "fifo")
    for name in ("halving", "one_at_a_time"):
        trials = _search_trials(tmp_path / name)
        assert trials.keys() == fifo.keys()
        finished = {lr for lr, (status, epochs, _) in trials.items() if epochs == 3}
        # Halving stopped some (2 go on at the last rung, more where the tiny
        # validation split ties them within the study's pick_within).
        assert 2 <= len(finished) < len(fifo), finished
        for lr in finished:
            assert trials[lr][2] == fifo[lr][2], (name, lr)  # bit for bit
        for lr, (status, epochs, _) in trials.items():
            if epochs < 3 and not math.isnan(fifo[lr][2]):
                assert status == "KILLED", (name, lr, status)  # stopped at a rung
    assert _search_trials(tmp_path / "halving") == _search_trials(tmp_path / "one_at_a_time")
