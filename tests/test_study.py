"""The study's design without Ray: paired quasi-random points, the pick rule, validation."""

from __future__ import annotations

import math

import pytest

from sweeps.study import Cell, SearchSpace, Study, pick_config
from trainables.config import ConfigError, TrialConfig

LR = (("optim.lr", 0.01, 1.0, True), ("optim.weight_decay", 1e-6, 1e-3, True))


def test_points_are_the_same_quantiles_for_every_range_and_repeat():
    a = SearchSpace(LR).points(8, seed=0)
    b = SearchSpace((("optim.lr", 0.1, 10.0, True), LR[1])).points(8, seed=0)
    assert a == SearchSpace(LR).points(8, seed=0)  # the same command: the same configs
    for p, q in zip(a, b, strict=True):  # paired: the same unit point, another range
        assert math.log(q["optim.lr"] / 0.1) == pytest.approx(math.log(p["optim.lr"] / 0.01))
        assert q["optim.weight_decay"] == p["optim.weight_decay"]
    assert SearchSpace(LR).points(8, seed=1) != a
    lrs = sorted(math.log10(p["optim.lr"]) for p in a)  # log-uniform over [-2, 0]
    assert all(-2 <= x <= 0 for x in lrs)
    # Sobol: each of 8 equal slices of the log range holds exactly one of 8 points.
    assert sorted(int((x + 2) / 2 * 8) for x in lrs) == list(range(8))


def test_constants_and_linear_ranges():
    space = SearchSpace((("model.dropout", 0.0, 0.5, False),), (("optim.bias_lr", 0.05),))
    points = space.points(4, seed=3)
    assert all(p["optim.bias_lr"] == 0.05 and 0 <= p["model.dropout"] <= 0.5 for p in points)
    with pytest.raises(ConfigError, match="optim.lr=0.0..1.0"):
        SearchSpace((("optim.lr", 0.0, 1.0, True),))


def _row(lr, acc, status="FINISHED", diverged=False):
    return {"trial_id": f"t{lr}", "optim.lr": lr, "val_acc": acc, "status": status,
            "diverged": diverged}


def test_pick_backs_off_from_the_edge():
    rows = [_row(0.85, 0.980), _row(0.40, 0.978), _row(0.2, 0.976), _row(0.05, 0.95),
            _row(2.0, 0.99, status="KILLED"), _row(1.5, 0.99, diverged=True)]
    assert pick_config(rows, "val_acc", 0.003, "optim.lr")["optim.lr"] == 0.40
    assert pick_config(rows, "val_acc", 0.0, "optim.lr")["optim.lr"] == 0.85
    assert pick_config(rows, "val_acc", 0.003, None)["optim.lr"] == 0.85
    assert pick_config([_row(1.0, float("nan"))], "val_acc", 0.01, "optim.lr") is None
    # Integer metrics count; a row without the back-off key goes last, not a TypeError.
    rows = [_row(None, 1), _row(0.5, 0.999)]
    assert pick_config(rows, "val_acc", 0.01, "optim.lr")["optim.lr"] == 0.5


def test_a_study_checks_its_shape_at_construction(tiny_root):
    base = TrialConfig().with_overrides([f"data.root={tiny_root}", "optim.name=eg"])
    cell = Cell(("mnist", "eg"), base, SearchSpace(LR))
    with pytest.raises(ConfigError, match="cell mnist/eg is invalid.*3 parts"):
        Study(name="s", cells=(cell,), key_names=("dataset", "model", "optimizer"))
    with pytest.raises(ConfigError, match="pick_within=-0.1"):
        Study(name="s", cells=(cell,), key_names=("dataset", "optimizer"), pick_within=-0.1)
    with pytest.raises(ConfigError, match="at least one range"):
        SearchSpace(())


def test_a_study_validates_every_cell_before_ray(tiny_root):
    base = TrialConfig().with_overrides([f"data.root={tiny_root}", "optim.name=eg"])
    bad = Cell(("mnist", "mlp", "eg"), base, SearchSpace((("optim.momentum", 0.5, 1.5, False),)))
    study = Study(name="s", cells=(bad,), key_names=("dataset", "model", "optimizer"))
    with pytest.raises(ConfigError, match=r"cell mnist/mlp/eg: point \d .*optim.momentum"):
        study.validate()
    with pytest.raises(ConfigError, match="seeds=0"):
        Study(name="s", cells=(bad,), key_names=("a",), seeds=0)
    # train.init_from is checked too (before: studies skipped it, every trial failed in Ray)
    missing = Cell(("mnist", "mlp", "eg"), base.with_overrides(["train.init_from=nowhere"]),
                   SearchSpace(LR))
    study = Study(name="s", cells=(missing,), key_names=("dataset", "model", "optimizer"))
    with pytest.raises(ConfigError, match="train.init_from=.*nowhere' is invalid"):
        study.validate()


def test_the_study_description_fits_mlflows_tag_limit_in_whole_lines():
    """The study run's Overview: the compact table per cell and the verdicts; 32 cells of
    the default study do not fit 8000 characters: the cut keeps whole rows and says so."""
    from types import SimpleNamespace

    from sweeps.study_results import _DESCRIPTION_LIMIT, _description

    study = SimpleNamespace(metric="test_acc", key_names=("dataset", "model", "optimizer"))
    rows = [{"dataset": "fashion_mnist", "model": "cnn", "optimizer": f"opt{i}",
             "result": "87.39 +- 0.05", "ci95": "87.27..87.52", "seeds_ok": 3,
             "seeds_diverged": 0, "seeds_failed": 0, "best_lr": 0.305,
             "weight_kurtosis": 12.0} for i in range(200)]
    pairs = [{"dataset": "mnist", "model": "mlp", "pair": "eg - gd", "n_pairs": 3,
              "first_wins": 1, "diff_points": "-0.15", "ci95": "-0.61..0.30",
              "verdict": "not resolved", "mean_diff": -0.0015}]
    text = _description(study, rows, pairs)
    assert len(text) <= _DESCRIPTION_LIMIT
    assert text.endswith("(cut here: the rest is in comparison.md and pairs.md)")
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert all(line.endswith("|") for line in table_lines)  # no row cut in half
    assert "weight_kurtosis" not in text  # compact: only the columns compared first
    short = _description(study, rows[:2], pairs)
    assert "Matched pairs" in short and "| mnist | mlp | eg - gd | 3 | 1 | -0.15 |" in short
