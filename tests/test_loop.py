"""The training loop in-process: learning, metrics, determinism, schedules, precision,
and checkpoint-resume equal to an uninterrupted run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import tiny_config

import optim
from trainables.config import ConfigError, OptimConfig, TrialConfig
from trainables.loop import build_schedule, run_trial
from trainables.sessions import LocalSession, load_state_file

TIMINGS = {"epoch_seconds", "train_seconds", "images_per_s"}


def tiny(root: Path, *overrides: str) -> TrialConfig:
    return tiny_config(root, *overrides)


def without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in history]


def test_learns_and_reports_every_epoch(tiny_root: Path) -> None:
    session = LocalSession()
    history = run_trial(tiny(tiny_root), session)
    assert session.reports == history and [m["epoch"] for m in history] == [1, 2, 3]
    expected = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
                "skipped_steps", "epoch_seconds", "train_seconds", "images_per_s", "device"}
    assert set(history[0]) == expected
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.5  # 10 classes: chance is 0.1
    assert all(m["images_per_s"] > 0 and m["device"] == "cpu" for m in history)


def test_steps_with_non_finite_gradients_are_skipped_and_reported(tiny_root: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook that puts inf into one gradient element on every other step: those steps
    are skipped and counted, the others train."""
    cfg = tiny_config(tiny_root)
    session = LocalSession()
    calls = []

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) % 2:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = math.inf
        return grad

    import trainables.loop as loop_module

    original = loop_module._Trainer.__init__

    def patched(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        next(p for p in self.model.parameters() if p.dim() >= 2).register_hook(poison)

    monkeypatch.setattr(loop_module._Trainer, "__init__", patched)
    run_trial(cfg, session)
    history = session.reports
    assert sum(m["skipped_steps"] for m in history) == len(calls) // 2 > 0
    assert all(m["skipped_steps"] > 0 for m in history)
    assert math.isfinite(history[-1]["train_loss"])
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_same_seed_same_numbers(tiny_root: Path) -> None:
    a = run_trial(tiny(tiny_root, "train.epochs=2"), LocalSession())
    b = run_trial(tiny(tiny_root, "train.epochs=2"), LocalSession())
    c = run_trial(tiny(tiny_root, "train.epochs=2", "train.seed=1"), LocalSession())
    assert without_timings(a) == without_timings(b)
    assert without_timings(a) != without_timings(c)


@pytest.mark.parametrize("extra", [[], ["data.name=cifar10", "model.dropout=0.3"],
                                   ["optim.name=lns_madam", "optim.lr=0.125"],
                                   ["optim.name=egpm", "optim.lr=0.5"]])
def test_resume_from_checkpoint_equals_uninterrupted(tiny_root: Path, tmp_path: Path,
                                                     extra: list[str]) -> None:
    cfg = tiny(tiny_root, *extra)  # cifar10: augmentation and dropout draw random numbers
    full = LocalSession(checkpoint_dir=tmp_path / "full")
    uninterrupted = run_trial(cfg, full)
    crashed = LocalSession(checkpoint_dir=tmp_path / "ckpt", stop_after=1)
    with pytest.raises(InterruptedError):
        run_trial(cfg, crashed)
    assert load_state_file(tmp_path / "ckpt")["epoch"] == 1
    resumed_session = LocalSession(checkpoint_dir=tmp_path / "resumed",
                                   resume_from=tmp_path / "ckpt")
    resumed = run_trial(cfg, resumed_session)
    assert len(resumed_session.reports) == 2  # only the epochs that were missing
    assert without_timings(resumed) == without_timings(uninterrupted)
    a, b = load_state_file(tmp_path / "full"), load_state_file(tmp_path / "resumed")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


# Learning rates that train the tiny LeNet in 2 epochs (multiplicative lrs are relative).
OPTIMIZER_LR = {"gd": 0.1, "sgd": 0.1, "eg": 2.0, "egpm": 1.0, "adam_gd": 3e-3,
                "adam_eg": 0.03, "madam": 0.03, "lns_madam": 0.125}


@pytest.mark.parametrize("name", sorted(OPTIMIZER_LR))
def test_every_registered_optimizer_trains(tiny_root: Path, name: str) -> None:
    # Only the fields this optimizer reads: any other one set is a config error.
    plain = ["optim.momentum=0.0", "optim.nesterov=false"] if "momentum" in optim.reads(name) \
        else []
    bias = ["optim.bias_lr=0.02"] if optim.needs_bias_group(name) else []
    cfg = tiny(tiny_root, f"optim.name={name}", f"optim.lr={OPTIMIZER_LR[name]}", *plain,
               *bias, "optim.schedule=constant", "train.epochs=2")
    history = run_trial(cfg, LocalSession())
    assert history[-1]["train_loss"] < 0.8 * math.log(10), history  # below chance loss
    assert history[-1]["test_acc"] > 0.3, history


def test_checkpoint_holds_what_resume_needs(tiny_root: Path, tmp_path: Path) -> None:
    run_trial(tiny(tiny_root, "train.epochs=1"), LocalSession(checkpoint_dir=tmp_path / "c"))
    state = load_state_file(tmp_path / "c")
    assert set(state) == {"model", "optimizer", "scheduler", "scaler", "stages", "config",
                          "epoch", "step", "diverged_at", "history", "rng"}
    assert TrialConfig.from_flat(state["config"]).optim.lr == 0.05


def test_validation_split_is_reported(tiny_root: Path) -> None:
    history = run_trial(tiny(tiny_root, "train.epochs=1", "data.val_fraction=0.2"),
                        LocalSession())
    assert {"val_loss", "val_acc"} <= set(history[0])


def test_without_the_test_split_each_epoch_the_stages_still_score_it(tiny_root: Path
                                                                     ) -> None:
    """A study's search trial: val_* every epoch, no test_*; a stage still evaluates the
    test split at the end (weight rounding)."""
    history = run_trial(tiny(tiny_root, "train.epochs=2", "data.val_fraction=0.2",
                             "evaluate.test_each_epoch=false",
                             "evaluate.weight_rounding=[int8]"), LocalSession())
    assert all("val_acc" in h and "test_acc" not in h and "test_loss" not in h
               for h in history)
    assert 0.0 <= history[-1]["test_acc_int8"] <= 1.0
    with pytest.raises(ConfigError, match="evaluate.test_each_epoch=False is invalid: "
                                          "allowed true unless data.val_fraction > 0"):
        tiny(tiny_root, "evaluate.test_each_epoch=false")


def test_channels_last_trains_to_the_same_numbers_up_to_float_rounding(tiny_root: Path,
                                                                     tmp_path: Path) -> None:
    """Another memory layout, other convolution kernels: the same training to float
    rounding (not bit for bit); the weights are stored channels-last and resume works."""
    dense = run_trial(tiny(tiny_root, "train.epochs=2"), LocalSession())
    session = LocalSession(checkpoint_dir=tmp_path / "cl")
    last = run_trial(tiny(tiny_root, "train.epochs=2", "train.channels_last=true"), session)
    for a, b in zip(dense, last, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=2 / 200)
    conv = load_state_file(tmp_path / "cl")["model"]["features.0.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["amp_bf16", "amp_fp16"])
def test_mixed_precision_trains_on_cpu(tiny_root: Path, mode: str) -> None:
    history = run_trial(tiny(tiny_root, "train.epochs=2", f"precision.mode={mode}",
                             "model.name=mlp", "model.widths=[32]"), LocalSession())
    assert all(math.isfinite(m["train_loss"]) for m in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def _factors(cfg: OptimConfig, epochs: int, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_schedule(opt, cfg, epochs, steps)
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_against_hand_computed_values() -> None:
    assert _factors(OptimConfig(schedule="constant"), 2, 3) == [1.0] * 6
    step = _factors(OptimConfig(schedule="step", step_epochs=1, gamma=0.5), 3, 2)
    assert step == [1, 1, 0.5, 0.5, 0.25, 0.25]
    # onecycle, 10 steps, warm-up 2: 0.1 + 0.9*(s+1)/2 for s < 2, then 1 - (s-2)/8
    onecycle = _factors(OptimConfig(schedule="onecycle", warmup_fraction=0.2), 1, 10)
    assert onecycle == pytest.approx([0.55, 1.0] + [1 - k / 8 for k in range(8)])
    cosine = _factors(OptimConfig(schedule="cosine", warmup_fraction=0.0), 1, 4)
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])


def _nan_forwards(monkeypatch: pytest.MonkeyPatch, bad: Callable[[int], bool]) -> list:
    """From now on the trainer's training forwards (1, 2, ...) return NaN where ``bad``."""
    import trainables.loop as loop_module

    forwards: list[int] = []

    def blow_up(module, inputs, output):  # type: ignore[no-untyped-def]
        if not module.training:
            return output
        forwards.append(1)
        return output * math.nan if bad(len(forwards)) else output

    original = loop_module._Trainer.__init__

    def patched(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        self.model.register_forward_hook(blow_up)

    monkeypatch.setattr(loop_module._Trainer, "__init__", patched)
    return forwards


def test_a_diverged_trial_stops_within_the_epoch(tiny_root: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The training forward turns NaN from its 3rd batch on (the weights stay finite: the
    steps are skipped): at the 2nd non-finite loss in a row the trial stops, reports that
    epoch as its last (flagged, losses +inf for a searcher) and trains no more."""
    import trainables.loop as loop_module

    monkeypatch.setattr(loop_module, "DIVERGENCE_CHECK_EVERY", 1)
    forwards = _nan_forwards(monkeypatch, lambda i: i >= 3)
    session = LocalSession()
    history = run_trial(tiny(tiny_root, "train.epochs=3", "train.nonfinite_streak=2"),
                        session)
    assert len(history) == 1 and session.reports == history and len(forwards) == 4
    last = history[0]
    assert (last["diverged"], last["diverged_epoch"], last["diverged_batch"],
            last["diverged_step"]) == (1.0, 1, 4, 4)
    assert last["train_loss"] == math.inf  # the worst value, not NaN (Optuna fails on NaN)
    # The NaN steps were skipped: the weights still score.
    assert math.isfinite(last["test_loss"]) and last["skipped_steps"] == 2


def test_one_overflowing_batch_is_not_divergence(tiny_root: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One NaN loss (as an fp16 overflow gives): its step is skipped, training goes on, the
    epoch's loss is the mean of its finite batches."""
    import trainables.loop as loop_module

    monkeypatch.setattr(loop_module, "DIVERGENCE_CHECK_EVERY", 1)
    _nan_forwards(monkeypatch, lambda i: i == 3)
    history = run_trial(tiny(tiny_root, "train.epochs=3"), LocalSession())
    assert len(history) == 3 and "diverged" not in history[-1]
    assert [m["skipped_steps"] for m in history] == [1, 0, 0]
    assert all(math.isfinite(m["train_loss"]) for m in history)


def test_a_loss_that_turns_non_finite_between_checks_stops_after_the_epoch(
        tiny_root: Path) -> None:
    """Fewer batches than the check interval (2 per epoch here): the end-of-epoch check
    sees EG at lr 1e4 stuck (its losses non-finite in a row) and the trial stops."""
    cfg = tiny(tiny_root, "optim.name=eg", "optim.lr=1e4", "optim.weight_decay=0",
               "train.epochs=3", "train.nonfinite_streak=2")
    history = run_trial(cfg, LocalSession())
    assert len(history) <= 2 and history[-1]["diverged"] == 1.0
    assert history[-1]["train_loss"] == math.inf
    assert history[-1]["diverged_epoch"] == len(history)
